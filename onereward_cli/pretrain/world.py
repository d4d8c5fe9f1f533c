"""Training triplets with ground truth from the synthetic world (`synth.py`).

`generate` builds (I_src, M, P) for a pool image with the mask builders of `tasks.py`; here the same
builders make the same kind of triplet, and because the renderer can draw any scene spec, each
triplet also gets the image it should become:

- fill: the prompted object ("a red circle") drawn inside the mask over the source; or the mask
  over one of the scene's objects with the prompt naming it, whose target is the source itself;
- extend / extend_no_prompt: the scene rendered on the whole grown canvas (its texture continues
  past the old border), prompted with the source caption or the fixed prompt;
- removal: the scene redrawn without the masked object (prompt "remove").

Everything is a function of the `random.Random` passed in, so a triplet stream is reproducible from
a seed and a step number. The generator pretraining, the zoo benchmarks (the ground truth is the
oracle's ceiling) and the demo's held-out benchmark all draw from here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .. import synth
from ..tasks import canvas_size, extend_canvas, fit_size, random_fill_mask, removal_mask

FILL_OBJECT_SHARE = 0.5  # fills whose mask covers an existing object and whose prompt names it


@dataclass
class WorldTriplet:
    task: str
    source: Image.Image  # at generation size (the canvas for extend)
    mask: np.ndarray  # uint8 (H, W), 255 = edit
    prompt: str  # what the generator sees (fixed prompt for prompt-free tasks)
    user_prompt: str  # what a text-alignment judgement quotes ("" for prompt-free tasks)
    target: Image.Image  # the ground truth at generation size
    spec: dict  # the source scene


@dataclass(frozen=True)
class WorldConfig:
    """How triplets are drawn; the defaults mirror recipes/tiny.yaml (see `from_recipe`)."""
    size: int = 64
    resolution: int = 64
    min_objects: int = 1
    max_objects: int = 3
    fill_min_frac: float = 0.15
    fill_max_frac: float = 0.5
    stroke_probability: float = 0.3
    extend_min_ratio: float = 1.25
    extend_max_ratio: float = 1.75
    extend_directions: tuple[str, ...] = ("left", "right", "up", "down", "horizontal", "vertical", "all")
    removal_dilate: int = 4
    extend_prompt: str = "high-definition, perfect composition"
    removal_prompt: str = "remove"

    @classmethod
    def from_recipe(cls, recipe) -> "WorldConfig":
        m = recipe.generate.masks
        tasks = recipe.tasks
        return cls(size=recipe.synth.size, resolution=recipe.generate.resolution,
                   min_objects=recipe.synth.min_objects, max_objects=recipe.synth.max_objects,
                   fill_min_frac=m.fill_min_frac, fill_max_frac=m.fill_max_frac,
                   stroke_probability=m.stroke_probability, extend_min_ratio=m.extend_min_ratio,
                   extend_max_ratio=m.extend_max_ratio, extend_directions=tuple(m.extend_directions),
                   removal_dilate=m.removal_dilate,
                   extend_prompt=(tasks["extend_no_prompt"].fixed_prompt if "extend_no_prompt" in tasks
                                  else cls.extend_prompt),
                   removal_prompt=tasks["removal"].fixed_prompt if "removal" in tasks else cls.removal_prompt)


def random_scene(rng: random.Random, cfg: WorldConfig) -> dict:
    return synth.scene_spec(rng, cfg.size, rng.randint(cfg.min_objects, cfg.max_objects))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _composite(base: Image.Image, top: Image.Image, mask: np.ndarray) -> Image.Image:
    return Image.composite(top, base, Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)))


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _visible(objects: list[dict]) -> list[dict]:
    """Objects no later-drawn object overlaps (the last one always qualifies)."""
    out = [o for i, o in enumerate(objects)
           if not any(_boxes_overlap(o["box"], p["box"]) for p in objects[i + 1:])]
    return out or objects[-1:]


def fill_triplet(rng: random.Random, cfg: WorldConfig, spec: dict | None = None) -> WorldTriplet:
    spec = spec or random_scene(rng, cfg)
    size = fit_size(cfg.size, cfg.size, cfg.resolution)
    sx, sy = size[0] / cfg.size, size[1] / cfg.size
    source = synth.render_scene(spec).resize(size, Image.BICUBIC)
    if spec["objects"] and rng.random() < FILL_OBJECT_SHARE:
        # The mask covers one object (one nothing lies on) and the prompt names it: the answer is the
        # source itself.
        o = rng.choice(_visible(spec["objects"]))
        x0, y0, x1, y1 = o["box"]
        mask = removal_mask(size, boxes=[[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dilate=cfg.removal_dilate)
        prompt = f"a {o['color']} {o['shape']}"
        target = source.copy()
    else:
        mask = random_fill_mask(size, rng, cfg.fill_min_frac, cfg.fill_max_frac, cfg.stroke_probability)
        color, shape = rng.choice(list(synth.COLORS)), rng.choice(synth.SHAPES)
        prompt = f"a {color} {shape}"
        # The object fills most of the mask's box, near its centre: what to draw follows from the mask
        # and the prompt, so the fill is learnable, with a little freedom left for the noise.
        bx0, by0, bx1, by1 = _bbox(mask)
        side = max(4, int(min(bx1 - bx0, by1 - by0) * rng.uniform(0.8, 1.0)))
        ox = (bx0 + bx1 - side) // 2 + rng.randint(-1, 1) * ((bx1 - bx0 - side) // 4)
        oy = (by0 + by1 - side) // 2 + rng.randint(-1, 1) * ((by1 - by0 - side) // 4)
        drawn = source.copy()
        synth._draw_shape(ImageDraw.Draw(drawn), shape, (ox, oy, ox + side, oy + side), synth.COLORS[color])
        target = _composite(source, drawn, mask)
    return WorldTriplet("fill", source, mask, prompt, prompt, target, spec)


def extend_triplet(rng: random.Random, cfg: WorldConfig, spec: dict | None = None,
                   prompted: bool = True) -> WorldTriplet:
    spec = spec or random_scene(rng, cfg)
    W = H = cfg.size
    ratio = rng.uniform(cfg.extend_min_ratio, cfg.extend_max_ratio)
    direction = rng.choice(list(cfg.extend_directions))
    cw, ch = canvas_size(W, H, ratio, direction)
    size = fit_size(cw, ch, cfg.resolution)
    source = synth.render_scene(spec)
    canvas, mask = extend_canvas(source, ratio, direction, size=size)
    # Where extend_canvas put the source: the same arithmetic, so the whole scene lines up with it.
    x0 = {"left": cw - W, "right": 0}.get(direction, (cw - W) // 2)
    y0 = {"up": ch - H, "down": 0}.get(direction, (ch - H) // 2)
    whole = synth.render_scene(spec, width=cw, height=ch, origin=(x0, y0))
    target = whole.resize(size, Image.BICUBIC)
    caption = synth.caption_of(spec)
    task = "extend" if prompted else "extend_no_prompt"
    prompt = caption if prompted else cfg.extend_prompt
    return WorldTriplet(task, canvas, np.asarray(mask, dtype=np.uint8).copy(), prompt,
                        caption if prompted else "", target, spec)


def removal_triplet(rng: random.Random, cfg: WorldConfig, spec: dict | None = None) -> WorldTriplet:
    spec = spec or random_scene(rng, cfg)
    size = fit_size(cfg.size, cfg.size, cfg.resolution)
    sx, sy = size[0] / cfg.size, size[1] / cfg.size
    order = list(range(len(spec["objects"])))
    rng.shuffle(order)
    mask, keep = None, None
    for k in order:  # as `generate`: the first object whose dilated box leaves some context
        x0, y0, x1, y1 = spec["objects"][k]["box"]
        m = removal_mask(size, boxes=[[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dilate=cfg.removal_dilate)
        if 0 < (m > 0).mean() < 1:
            mask, keep = m, [o for i, o in enumerate(spec["objects"]) if i != k]
            break
    if mask is None:  # a scene with no removable object: draw another
        return removal_triplet(rng, cfg)
    source = synth.render_scene(spec).resize(size, Image.BICUBIC)
    target = synth.render_scene(spec, objects=keep).resize(size, Image.BICUBIC)
    return WorldTriplet("removal", source, mask, cfg.removal_prompt, "", target, spec)


def triplet(task: str, rng: random.Random, cfg: WorldConfig) -> WorldTriplet:
    if task == "fill":
        return fill_triplet(rng, cfg)
    if task == "extend":
        return extend_triplet(rng, cfg, prompted=True)
    if task == "extend_no_prompt":
        return extend_triplet(rng, cfg, prompted=False)
    if task == "removal":
        return removal_triplet(rng, cfg)
    raise ValueError(f"unknown task {task!r}")


def write_benchmark(out, n_per_task: dict[str, int], cfg: WorldConfig, seed: int,
                    namespace: str = "benchmark") -> "Path":
    """A held-out benchmark JSONL of world triplets with their ground truth (`target`).

    `eval` reads the usual triplet fields (id, task, source, mask, prompt); `target` lets it report
    the ground truth's scores beside the policies' (the oracle's ceiling). Another `namespace`
    ("validation") draws other scenes from the same seed: a set to select checkpoints on that the
    reported benchmark never sees."""
    from pathlib import Path

    from ..artifacts import save_png, write_jsonl

    out = Path(out)
    recs = []
    for task, n in n_per_task.items():
        rng = random.Random(f"{namespace}:{seed}:{task}")
        for i in range(n):
            t = triplet(task, rng, cfg)
            sid = f"{task}-{i:04d}"
            d = f"images/{sid}"
            save_png(out / d / "source.png", t.source)
            save_png(out / d / "mask.png", Image.fromarray(t.mask))
            save_png(out / d / "target.png", t.target)
            recs.append({"id": sid, "task": task, "prompt": t.user_prompt, "source": f"{d}/source.png",
                         "mask": f"{d}/mask.png", "target": f"{d}/target.png"})
    write_jsonl(out / f"{namespace}.jsonl", recs)
    return out / f"{namespace}.jsonl"

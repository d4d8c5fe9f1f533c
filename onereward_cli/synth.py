"""Synthetic image pool for the embedded default, and the oracle annotator that stands in for humans.

Pool: small PNGs of coloured shapes on textured backgrounds, each with a caption and object boxes
(for removal masks). `manifest.jsonl` has one record per image:
    {"id", "path", "caption", "width", "height", "background": {...}, "objects": [{"shape","color","box"}]}

Oracle: `oracle_scores(source, mask, candidate, task, prompt)` returns a score in [0, 1] per evaluation
dimension from simple, documented image rules (see each `_score_*`). Higher is better. It only looks
at pixels, so it can judge any candidate, real or synthetic.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .artifacts import RunManifest, save_png, write_jsonl
from .errors import InputError

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("plain", "stripes", "dots", "gradient")


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box, color):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "square":
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
    else:  # star
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        d.polygon(pts, fill=color)


def _texture_period(rng: random.Random, texture: str) -> int | None:
    """The texture's period in pixels, drawn as the renderer always drew it (stripes, dots)."""
    if texture == "stripes":
        return rng.choice([6, 8, 12])
    if texture == "dots":
        return rng.choice([8, 10])
    return None


def render_background(width: int, height: int, color_name: str, texture: str, period: int | None,
                      origin: tuple[int, int] = (0, 0), base_size: int | None = None) -> Image.Image:
    """The background of a scene, `width` x `height` pixels, with the scene's own (0, 0) at `origin`.

    A scene drawn on a larger canvas with its origin shifted continues the same pattern beyond its
    borders (stripes, dots, a gradient extrapolated), so a crop at `origin` is the original scene
    pixel for pixel: the ground truth of an image extension. `base_size` is the scene's own height
    (the gradient's scale); it defaults to `height`.
    """
    base = np.array(COLORS[color_name], dtype=np.float32) * 0.55 + 60
    img = np.tile(base, (height, width, 1))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx -= origin[0]
    yy -= origin[1]
    if texture == "stripes":
        img += (((xx + yy) // (period / 2)) % 2)[..., None] * 30
    elif texture == "dots":
        img += ((((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < 4)[..., None] * 40
    elif texture == "gradient":
        img += (yy / (base_size or height) * 60 - 30)[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _background(size: int, rng: random.Random, color_name: str, texture: str) -> Image.Image:
    return render_background(size, size, color_name, texture, _texture_period(rng, texture))


def scene_spec(rng: random.Random, size: int, n_objects: int) -> dict:
    """A random scene: {"size", "background": {"color", "texture", "period"}, "objects": [...]}.

    Consumes `rng` exactly as the pool renderer always has, so pools keep their bytes."""
    bg_color = rng.choice(list(COLORS))
    texture = rng.choice(TEXTURES)
    period = _texture_period(rng, texture)
    objects = []
    for _ in range(n_objects):
        s = rng.randint(size // 5, size // 2)
        x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
        shape = rng.choice(SHAPES)
        color = rng.choice([c for c in COLORS if c != bg_color])
        objects.append({"shape": shape, "color": color, "box": [x0, y0, x0 + s, y0 + s]})
    return {"size": size, "background": {"color": bg_color, "texture": texture, "period": period},
            "objects": objects}


def render_scene(spec: dict, width: int | None = None, height: int | None = None,
                 origin: tuple[int, int] = (0, 0), objects: list[dict] | None = None) -> Image.Image:
    """Draw a scene spec: its background, then its objects in order (later ones on top).

    `width`/`height`/`origin` place the scene on a larger canvas (see `render_background`);
    `objects` replaces the spec's objects (e.g. the scene without the removed one)."""
    size = spec["size"]
    bg = spec["background"]
    img = render_background(width or size, height or size, bg["color"], bg["texture"], bg.get("period"),
                            origin, base_size=size)
    d = ImageDraw.Draw(img)
    ox, oy = origin
    for o in spec["objects"] if objects is None else objects:
        x0, y0, x1, y1 = o["box"]
        _draw_shape(d, o["shape"], (x0 + ox, y0 + oy, x1 + ox, y1 + oy), COLORS[o["color"]])
    return img


def caption_of(spec: dict) -> str:
    desc = " and ".join(f"a {o['color']} {o['shape']}" for o in spec["objects"])
    bg = spec["background"]
    return f"{desc} on a {bg['color']} {bg['texture']} background"


def make_image(rng: random.Random, size: int, n_objects: int):
    spec = scene_spec(rng, size, n_objects)
    bg = spec["background"]
    return render_scene(spec), caption_of(spec), dict(bg), spec["objects"]


def run(recipe, out, n: int, seed: int):
    if n < 1:
        raise InputError(f"need at least 1 image, got {n}", field="--n")
    out = Path(out)
    man = RunManifest("synth", out, recipe, seed=seed)
    rng = random.Random(seed)
    records = []
    from rich.progress import Progress

    with Progress(transient=True) as prog, man.timed("render"):
        task = prog.add_task("synth", total=n)
        for i in range(n):
            img, caption, bg, objects = make_image(rng, recipe.synth.size,
                                                   rng.randint(recipe.synth.min_objects, recipe.synth.max_objects))
            rel = f"images/{i:06d}.png"
            save_png(out / rel, img)
            records.append({"id": f"synth-{i:06d}", "path": rel, "caption": caption, "width": img.width,
                            "height": img.height, "background": bg, "objects": objects})
            prog.advance(task)
    write_jsonl(out / "manifest.jsonl", records)
    man.count(images=n)
    man.write()
    from rich.console import Console
    Console(stderr=True).print(f"synth: {n} images -> {out}/manifest.jsonl")
    return out / "manifest.jsonl"


def random_fill_prompt(rng: random.Random) -> str:
    return f"a {rng.choice(list(COLORS))} {rng.choice(SHAPES)}"


# ----------------------------------------------------------------------------------------------
# The oracle annotator
# ----------------------------------------------------------------------------------------------
def _as_float(img) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32) / 255.0


def _ring(mask: np.ndarray, width: int, outside: bool) -> np.ndarray:
    m = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    k = 2 * width + 1
    if outside:
        grown = np.asarray(m.filter(ImageFilter.MaxFilter(k))) > 0
        return grown & ~(mask > 0)
    shrunk = np.asarray(m.filter(ImageFilter.MinFilter(k))) > 0
    return (mask > 0) & ~shrunk


def prompted_color(prompt: str):
    """The RGB colour a prompt asks for ('a red circle' -> red), or None."""
    for name in COLORS:
        if re.search(rf"\b{name}\b", prompt or ""):
            return np.array(COLORS[name], dtype=np.float32) / 255.0
    return None


def _score_text_alignment(cand, mask, prompt):
    """Share of masked pixels within 0.25 (RGB distance, [0,1] scale) of the prompted colour."""
    target = prompted_color(prompt)
    inside = mask > 0
    if target is None or not inside.any():
        return 0.5
    dist = np.linalg.norm(cand[inside] - target, axis=-1)
    return float((dist < 0.25).mean())


def _score_consistency(src, cand, mask, width=2):
    """1 / (1 + 10 * seam error): seam = |mean colour just inside - just outside the mask border|, plus
    how much the kept region changed (it should not change at all)."""
    inner, outer = _ring(mask, width, False), _ring(mask, width, True)
    seam = 0.0
    if inner.any() and outer.any():
        seam = float(np.abs(cand[inner].mean(0) - cand[outer].mean(0)).mean())
    keep = mask == 0
    preserve = float(np.abs(cand[keep] - src[keep]).mean()) if keep.any() else 0.0
    return 1.0 / (1.0 + 10.0 * (seam + preserve))


def _laplacian_energy(x: np.ndarray, region: np.ndarray) -> float:
    g = x.mean(-1)
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    # Only where the whole stencil is inside the region: at the border it would measure the seam with
    # the untouched pixels (consistency's job) rather than the edit itself.
    r = region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    if not r.any():  # a region too thin for the stencil: use all of it
        r = region[1:-1, 1:-1]
    return float(lap[r].mean()) if r.any() else 0.0


def _score_structure(cand, mask):
    """1 / (1 + 20 * high-frequency energy inside the mask): clean shapes have little pixel noise."""
    return 1.0 / (1.0 + 20.0 * _laplacian_energy(cand, mask > 0))


def _score_aesthetics(cand, mask):
    """Half colourfulness (Hasler-Suesstrunk, scaled to [0,1]) of the whole image, half structure."""
    r, g, b = cand[..., 0], cand[..., 1], cand[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourful = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(0.5 * min(1.0, colourful / 0.4) + 0.5 * _score_structure(cand, mask))


def _score_removal(src, cand, mask, width=4):
    """exp(-8 * d): d = distance between the masked region's mean colour and that of a ring of
    background around it, plus the masked region's extra texture (std) over the ring's. An object left
    in place, or a new one painted in, stands out from its surroundings."""
    inside = mask > 0
    outer = _ring(mask, width, True)
    if not inside.any() or not outer.any():
        return 0.0
    d = float(np.abs(cand[inside].mean(0) - src[outer].mean(0)).mean())
    d += max(0.0, float(cand[inside].std(0).mean() - src[outer].std(0).mean()))
    return float(np.exp(-8.0 * d))


def oracle_scores(source, mask, candidate, dimensions, prompt: str = "") -> dict[str, float]:
    """Score one candidate edit on each requested dimension, in [0, 1], higher is better."""
    src, cand = _as_float(source), _as_float(candidate)
    m = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if m.shape != cand.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((cand.shape[1], cand.shape[0]), Image.NEAREST))
    if src.shape != cand.shape:
        src = _as_float(Image.fromarray((src * 255).astype(np.uint8)).resize((cand.shape[1], cand.shape[0])))
    fns = {
        "text alignment": lambda: _score_text_alignment(cand, m, prompt),
        "consistency": lambda: _score_consistency(src, cand, m),
        "structure": lambda: _score_structure(cand, m),
        "aesthetics": lambda: _score_aesthetics(cand, m),
        "removal quality": lambda: _score_removal(src, cand, m),
    }
    return {d: fns[d]() for d in dimensions}


def oracle_pick(scores: list[dict[str, float]], dimensions, margin: float = 0.02):
    """Best-of-N / Worst-of-N per dimension; None when the spread is below `margin` ("no difference")."""
    out = {}
    for d in dimensions:
        vals = [s[d] for s in scores]
        best, worst = int(np.argmax(vals)), int(np.argmin(vals))
        out[d] = None if (vals[best] - vals[worst]) < margin or best == worst else (best, worst)
    return out

"""`onereward generate`: task triplets (I_src, M, P) and N candidates each (paper §4.2).

Input: a curated.jsonl, a synth manifest.jsonl (or the folder holding either), a folder of images, or
a JSONL of triplets {id, source, mask?, prompt?, task?} with paths relative to the JSONL. A sample
without a task draws one from the recipe task mix; a sample without a mask gets one from the mask
builders in `tasks.py`. Object removal needs an object: a box of the pool (synth pools, curated
passthrough) or, for pools without boxes, a mask proposed by `models.segmenter` (SAM, chosen by area,
predicted IoU and stability); a removal sample with no acceptable object is skipped and counted in
run.json (`skipped_no_object`), never given a random rectangle; a user mask always wins.

Every candidate draws its seed and inference parameters (steps, guidance, true CFG, shift mu, negative
prompt) from the recipe ranges and records them, so any candidate can be regenerated alone with
`rollout.full_rollout`. A policy that carries inference settings of its own
(onereward_policy.json of an rl output, the OneReward release folders) uses them instead of the ranges,
and its own fixed prompts, except where `generate.override` forces a range (`policy_recipe`).

All randomness of a sample derives from (recipe seed, sample id), never from its position, so a re-run,
a `--limit`, or a split across ranks plans the same sample the same way. Everything is validated
before anything is written. Finished samples are appended to candidates.jsonl one record at a time;
a re-run skips ids already there. Under `accelerate launch` each rank takes every world-th pending
sample, appends to its own part file, and rank 0 merges the parts at the end.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .artifacts import (RunManifest, append_jsonl, open_image, read_jsonl, remove_stale_temps, save_png,
                        validate_record, write_jsonl)
from .errors import InputError
from .text_cache import TextCache, cache_root
from .tasks import (TASK_KEYS, canvas_size, check_mask, extend_canvas, fit_size, load_user_mask, random_fill_mask,
                    removal_mask, resize_mask, sample_task, task_prompt)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CANDIDATES = "candidates.jsonl"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

IMAGE_SCHEMA = {"id": ((str, int), True), "path": (str, True), "caption": (str, False), "objects": (list, False),
                "prompt": (str, False), "task": (str, False)}
TRIPLET_SCHEMA = {"id": ((str, int), True), "source": (str, True), "mask": (str, False), "prompt": (str, False),
                  "task": (str, False)}
CANDIDATES_SCHEMA = {"id": (str, True), "task": (str, True), "candidates": (list, True)}


# ----------------------------------------------------------------------------------------------
# Reading the input
# ----------------------------------------------------------------------------------------------
@dataclass
class InputItem:
    """One input line (or image file), before tasks and masks are decided."""
    id: str
    source: Path
    where: Path  # the file to name in errors
    line: int | None
    mask: Path | None = None
    prompt: str | None = None
    task: str | None = None
    caption: str | None = None
    boxes: list | None = None  # object boxes in source pixels (synth pools, curated passthrough)
    triplet: bool = False  # a triplet states its prompt; an image record may leave it to us


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _check_id(sid, where, line) -> str:
    sid = str(sid)
    if not _SAFE_ID.match(sid):
        raise InputError(f"id '{sid}' must be 1-128 characters of letters, digits, '.', '_' or '-' "
                         "(it names a folder)", path=where, line=line, field="id")
    return sid


def _boxes(objects, where, line):
    boxes = []
    for k, o in enumerate(objects or []):
        b = o.get("box") if isinstance(o, dict) else None
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                and b[2] > b[0] and b[3] > b[1]):
            raise InputError("expected an object with box [x0, y0, x1, y1] (x1 > x0, y1 > y0)", path=where,
                             line=line, field=f"objects[{k}].box")
        boxes.append([float(v) for v in b])
    return boxes


def _read_jsonl_input(f: Path) -> list[InputItem]:
    recs = read_jsonl(f)
    items = []
    for rec in recs:
        line = rec["_line"]
        if "source" in rec:
            validate_record(rec, TRIPLET_SCHEMA, path=f, line=line)
            items.append(InputItem(_check_id(rec["id"], f, line), _resolve(f.parent, rec["source"]), f, line,
                                   mask=_resolve(f.parent, rec["mask"]) if rec.get("mask") else None,
                                   prompt=rec.get("prompt"), task=rec.get("task"), triplet=True))
        elif "path" in rec:
            validate_record(rec, IMAGE_SCHEMA, path=f, line=line)
            items.append(InputItem(_check_id(rec["id"], f, line), _resolve(f.parent, rec["path"]), f, line,
                                   prompt=rec.get("prompt"), task=rec.get("task"), caption=rec.get("caption"),
                                   boxes=_boxes(rec.get("objects"), f, line) if rec.get("objects") else None))
        else:
            raise InputError("expected 'source' (a triplet) or 'path' (an image record)", path=f, line=line,
                             field="source")
    return items


def _read_folder(d: Path) -> list[InputItem]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in p.relative_to(d).parts))
    items = []
    for p in files:
        rel = p.relative_to(d).with_suffix("")
        sid = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(rel.parts)).lstrip("._-") or "image"
        cap = p.with_suffix(".txt")  # a sidecar caption, the usual convention for image folders
        caption = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.exists() else None
        items.append(InputItem(sid[:128], p, p, None, caption=caption or None))
    return items


def read_input(path) -> list[InputItem]:
    path = Path(path)
    if not path.exists():
        raise InputError("input not found", path=path)
    if path.is_dir():
        for name in ("curated.jsonl", "manifest.jsonl", "triplets.jsonl"):
            if (path / name).exists():
                return _read_jsonl_input(path / name)
        items = _read_folder(path)
        if not items:
            raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) in this folder", path=path)
        return items
    if path.suffix.lower() != ".jsonl":
        raise InputError("expected a .jsonl file or a folder of images", path=path)
    items = _read_jsonl_input(path)
    if not items:
        raise InputError("no samples", path=path)
    return items


# ----------------------------------------------------------------------------------------------
# Planning: task, prompt, mask recipe and candidate parameters of each sample
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    item: InputItem
    task: str
    user_prompt: str | None
    prompt: str
    candidates: list[dict] = field(default_factory=list)
    needs_object: bool = False               # removal without a user mask or a usable box
    object_mask: np.ndarray | None = None    # the segmenter's pick (uint8, generation size), undilated

    @property
    def id(self) -> str:
        return self.item.id


class NoObject(Exception):
    """A removal sample whose object mask must come from the segmenter (or that is skipped)."""


def _rng(seed: int, sid: str, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{sid}:{purpose}")  # str seeds hash with sha512: stable across runs


def draw_params(g, rng: random.Random) -> dict:
    """Seed and inference parameters of one candidate, uniform over the recipe ranges."""
    return {"seed": rng.randrange(2**31),
            "params": {"steps": rng.randint(int(g.steps[0]), int(g.steps[1])),
                       "guidance": round(rng.uniform(*g.guidance), 3),
                       "true_cfg": round(rng.uniform(*g.true_cfg), 3),
                       "shift": round(rng.uniform(*g.shift), 4),
                       "negative_prompt": rng.choice(list(g.negative_prompts))}}


def plan_sample(recipe, item: InputItem, n_candidates: int) -> Sample:
    """Decide task and prompts (validating them), and draw the candidates' parameters."""
    from .synth import random_fill_prompt

    rng = _rng(recipe.seed, item.id, "task")
    task = item.task
    user = (item.prompt or "").strip() or None
    # No usable prompt: a triplet without one, or any input whose prompt is given but empty.
    promptless = user is None and (item.triplet or item.prompt is not None)
    if task is not None:
        if task not in TASK_KEYS or task not in recipe.tasks:
            known = [k for k in TASK_KEYS if k in recipe.tasks]
            raise InputError(f"unknown task '{task}'; tasks: {', '.join(known)}", path=item.where, line=item.line,
                             field="task")
        if recipe.tasks[task].fixed_prompt is None and promptless:
            raise InputError(f"task '{task}' needs a non-empty prompt (or use a prompt-free task)",
                             path=item.where, line=item.line, field="prompt")
    else:
        pool = recipe.tasks
        if promptless:  # only prompt-free tasks fit
            pool = {k: t for k, t in recipe.tasks.items() if t.fixed_prompt is not None}
            if not any(t.probability > 0 for t in pool.values()):
                raise InputError("no prompt and the recipe has no prompt-free task", path=item.where,
                                 line=item.line, field="prompt")
        task = sample_task(pool, rng)
    tcfg = recipe.tasks[task]
    if tcfg.fixed_prompt is not None:
        user = None
    elif user is None:
        # Prompted task with no prompt given: synth pools prompt the fill with a shape they can judge
        # ("a red circle"); otherwise the caption; with neither, the shape prompt.
        if task == "fill" and item.boxes:
            user = random_fill_prompt(rng)
        else:
            user = item.caption or random_fill_prompt(rng)
    s = Sample(item, task, user, task_prompt(tcfg, user))
    prng = _rng(recipe.seed, item.id, "candidates")
    for k in range(n_candidates):
        s.candidates.append({"index": k, **draw_params(recipe.generate, prng)})
    return s


def build_condition(recipe, s: Sample, warn=None) -> tuple[Image.Image, np.ndarray]:
    """Source image at generation size and its mask (uint8, 255 = edit); deterministic per sample."""
    it = s.item
    res = recipe.generate.resolution
    mc = recipe.generate.masks
    rng = _rng(recipe.seed, it.id, "mask")
    src = open_image(it.source, where=it.where, line=it.line, field="source")
    if it.mask is not None:
        def on_resize(old, new):
            if warn:
                warn(f"{it.where}{':' + str(it.line) if it.line else ''}: mask is {old[0]}x{old[1]}, image is "
                     f"{new[0]}x{new[1]}; resized (nearest)")
        user_mask = load_user_mask(it.mask, src.size, where=it.where, line=it.line, on_resize=on_resize)
        size = fit_size(*src.size, res)
        mask = resize_mask(user_mask, size)
        # Check before dilation: a user mask that is all white stays an error for removal.
        check_mask(mask, s.task, path=it.where, line=it.line)
        if s.task == "removal":
            mask = removal_mask(size, user_mask=mask, dilate=mc.removal_dilate)
        return src.resize(size, Image.BICUBIC), mask
    if s.task in ("extend", "extend_no_prompt"):
        ratio = rng.uniform(mc.extend_min_ratio, mc.extend_max_ratio)
        direction = rng.choice(list(mc.extend_directions))
        size = fit_size(*canvas_size(*src.size, ratio, direction), res)
        canvas, mask = extend_canvas(src, ratio, direction, size=size)
        mask = np.asarray(mask, dtype=np.uint8).copy()
        src = canvas
    else:
        size = fit_size(*src.size, res)
        mask = None
        if s.task == "removal" and it.boxes:
            sx, sy = size[0] / src.size[0], size[1] / src.size[1]
            order = list(range(len(it.boxes)))
            rng.shuffle(order)
            for k in order:  # one object; skip any whose dilated box would cover everything
                x0, y0, x1, y1 = it.boxes[k]
                m = removal_mask(size, boxes=[[x0 * sx, y0 * sy, x1 * sx, y1 * sy]], dilate=mc.removal_dilate)
                if 0 < (m > 0).mean() < 1:
                    mask = m
                    break
        if mask is None and s.task == "removal":
            # Never a random rectangle: it would rarely hold an object, and the reward model would learn
            # "removal" from samples with nothing to remove.
            if s.object_mask is None:
                raise NoObject(it.id)
            mask = removal_mask(size, user_mask=resize_mask(s.object_mask, size), dilate=mc.removal_dilate)
        if mask is None:  # fill: a random region
            mask = random_fill_mask(size, rng, mc.fill_min_frac, mc.fill_max_frac, mc.stroke_probability)
        src = src.resize(size, Image.BICUBIC)
    check_mask(mask, s.task, path=it.where, line=it.line)
    return src, mask


def plan(recipe, input_path, n_candidates: int, limit: int = 0, warn=None) -> list[Sample]:
    """Read and validate every sample (images and masks included) before anything is written."""
    items = read_input(input_path)
    if limit and limit > 0:
        items = items[:limit]
    seen: dict[str, tuple] = {}
    samples = []
    for it in items:
        if it.id in seen:
            w, ln = seen[it.id]
            first = f" (first at {w}{':' + str(ln) if ln else ''})"
            raise InputError(f"duplicate sample id '{it.id}'{first}", path=it.where, line=it.line, field="id")
        seen[it.id] = (it.where, it.line)
        s = plan_sample(recipe, it, n_candidates)
        try:
            build_condition(recipe, s, warn)
        except NoObject:
            s.needs_object = True  # the source was read and checked; the mask comes later (segment_objects)
        samples.append(s)
    return samples


# ----------------------------------------------------------------------------------------------
# Object masks from the segmenter, for removal samples of pools without boxes
# ----------------------------------------------------------------------------------------------
SEGMENTS = "segments.jsonl"


def _read_segments(out: Path) -> dict[str, dict]:
    f = out / SEGMENTS
    return {r["id"]: r for r in read_jsonl(f, tolerate_torn_tail=True)} if f.exists() else {}


def segment_objects(recipe, samples: list[Sample], out: Path, device, dtype):
    """Give each sample that needs an object the segmenter's pick, or leave it without one (skipped).
    Picks are recorded in segments.jsonl (+ segments/<id>.png) as they are made, so a re-run or another
    rank never segments a sample twice."""
    from .models.segmenter import load_segmenter, propose_masks
    from .tasks import choose_object_mask

    mc = recipe.generate.masks
    done = _read_segments(out)
    todo = [s for s in samples if s.id not in done]
    gen = load_segmenter(recipe.models.segmenter, device=device, dtype=dtype) if todo else None
    for s in todo:
        src = open_image(s.item.source, where=s.item.where, line=s.item.line, field="source")
        size = fit_size(*src.size, recipe.generate.resolution)
        found = propose_masks(gen, src.resize(size, Image.BICUBIC), mc)
        # As with boxes: an object whose dilated mask would cover everything leaves no context to fill from.
        props = [(m, sc) for m, sc in found
                 if (removal_mask(size, user_mask=m, dilate=mc.removal_dilate) > 0).mean() < 1]
        pick = choose_object_mask(props, _rng(recipe.seed, s.id, "segment"), mc.segment_min_area,
                                  mc.segment_max_area)
        rec = {"id": s.id, "proposals": len(found), "mask": None}
        if pick is not None:
            rec["mask"] = f"segments/{s.id}.png"
            save_png(out / rec["mask"], Image.fromarray(pick))
        append_jsonl(out / SEGMENTS, rec)
        done[s.id] = rec
    del gen
    for s in samples:
        rec = done[s.id]
        if rec["mask"] is not None:
            s.object_mask = np.asarray(open_image(out / rec["mask"], mode="L"))


# ----------------------------------------------------------------------------------------------
# Resume bookkeeping
# ----------------------------------------------------------------------------------------------
def _part_path(out: Path, rank: int) -> Path:
    return out / f"candidates.part-{rank}.jsonl"


def _existing_records(out: Path) -> list[dict]:
    recs = []
    files = [out / CANDIDATES] + sorted(out.glob("candidates.part-*.jsonl"))
    for f in files:
        if f.exists():
            recs.extend(read_jsonl(f, CANDIDATES_SCHEMA, tolerate_torn_tail=True))
    return recs


def _check_existing(existing: list[dict], n_candidates: int, out: Path):
    for rec in existing:
        if len(rec["candidates"]) != n_candidates:
            raise InputError(f"sample '{rec['id']}' was generated with {len(rec['candidates'])} candidates, "
                             f"this run asks for {n_candidates}; use a new --out", path=out / CANDIDATES,
                             line=rec["_line"], field="candidates")


def merge_parts(out: Path, order: list[str]):
    """Fold part files into candidates.jsonl (input order first, then anything else), atomically."""
    parts = sorted(out.glob("candidates.part-*.jsonl"))
    if not parts:
        return
    by_id = {}
    for rec in _existing_records(out):
        by_id.setdefault(rec["id"], {k: v for k, v in rec.items() if not k.startswith("_")})
    rank = {sid: i for i, sid in enumerate(order)}
    ids = sorted(by_id, key=lambda s: (rank.get(s, len(rank)), s))
    write_jsonl(out / CANDIDATES, [by_id[s] for s in ids])
    for p in parts:
        p.unlink()


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def _to_tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _to_png(x) -> np.ndarray:
    # The pipeline's numpy_to_pil arithmetic: round(x * 255).
    return (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def sample_texts(samples) -> set[str]:
    """Every text the samples' candidates are conditioned on: prompts, and negatives under true CFG."""
    texts = set()
    for s in samples:
        texts.add(s.prompt)
        texts.update(c["params"]["negative_prompt"] for c in s.candidates if float(c["params"]["true_cfg"]) > 1.0)
    return texts


def generate_batch(pipe, jobs: list[dict], text):
    """Run one batch of candidates sharing size and step count; per-item seed, mu, guidance, CFG.
    `text` is the run's TextCache: only this batch's embeddings are read onto the device."""
    import torch

    from . import rollout

    images = torch.stack([j["image"] for j in jobs])
    masks = torch.stack([j["mask"] for j in jobs])
    params = [j["cand"]["params"] for j in jobs]
    cfg = [float(p["true_cfg"]) for p in params]
    need_neg = any(c > 1.0 for c in cfg)
    device = next(pipe.transformer.parameters()).device
    pos = text.get([j["prompt"] for j in jobs], device=device)
    neg = text.get([p["negative_prompt"] for p in params], device=device) if need_neg else None
    gens = [torch.Generator("cpu").manual_seed(int(j["cand"]["seed"])) for j in jobs]
    return rollout.full_rollout(pipe, images, masks, pos, int(params[0]["steps"]),
                                torch.tensor([float(p["guidance"]) for p in params]), gens,
                                true_cfg=torch.tensor(cfg), neg_embeds=neg,
                                mu=[float(p["shift"]) for p in params])


def _record(s: Sample, size) -> dict:
    d = f"images/{s.id}"
    return {"id": s.id, "task": s.task, "prompt": s.prompt, "user_prompt": s.user_prompt,
            "source": f"{d}/source.png", "mask": f"{d}/mask.png", "width": size[0], "height": size[1],
            "candidates": [{"index": c["index"], "path": f"{d}/cand_{c['index']}.png", "seed": c["seed"],
                            "params": dict(c["params"])} for c in s.candidates]}


def _dist_state(recipe):
    """accelerate's process state when launched on several processes (accelerate launch, torchrun),
    else None. Without a GPU (or with device: cpu) the ranks talk over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=recipe.device == "cpu" or not torch.cuda.is_available())
    if state.num_processes <= 1:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate found no process group; "
                         "launch with `accelerate launch` or `torchrun`", field="WORLD_SIZE")
    return state


def _device_dtype(recipe, state):
    import torch

    from .recipe import resolve_device, torch_dtype

    device = state.device if state is not None else torch.device(resolve_device(recipe.device))
    return device, torch_dtype(recipe.dtype)


def policy_recipe(recipe):
    """The recipe with the policy's own inference settings and fixed prompts in place of the generate
    ranges and the tasks' prompts (a fixed value v becomes the range [v, v]), unless generate.override
    forces a range. Returns (recipe, {key: "policy" | "recipe" | "override"})."""
    import dataclasses

    from .models.flux_fill import describe_policy, resolve_settings

    info = describe_policy(recipe.models.policy)
    g, own = recipe.generate, info.inference
    pinned = {k: (own[k], own[k]) for k in ("steps", "guidance", "true_cfg") if k in own}
    if "negative_prompt" in own:
        pinned["negative_prompts"] = (own["negative_prompt"],)
    if own.get("resolution"):
        pinned["resolution"] = own["resolution"]
    values, sources = resolve_settings(pinned, {k: getattr(g, k) for k in
                                                ("steps", "guidance", "true_cfg", "negative_prompts", "resolution")},
                                       dataclasses.asdict(g.override))
    tasks = {k: dataclasses.replace(t, fixed_prompt=info.prompts.get(k, t.fixed_prompt))
             if t.fixed_prompt is not None else t for k, t in recipe.tasks.items()}
    return dataclasses.replace(recipe, generate=dataclasses.replace(g, **values), tasks=tasks), sources


def run(recipe, input, out, candidates: int, limit: int = 0):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .models.flux_fill import load_fill_pipeline

    console = Console(stderr=True)
    out = Path(out)
    if candidates < 2:
        raise InputError("need at least 2 candidates to pick a best and a worst", field="--candidates")
    if limit < 0:
        raise InputError(f"must be >= 0 (0 = all), got {limit}", field="--limit")
    recipe, sources = policy_recipe(recipe)
    state = _dist_state(recipe)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    warn = (lambda m: console.print(f"[yellow]warning:[/] {m}", highlight=False)) if is_main else None
    man = RunManifest("generate", out, recipe, inputs={"input": input})
    with man.timed("plan"):
        samples = plan(recipe, input, candidates, limit, warn)
        existing = _existing_records(out) if out.exists() else []
        _check_existing(existing, candidates, out)
    if state is not None:
        state.wait_for_everyone()  # every rank has read the same done set before anyone appends
    if world == 1:  # temp files of writes a kill interrupted (with several ranks, others may be writing)
        remove_stale_temps(out)
    done = {r["id"] for r in existing}
    pending = [s for s in samples if s.id not in done]
    g = recipe.generate
    # Split by position in the input, not among pending samples, so a rank's share never depends on
    # what the others have finished already. Chunks (and so batches, whose numerics differ slightly
    # with their make-up) come from that full ordered share too: a resumed run forms exactly the
    # batches of an uninterrupted one, skipping finished chunks and redoing a partly written one.
    per_chunk = max(1, (4 * g.batch_size) // candidates)  # enough jobs to fill batches of equal steps

    def chunks_of(r):
        share = samples[r::world]
        chunks = [share[c:c + per_chunk] for c in range(0, len(share), per_chunk)]
        return [c for c in chunks if any(s.id not in done for s in c)]

    chunks = chunks_of(rank)
    # Every text any rank will need (rank 0 encodes them all into the shared cache).
    run_texts = sample_texts(s for r in range(world) for c in chunks_of(r) for s in c)
    need = [s for c in chunks for s in c if s.needs_object]
    if need and recipe.models.segmenter:  # picks are cached in segments.jsonl: done samples cost nothing
        with man.timed("segment"):
            segment_objects(recipe, need, out, *_device_dtype(recipe, state))
    chunks = [[s for s in c if not s.needs_object or s.object_mask is not None] for c in chunks]
    chunks = [c for c in chunks if any(s.id not in done for s in c)]
    target = out / CANDIDATES if world == 1 else _part_path(out, rank)
    if is_main and done:
        console.print(f"generate: {len(samples) - len(pending)} of {len(samples)} samples already in "
                      f"{out / CANDIDATES}; resuming", highlight=False)

    pipe = text = None
    if chunks or (is_main and run_texts):  # rank 0 encodes for every rank, even with no work of its own
        device, dtype = _device_dtype(recipe, state)
        with man.timed("load"):
            pipe = load_fill_pipeline(recipe.models.policy, device=device, dtype=dtype,
                                      default_base=recipe.models.fill_pipeline or None)
            pipe.set_progress_bar_config(disable=True)
    if is_main and run_texts:
        with man.timed("encode"):  # every text of the run, into the (shared) cache
            text = TextCache(cache_root(recipe, out), pipe, g.max_sequence_length, recipe.text_cache.batch_size)
            text.ensure(run_texts)
    if state is not None:
        state.wait_for_everyone()  # the other ranks read what rank 0 encoded
    if chunks:
        if text is None:
            text = TextCache(cache_root(recipe, out), pipe, g.max_sequence_length, recipe.text_cache.batch_size)
            text.ensure(sample_texts(s for c in chunks for s in c))  # normally none left: rank 0 did them
        cols = [TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("candidates"),
                TimeRemainingColumn()]
        with Progress(*cols, console=console, transient=True, disable=not is_main) as prog, man.timed("generate"):
            bar = prog.add_task("generate", total=sum(len(c) for c in chunks) * candidates)
            for chunk in chunks:
                _run_chunk(pipe, recipe, chunk, text, out, target, prog, bar, skip=done)
    if state is not None:
        state.wait_for_everyone()
    if is_main:
        merge_parts(out, [s.id for s in samples])
        final = read_jsonl(out / CANDIDATES, CANDIDATES_SCHEMA, tolerate_torn_tail=True) \
            if (out / CANDIDATES).exists() else []
        per_task: dict[str, int] = {}
        for r in final:
            per_task[r["task"]] = per_task.get(r["task"], 0) + 1
        segs = _read_segments(out) if recipe.models.segmenter else {}
        no_object = [s.id for s in pending if s.needs_object and (segs.get(s.id) or {}).get("mask") is None]
        if no_object:
            how = (f"{recipe.models.segmenter} found no object within the area/IoU/stability bounds "
                   "(generate.masks.segment_*)" if recipe.models.segmenter else
                   "no object boxes or mask, and no models.segmenter to find one")
            console.print(f"[yellow]warning:[/] {len(no_object)} removal sample(s) skipped: {how}", highlight=False)
        man.count(samples=len(samples), generated_samples=len(pending) - len(no_object),
                  skipped_samples=len(samples) - len(pending), skipped_no_object=len(no_object),
                  segmented_objects=sum(1 for s in pending if s.needs_object and s.id not in no_object
                                        and s.id in segs),
                  candidates_per_sample=candidates, per_task=per_task, ranks=world)
        g = recipe.generate
        man.set(output=str(out / CANDIDATES),
                inference={"steps": g.steps, "guidance": g.guidance, "true_cfg": g.true_cfg,
                           "negative_prompts": g.negative_prompts, "resolution": g.resolution, "from": sources})
        man.write()
        console.print(f"generate: {len(pending) - len(no_object)} new, {len(samples) - len(pending)} skipped"
                      + (f", {len(no_object)} without an object" if no_object else "") + f" -> {out / CANDIDATES}",
                      highlight=False)
    return out / CANDIDATES


def _run_chunk(pipe, recipe, chunk: list[Sample], text, out: Path, target: Path, prog, bar, skip=frozenset()):
    """Generate every candidate of a few samples, batched by (size, steps, CFG on/off); append the
    records of those not in `skip` (finished before a resume: generated again only to batch alike)."""
    import torch

    jobs, conds = [], {}
    for s in chunk:
        src, mask = build_condition(recipe, s)
        conds[s.id] = (src, mask)
        x, m = _to_tensor(src), torch.from_numpy((mask > 0).astype(np.float32))[None]
        for c in s.candidates:
            jobs.append({"sample": s, "cand": c, "image": x, "mask": m, "prompt": s.prompt})
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        p = j["cand"]["params"]
        key = (tuple(j["image"].shape), int(p["steps"]), float(p["true_cfg"]) > 1.0)
        groups.setdefault(key, []).append(j)
    results: dict[tuple[str, int], np.ndarray] = {}
    bs = recipe.generate.batch_size
    for key in sorted(groups, key=str):
        group = groups[key]
        for b0 in range(0, len(group), bs):
            batch = group[b0:b0 + bs]
            imgs = generate_batch(pipe, batch, text)
            for j, im in zip(batch, imgs):
                results[(j["sample"].id, j["cand"]["index"])] = _to_png(im)
            prog.advance(bar, len(batch))
    for s in chunk:
        if s.id in skip:
            continue
        src, mask = conds[s.id]
        d = out / "images" / s.id
        save_png(d / "source.png", src.convert("RGB"))
        save_png(d / "mask.png", Image.fromarray(mask))  # uint8 (H, W): mode L
        for c in s.candidates:
            save_png(d / f"cand_{c['index']}.png", results[(s.id, c["index"])])
        append_jsonl(target, _record(s, src.size))  # last: a sample counts as done only when complete

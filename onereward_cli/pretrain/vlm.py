"""Pretraining the tiny Qwen2.5-VL reward base: visual question answering through its own LM head.

Supervised next-token training on the assistant answer of chat-template conversations built by the
model's own processor (`AutoProcessor`: image resizing, placeholder expansion, `mm_token_type_ids`),
so the model perceives the synthetic world before it sees any preference pair:

- one image: background colour and texture, object count, the shape of the <colour> object, the
  colour of the <shape>, "is there a <colour> <shape>?", where an object is, a caption, and whether
  the image is noisy or blurry (world scenes, edit targets and degraded copies);
- two images: "same background?", "which shows more objects?", "is there a <colour> <shape> in the
  first/second image?", "which image is noisy?".

Answers are words; accuracy is exact match of the greedy answer (`model.generate`) on held-out
questions, per question kind. Nothing here is a preference between edits.

Before the question answering, the vision tower is warmed up on its own (`vit_warmup`), as Qwen2.5-VL's
own recipe pretrains its ViT before vision-language alignment: from scratch at toy size, the LM's
attention over an image's 16 tokens starts as an average that washes a small object out, and question
answering alone names an object's shape about a third of the time after 1600 steps (BENCHMARKS.md).
The warm-up trains the ViT through a max-pooled linear head that names a single object's shape, then
discards the head. `vit_head="tokens"` (not the shipped zoo's yet) trains every merged token to name the
(colour, shape) of the object under it instead, which the compositional questions need.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .. import synth
from . import world
from .loop import LoopConfig, step_rng, train

LARGE_OBJECT_SHARE = 0.5
NUMBERS = {1: "one", 2: "two", 3: "three"}
# Question kinds and how often each is drawn. Shape questions are weighted up (object_shape 6; was 2): at
# 13 % of the stream they were 12 % right after 500 steps, at 35 % 72 %. The compositional kinds (shape of a
# named colour, colour of a named shape, "is there a <colour> <shape>?") are weighted up too (shape 3 -> 6,
# colour 1.5 -> 6, exists 1 -> 3, exists_in 0.5 -> 1.5): on the per-token warm-up's vision tokens that lifts
# them from 67 / 65 % to 79 / 88 % (on the max-pooled warm-up's tokens it did not help; BENCHMARKS.md).
KINDS = {"object_colour": 2, "object_shape": 6, "background": 1, "texture": 1, "count": 1, "shape": 6,
         "colour": 6, "exists": 3, "position": 0.25, "caption": 0.25, "noisy": 1.5, "blurry": 1,
         "same_background": 1, "more_objects": 0.5, "exists_in": 1.5, "which_noisy": 1.5, "which_blurry": 1,
         "more_colour": 1.5}


def _degrade(img: Image.Image, rng: random.Random, kind: str) -> Image.Image:
    if kind == "noisy":
        a = np.asarray(img, dtype=np.float32)
        sigma = rng.uniform(20, 60)
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, a.shape)
        if rng.random() < 0.5:  # noise in a region only, as a botched edit has it
            h, w = a.shape[:2]
            y0, x0 = rng.randint(0, h // 2), rng.randint(0, w // 2)
            region = np.zeros(a.shape[:2], bool)
            region[y0:y0 + h // 2, x0:x0 + w // 2] = True
            noise *= region[..., None]
        return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0)))


def _scene_image(rng: random.Random, cfg: world.WorldConfig) -> tuple[Image.Image, dict]:
    """A scene (sometimes an extension canvas's whole scene, so other aspect ratios occur)."""
    spec = world.random_scene(rng, cfg)
    if rng.random() < 0.2:
        t = world.extend_triplet(rng, cfg, spec=spec)
        return t.target, spec
    return synth.render_scene(spec), spec


def _unique(objs, key):
    vals = [o[key] for o in objs]
    return [o for o in objs if vals.count(o[key]) == 1]


def _position(o, size) -> str:
    x0, y0, x1, y1 = o["box"]
    dx, dy = (x0 + x1) / 2 / size - 0.5, (y0 + y1) / 2 / size - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _absent(rng: random.Random, objs) -> tuple[str, str]:
    present = {(o["color"], o["shape"]) for o in objs}
    while True:
        c, s = rng.choice(list(synth.COLORS)), rng.choice(synth.SHAPES)
        if (c, s) not in present:
            return c, s


def single_object_spec(rng: random.Random, cfg: world.WorldConfig) -> dict:
    """A one-object scene; with probability LARGE_OBJECT_SHARE the object is enlarged (a shape is learnt
    faster big)."""
    spec = synth.scene_spec(rng, cfg.size, 1)
    if rng.random() < LARGE_OBJECT_SHARE:
        s = rng.randint(cfg.size // 3, cfg.size * 7 // 8)
        x0, y0 = rng.randint(0, cfg.size - s), rng.randint(0, cfg.size - s)
        spec["objects"][0]["box"] = [x0, y0, x0 + s, y0 + s]
    return spec


def make_example(kind: str, rng: random.Random, cfg: world.WorldConfig):
    """(images, question, answer) of one kind, or None when the scene cannot ask it (retry)."""
    if kind in ("object_colour", "object_shape"):  # one object: what it is, before which one is which
        spec = single_object_spec(rng, cfg)
        o = spec["objects"][0]
        if kind == "object_colour":
            return [synth.render_scene(spec)], "What colour is the object?", o["color"]
        return [synth.render_scene(spec)], "What shape is the object?", o["shape"]
    if kind in ("is_colour", "is_shape"):  # one object: does a named attribute match what is seen?
        spec = single_object_spec(rng, cfg)
        o, key = spec["objects"][0], "color" if kind == "is_colour" else "shape"
        names = list(synth.COLORS) if key == "color" else list(synth.SHAPES)
        yes = rng.random() < 0.5
        v = o[key] if yes else rng.choice([n for n in names if n != o[key]])
        q = f"Is the object {v}?" if key == "color" else f"Is the object {_a(v)}?"
        return [synth.render_scene(spec)], q, "yes" if yes else "no"
    img, spec = _scene_image(rng, cfg)
    objs, bg = spec["objects"], spec["background"]
    if kind in ("has_colour", "has_shape"):  # several objects: is a named attribute anywhere?
        key = "color" if kind == "has_colour" else "shape"
        names = list(synth.COLORS) if key == "color" else list(synth.SHAPES)
        present = {o[key] for o in objs}
        absent = [n for n in names if n not in present]
        yes = rng.random() < 0.5 or not absent
        v = rng.choice(sorted(present)) if yes else rng.choice(absent)
        q = f"Is there {_a(v)} object?" if key == "color" else f"Is there {_a(v)}?"
        return [img], q, "yes" if yes else "no"
    if kind == "background":
        return [img], "What colour is the background?", bg["color"]
    if kind == "texture":
        return [img], "What texture is the background?", bg["texture"]
    if kind == "count":
        return [img], "How many objects are there?", NUMBERS[len(objs)]
    if kind == "shape":
        u = _unique(objs, "color")
        if not u:
            return None
        o = rng.choice(u)
        return [img], f"What shape is the {o['color']} object?", o["shape"]
    if kind == "colour":
        u = _unique(objs, "shape")
        if not u:
            return None
        o = rng.choice(u)
        return [img], f"What colour is the {o['shape']}?", o["color"]
    if kind == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return [img], f"Is there a {o['color']} {o['shape']}?", "yes"
        c, s = _absent(rng, objs)
        return [img], f"Is there a {c} {s}?", "no"
    if kind == "position":
        u = [o for o in _unique(objs, "color") if o in _unique(objs, "shape")]
        if not u:
            return None
        o = rng.choice(u)
        return [img], f"Where is the {o['color']} {o['shape']}?", _position(o, spec["size"])
    if kind == "caption":
        return [img], "Describe the image.", synth.caption_of(spec)
    if kind in ("noisy", "blurry"):
        yes = rng.random() < 0.5
        return [_degrade(img, rng, kind) if yes else img], f"Is the image {kind}?", "yes" if yes else "no"
    img2, spec2 = _scene_image(rng, cfg)
    if kind == "same_background":
        if rng.random() < 0.5:  # the same background, other objects
            spec2 = dict(spec2, background=dict(bg))
            img2 = synth.render_scene(spec2)
            ans = "yes"
        else:
            ans = "yes" if spec2["background"]["color"] == bg["color"] and \
                spec2["background"]["texture"] == bg["texture"] else "no"
        return [img, img2], "Do both images have the same background?", ans
    if kind == "more_objects":
        if len(objs) == len(spec2["objects"]):
            return None
        return [img, img2], "Which image shows more objects? Answer first or second.", \
            "first" if len(objs) > len(spec2["objects"]) else "second"
    if kind == "exists_in":
        which = rng.choice(["first", "second"])
        target = objs if which == "first" else spec2["objects"]
        if rng.random() < 0.5:
            o = rng.choice(target)
            c, s, ans = o["color"], o["shape"], "yes"
        else:
            (c, s), ans = _absent(rng, target), "no"
        return [img, img2], f"Is there a {c} {s} in the {which} image?", ans
    if kind in ("which_noisy", "which_blurry"):
        what = kind[6:]
        first = rng.random() < 0.5
        a, b = (_degrade(img, rng, what), img2) if first else (img, _degrade(img2, rng, what))
        return [a, b], f"Which image is {what}? Answer first or second.", "first" if first else "second"
    if kind == "more_colour":
        c = rng.choice([o["color"] for o in objs + spec2["objects"]])
        rgb = np.array(synth.COLORS[c], dtype=np.float32)
        share = [float((np.abs(np.asarray(im, dtype=np.float32) - rgb).sum(-1) < 30).mean()) for im in (img, img2)]
        if abs(share[0] - share[1]) < 0.02:
            return None
        return [img, img2], f"Which image shows more {c}? Answer first or second.", \
            "first" if share[0] > share[1] else "second"
    raise ValueError(kind)


def draw_examples(rng: random.Random, cfg: world.WorldConfig, n: int, kinds=None):
    kinds = kinds or KINDS
    names = list(kinds)
    weights = [kinds[k] for k in names] if isinstance(kinds, dict) else [1.0] * len(names)
    out = []
    while len(out) < n:
        ex = make_example(rng.choices(names, weights=weights)[0], rng, cfg)
        if ex is not None:
            out.append(ex)
    return out


def _messages(n_images: int, question: str):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def sft_batch(processor, examples, device="cpu"):
    """Processor inputs for prompt + answer, with labels on the answer tokens (and <|im_end|>) only."""
    tok = processor.tokenizer
    texts, images, n_answer = [], [], []
    for ims, q, a in examples:
        p = processor.apply_chat_template(_messages(len(ims), q), tokenize=False, add_generation_prompt=True)
        texts.append(p + a + tok.eos_token)
        # The answer follows "assistant\n", a pre-token boundary: it tokenizes the same on its own.
        n_answer.append(len(tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]))
        images += ims
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        inp = processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    labels = torch.full_like(inp["input_ids"], -100)
    lengths = inp["attention_mask"].sum(1).tolist()
    for i, (n, L) in enumerate(zip(n_answer, lengths)):
        labels[i, L - n:L] = inp["input_ids"][i, L - n:L]
    inp["labels"] = labels
    return {k: v.to(device) for k, v in inp.items()}


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, averaged per example, then over the batch (a
    caption's twenty tokens do not outweigh a one-word answer)."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    keep = (target != -100).float()
    return ((ce * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def answer(model, processor, examples, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers through `model.generate`, left-padded as generation needs."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(_messages(len(ims), q), tokenize=False, add_generation_prompt=True)
             for ims, q, _ in examples]
    images = [im for ims, _, _ in examples for im in ims]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        inp = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
    finally:
        tok.padding_side = side
    out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [s.strip() for s in tok.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)]


def heldout(cfg: world.WorldConfig, per_kind: int = 40, seed: int = 20_000):
    """Held-out questions on the pool's own scene distribution (no enlarged objects)."""
    global LARGE_OBJECT_SHARE
    rng = random.Random(f"vlm-heldout:{seed}")
    share, LARGE_OBJECT_SHARE = LARGE_OBJECT_SHARE, 0.0
    try:
        return {k: draw_examples(rng, cfg, per_kind, kinds=(k,)) for k in KINDS}
    finally:
        LARGE_OBJECT_SHARE = share


def accuracy(model, processor, held: dict, batch: int = 32) -> dict[str, float]:
    out = {}
    for kind, exs in held.items():
        preds = []
        for i in range(0, len(exs), batch):
            preds += answer(model, processor, exs[i:i + batch])
        out[kind] = float(np.mean([p == a for p, (_, _, a) in zip(preds, exs)]))
    return out


def run(model, processor, work: Path, cfg: world.WorldConfig, loop: LoopConfig, *, seed: int, batch: int = 32,
        resume: bool = True, console=None, eval_per_kind: int = 20, vit_loop: LoopConfig | None = None,
        vit_head: str = "shape", token_aux: float = 0.0, token_batch: int = 8) -> dict:
    """The vision warm-up (when `vit_loop` has steps; WORK/vit), then question answering (WORK).

    `token_aux` > 0 keeps the per-token head's loss (on `token_batch` more scenes a step, times
    `token_aux`) beside the answer loss during question answering, so the tokens keep naming their
    object while the LM learns to read them; with `vit_head="tokens"` the head is the warm-up's."""
    vit = None
    width = model.model.visual.merger.mlp[-1].out_features
    probe = ViTTokenProbe(width, seed) if token_aux > 0 else None
    if vit_loop is not None and vit_loop.steps:
        vit = vit_warmup(model, processor, work / "vit", cfg, vit_loop, seed=seed, batch=batch, resume=resume,
                         console=console, eval_n=4 * eval_per_kind, head=vit_head,
                         probe=probe if vit_head == "tokens" else None)
    model.requires_grad_(True)
    held = heldout(cfg, eval_per_kind)

    def loss_fn(step):
        rng, _ = step_rng(seed, "vlm", step)
        loss = answer_loss(model, sft_batch(processor, draw_examples(rng, cfg, batch), model.device))
        if probe is None:
            return loss, {}
        aux = vit_token_loss(model, probe, processor, vit_token_examples(rng, cfg, token_batch))
        return loss + token_aux * aux, {"token_loss": aux.item()}

    def evaluate():
        return {f"acc/{k}": v for k, v in accuracy(model, processor, held).items()}

    modules = {"model": model, **({"probe": probe} if probe is not None else {})}
    log = train("vlm", work, modules, loop, loss_fn, seed=seed, resume=resume, evaluate=evaluate,
                eval_every=loop.save_every, console=console)
    model.requires_grad_(False)
    return {"steps": loop.steps, "log": log[-1] if log else {}, **({"vit": vit} if vit else {})}


# --- vision warm-up --------------------------------------------------------------------------------------
# One head: the shape of a scene's single object (half of them large, as object_shape draws them).
# Shape only, on purpose: with colour, background, texture and count heads beside it (tried), those
# easy losses took the clipped gradient and the shape loss stayed at chance for 1000 steps; question
# answering learns those on its own anyway (colours and backgrounds reach 100 % without a warm-up).


class ViTProbe(torch.nn.Module):
    """A linear head on the max over an image's merged vision tokens (max, not mean: a small object is a
    few tokens of sixteen). Training-time only; it never ships."""

    n_out = len(synth.SHAPES)

    def __init__(self, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = torch.nn.Linear(width, self.n_out)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) / width ** 0.5)
            self.head.bias.zero_()

    def forward(self, tokens: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
        counts = (grid_thw.prod(-1) // merge ** 2).tolist()
        return self.head(torch.stack([t.amax(0) for t in tokens.split(counts)]))


def vit_examples(rng: random.Random, cfg: world.WorldConfig, n: int) -> list[tuple[Image.Image, int]]:
    """(image, shape index) of single-object scenes, drawn as the object_shape questions draw them."""
    specs = [single_object_spec(rng, cfg) for _ in range(n)]
    return [(synth.render_scene(sp), synth.SHAPES.index(sp["objects"][0]["shape"])) for sp in specs]


def vit_logits(model, probe: torch.nn.Module, processor, images, ip=None) -> torch.Tensor:
    ip = ip if ip is not None else processor.image_processor(images=images, return_tensors="pt")
    visual = model.model.visual
    grid = ip["image_grid_thw"].to(model.device)
    tokens = visual(ip["pixel_values"].to(model.device, visual.dtype), grid_thw=grid).pooler_output
    return probe(tokens, grid, visual.spatial_merge_size).float()


def vit_loss(model, probe, processor, examples) -> torch.Tensor:
    logits = vit_logits(model, probe, processor, [im for im, _ in examples])
    return torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in examples], device=logits.device))


@torch.no_grad()
def vit_accuracy(model, probe, processor, examples, batch: int = 32) -> float:
    hits = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        pred = vit_logits(model, probe, processor, [im for im, _ in chunk]).argmax(1).tolist()
        hits += [p == y for p, (_, y) in zip(pred, chunk)]
    return float(np.mean(hits))


# --- the per-token head (`vit_head="tokens"`) ---------------------------------------------------------
# Each merged token names the (colour, shape) of the object that covers it, or "none". A probe on the
# max-pool warm-up's tokens decodes an object's shape from its own tokens 60 % of the time in scenes of
# up to three objects (colour 85 %): the max-pool head teaches "which shape is somewhere", not "which
# shape is here", and binding a colour to a shape needs the second. One joint class per token, not a
# colour head beside a shape head: in the image-level warm-up, easy heads beside the shape head took the
# clipped gradient (tried). BENCHMARKS.md, "Binding a colour to a shape".

TOKEN_NONE = len(synth.COLORS) * len(synth.SHAPES)  # class index of a token no object covers
TOKEN_COVER, TOKEN_EMPTY = 0.25, 0.05  # a token is its object's from 25 % cover; below 5 % it is "none"


def token_labels(spec: dict, grid_h: int, grid_w: int) -> np.ndarray:
    """The class of each merged token (raster order) of a square scene: colour * len(SHAPES) + shape of the
    object owning most of the token's pixels (later objects drawn on top own theirs), TOKEN_NONE where
    objects cover under TOKEN_EMPTY, -100 (ignored) in between."""
    size, objs = spec["size"], spec["objects"]
    owner = np.full((size, size), -1, np.int64)
    for i, o in enumerate(objs):
        m = Image.new("L", (size, size), 0)
        synth._draw_shape(ImageDraw.Draw(m), o["shape"], o["box"], 255)
        owner[np.asarray(m) > 127] = i
    ys, xs = np.linspace(0, size, grid_h + 1).round().astype(int), np.linspace(0, size, grid_w + 1).round().astype(int)
    colours = list(synth.COLORS)
    out = np.full(grid_h * grid_w, -100, np.int64)
    for r in range(grid_h):
        for c in range(grid_w):
            blk = owner[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
            shares = [float((blk == i).mean()) for i in range(len(objs))]
            best = int(np.argmax(shares)) if shares else -1
            if not shares or sum(shares) < TOKEN_EMPTY:
                out[r * grid_w + c] = TOKEN_NONE
            elif shares[best] >= TOKEN_COVER:
                o = objs[best]
                out[r * grid_w + c] = colours.index(o["color"]) * len(synth.SHAPES) + synth.SHAPES.index(o["shape"])
    return out


class ViTTokenProbe(ViTProbe):
    """A linear head on every merged vision token. Training-time only; it never ships."""

    n_out = TOKEN_NONE + 1

    def forward(self, tokens: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
        return self.head(tokens)


def vit_token_examples(rng: random.Random, cfg: world.WorldConfig, n: int) -> list[tuple[Image.Image, dict]]:
    """(image, spec) of square scenes: half the pool's own scenes (up to three objects), half single
    objects drawn as object_shape draws them."""
    specs = [world.random_scene(rng, cfg) if rng.random() < 0.5 else single_object_spec(rng, cfg) for _ in range(n)]
    return [(synth.render_scene(sp), sp) for sp in specs]


def token_targets(processor, grid: torch.Tensor, specs) -> torch.Tensor:
    """`token_labels` of each scene, concatenated in the order of the processor's merged tokens."""
    m = processor.image_processor.merge_size
    return torch.from_numpy(np.concatenate([token_labels(sp, int(g[1]) // m, int(g[2]) // m)
                                            for sp, g in zip(specs, grid)]))


def vit_token_loss(model, probe, processor, examples) -> torch.Tensor:
    ip = processor.image_processor(images=[im for im, _ in examples], return_tensors="pt")
    logits = vit_logits(model, probe, processor, None, ip)
    target = token_targets(processor, ip["image_grid_thw"], [sp for _, sp in examples]).to(logits.device)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)


@torch.no_grad()
def vit_token_accuracy(model, probe, processor, examples, batch: int = 32) -> float:
    """Accuracy of the joint (colour, shape) class on the tokens an object owns."""
    hits = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ip = processor.image_processor(images=[im for im, _ in chunk], return_tensors="pt")
        pred = vit_logits(model, probe, processor, None, ip).argmax(1)
        y = token_targets(processor, ip["image_grid_thw"], [sp for _, sp in chunk]).to(pred.device)
        keep = (y != -100) & (y != TOKEN_NONE)
        hits += (pred[keep] == y[keep]).tolist()
    return float(np.mean(hits))


WARMUP_HEADS = {"shape": (ViTProbe, vit_examples, vit_loss, vit_accuracy),
                "tokens": (ViTTokenProbe, vit_token_examples, vit_token_loss, vit_token_accuracy)}


def vit_warmup(model, processor, work: Path, cfg: world.WorldConfig, loop: LoopConfig, *, seed: int,
               batch: int = 32, resume: bool = True, console=None, eval_n: int = 64, head: str = "shape",
               probe: torch.nn.Module | None = None) -> dict:
    """Train the vision tower (and its merger) alone through a probe head (`WARMUP_HEADS`; `probe`, when
    given, is the head to train); the LM is untouched."""
    if head not in WARMUP_HEADS:
        raise ValueError(f"unknown warm-up head {head!r} (known: {', '.join(WARMUP_HEADS)})")
    probe_cls, examples, loss_of, accuracy_of = WARMUP_HEADS[head]
    model.requires_grad_(False)
    model.model.visual.requires_grad_(True)
    probe = probe if probe is not None else probe_cls(model.model.visual.merger.mlp[-1].out_features, seed)
    probe.requires_grad_(True)
    held = examples(random.Random(f"vit-heldout:{seed}"), cfg, eval_n)

    def loss_fn(step):
        rng, _ = step_rng(seed, "vit", step)
        return loss_of(model, probe, processor, examples(rng, cfg, batch)), {}

    def evaluate():
        return {"acc/shape" if head == "shape" else "acc/token": accuracy_of(model, probe, processor, held)}

    log = train("vit", work, {"visual": model.model.visual, "probe": probe}, loop, loss_fn, seed=seed,
                resume=resume, evaluate=evaluate, eval_every=loop.save_every, console=console)
    model.requires_grad_(False)
    return {"steps": loop.steps, "log": log[-1] if log else {}}

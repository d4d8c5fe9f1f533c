"""Pretraining the tiny open_clip model: the symmetric image-caption contrastive loss (CLIP).

World scenes (and whole extension scenes, for other aspect ratios) with their captions, through
open_clip's own preprocess transform and tokenizer. A scene's caption names every object and the
background, so curation's clusters come to follow content. Evaluation: image -> caption retrieval
top-1 among held-out scenes (chance = 1 / n).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import synth
from . import world
from .loop import LoopConfig, step_rng, train


def draw_pairs(rng: random.Random, cfg: world.WorldConfig, n: int):
    out = []
    for _ in range(n):
        spec = world.random_scene(rng, cfg)
        img = world.extend_triplet(rng, cfg, spec=spec).target if rng.random() < 0.2 else synth.render_scene(spec)
        out.append((img, synth.caption_of(spec)))
    return out


def contrastive_loss(model, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.t()
    labels = torch.arange(len(images), device=images.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def retrieval_top1(model, preprocess, tokenizer, pairs) -> float:
    """Share of images whose nearest caption (cosine) is their own; captions may repeat, and a tie
    with an identical caption counts as right."""
    img = model.encode_image(torch.stack([preprocess(im) for im, _ in pairs]), normalize=True)
    caps = [c for _, c in pairs]
    txt = model.encode_text(tokenizer(caps), normalize=True)
    best = (img @ txt.t()).argmax(1).tolist()
    return float(np.mean([caps[b] == caps[i] for i, b in enumerate(best)]))


def heldout(cfg: world.WorldConfig, n: int = 100, seed: int = 30_000):
    return draw_pairs(random.Random(f"clip-heldout:{seed}"), cfg, n)


def run(model, preprocess, tokenizer, work: Path, cfg: world.WorldConfig, loop: LoopConfig, *, seed: int,
        batch: int = 64, resume: bool = True, console=None, eval_n: int = 100) -> dict:
    model.requires_grad_(True)
    held = heldout(cfg, eval_n)

    def loss_fn(step):
        rng, _ = step_rng(seed, "clip", step)
        pairs = draw_pairs(rng, cfg, batch)
        images = torch.stack([preprocess(im) for im, _ in pairs])
        return contrastive_loss(model, images, tokenizer([c for _, c in pairs])), {}

    log = train("clip", work, {"model": model}, loop, loss_fn, seed=seed, resume=resume,
                evaluate=lambda: {"retrieval_top1": retrieval_top1(model, preprocess, tokenizer, held)},
                eval_every=loop.save_every, console=console)
    model.requires_grad_(False)
    return {"steps": loop.steps, "log": log[-1] if log else {}}

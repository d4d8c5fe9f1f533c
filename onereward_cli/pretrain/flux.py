"""Pretraining the tiny FLUX Fill transformer (and its text encoders) by rectified flow on the fill task.

Each step draws world triplets of every task (fill, extend, extend without prompt, removal) with the
recipe's task mix and trains v_theta(x_sigma, sigma, c) -> eps - z0 (x_sigma = (1 - sigma) z0 + sigma
eps), where z0 is the VAE latent of the ground truth and c is exactly what `FluxFillPipeline` feeds
the transformer: the packed masked-image latents and the pixel-unshuffled mask
(`rollout.prepare_condition`), T5 sequence and CLIP pooled embeddings of the prompt
(`pipe.encode_prompt`, with gradient: the tiny encoders are trained with the transformer, as no
pretrained text encoder exists at this size; rl and generate keep them frozen), and the guidance
value. sigma follows a logit-normal density shifted by the resolution's mu, as the sampler's
schedule is shifted.

Guidance is distilled as in FLUX.1-dev: 10 % of prompts are dropped (the unconditional model), and
once `distill_from` of the steps are done, half the prompted samples learn, at a random guidance g,
the model's own true-CFG velocity v_u + w(g) (v_c - v_u) at guidance 1 (no grad), with
w(g) = 1 + (g - 1) * GUIDANCE_SLOPE; so `guidance` at inference is a real knob, not noise.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from .. import rollout
from . import world
from .loop import LoopConfig, step_rng, train

TASK_MIX = {"fill": 0.35, "extend": 0.25, "extend_no_prompt": 0.10, "removal": 0.30}
PROMPT_DROPOUT = 0.1
GUIDANCE_RANGE = (1.0, 30.0)
GUIDANCE_SLOPE = 0.1  # guidance 30 (FLUX.1-Fill-dev's default) -> CFG scale 3.9


def guidance_scale(g: torch.Tensor) -> torch.Tensor:
    return 1.0 + (g - 1.0) * GUIDANCE_SLOPE


def _tensors(triplets):
    src = torch.stack([torch.from_numpy(np.asarray(t.source, dtype=np.float32) / 255.0).permute(2, 0, 1)
                       for t in triplets])
    tgt = torch.stack([torch.from_numpy(np.asarray(t.target, dtype=np.float32) / 255.0).permute(2, 0, 1)
                       for t in triplets])
    msk = torch.stack([torch.from_numpy((t.mask > 0).astype(np.float32))[None] for t in triplets])
    return src, tgt, msk


@torch.no_grad()
def target_latents(pipe, images01: torch.Tensor, generator) -> torch.Tensor:
    """Packed, shifted and scaled VAE latents of images in [0, 1] (what the sampler ends at)."""
    vae = pipe.vae
    z = vae.encode((2 * images01 - 1).to(vae.dtype)).latent_dist.sample(generator=generator)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    B, C, h, w = z.shape
    return pipe._pack_latents(z, B, C, h, w)


def sample_sigmas(n: int, mu: float, generator) -> torch.Tensor:
    """Logit-normal u, then the same exponential time shift the sampler's schedule uses."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def draw_triplets(rng: random.Random, cfg: world.WorldConfig, n: int, mix=TASK_MIX):
    keys, weights = list(mix), list(mix.values())
    return [world.triplet(rng.choices(keys, weights=weights)[0], rng, cfg) for _ in range(n)]


def token_mask_weights(msk: torch.Tensor, tokens: int, mask_weight: float) -> torch.Tensor:
    """(B, 1, H, W) pixel masks -> (B, tokens, 1) loss weights 1 + mask_weight * (masked share of the token's
    pixels), each row normalised to mean 1 (the loss scale, and so the lr, stay as without weights)."""
    B, _, H, W = msk.shape
    side = int(round(math.sqrt(tokens * H / W)))  # token rows; packed tokens tile the image
    share = torch.nn.functional.adaptive_avg_pool2d(msk.float(), (side, tokens // side)).flatten(1)
    w = 1.0 + mask_weight * share
    return (w / w.mean(dim=1, keepdim=True)).unsqueeze(-1)


def flow_loss(pipe, triplets, rng: random.Random, gen: torch.Generator, *, max_sequence_length: int,
              distill: bool, mask_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean squared velocity error over a batch of triplets (grouped by size: one call per shape).

    mask_weight > 0 weighs each token by its masked share (`token_mask_weights`): the edit region is a
    fifth of a fill image or less, and with equal weights most of the gradient goes to reproducing the
    kept pixels. 0 (the shipped zoo) is the plain mean."""
    groups: dict[tuple, list] = {}
    for t in triplets:
        groups.setdefault(t.source.size, []).append(t)
    total, count, parts = 0.0, 0, {"distilled": 0.0}
    for (W, H), ts in sorted(groups.items()):
        src, tgt, msk = _tensors(ts)
        B = len(ts)
        cond = rollout.prepare_condition(pipe, src, msk, generator=gen)
        z0 = target_latents(pipe, tgt, gen)
        eps = torch.randn(z0.shape, generator=gen)
        sigma = sample_sigmas(B, rollout.default_mu(pipe, H, W), gen)
        x = (1 - sigma.view(B, 1, 1)) * z0 + sigma.view(B, 1, 1) * eps
        target = eps - z0
        prompts = [("" if rng.random() < PROMPT_DROPOUT else t.prompt) for t in ts]
        pe, pooled, ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.transformer.device,
                                             max_sequence_length=max_sequence_length)
        emb = rollout.TextEmbeds(pe, pooled, ids)
        g = torch.ones(B)
        if distill:
            guided = torch.tensor([rng.random() < 0.5 and p != "" for p in prompts])
            if guided.any():
                # The teacher: this model's own true-CFG velocity at guidance 1 (no grad), as FLUX.1-dev's
                # guidance embedding is distilled from CFG. Low variance, unlike scaling the data target.
                idx = guided.nonzero().flatten()
                gv = torch.tensor([rng.uniform(*GUIDANCE_RANGE) for _ in idx.tolist()])
                with torch.no_grad():
                    pe0, pooled0, _ = pipe.encode_prompt(prompt=[""], prompt_2=None, device=pipe.transformer.device,
                                                         max_sequence_length=max_sequence_length)
                    n = len(idx)
                    emb0 = rollout.TextEmbeds(pe0.expand(n, -1, -1), pooled0.expand(n, -1), ids)
                    sub = rollout.TextEmbeds(emb.prompt_embeds[idx].detach(), emb.pooled_prompt_embeds[idx].detach(), ids)
                    teacher = rollout.velocity(pipe.transformer, x[idx], cond.select(idx), sub, sigma[idx],
                                               torch.ones(n), true_cfg=guidance_scale(gv), neg_embeds=emb0)
                target = target.clone()
                target[idx] = teacher
                g[idx] = gv
                parts["distilled"] += float(n)
        v = rollout.velocity(pipe.transformer, x, cond, emb, sigma, g)
        err = (v - target).square()
        if mask_weight:
            err = err * token_mask_weights(msk, err.shape[1], mask_weight)
        total = total + err.sum()
        count += v.numel()
    parts["distilled"] /= len(triplets)
    return total / count, parts


@torch.no_grad()
def sample(pipe, triplets, *, steps: int = 4, guidance: float = 30.0, seed: int = 0, max_sequence_length: int = 32,
           transformer=None):
    """Full rollouts (the `generate` path) of world triplets: a list of (3, H, W) tensors in [0, 1]."""
    outs = []
    for k, t in enumerate(triplets):
        src, _, msk = _tensors([t])
        emb = rollout.encode_prompts(pipe, [t.prompt], max_sequence_length)
        gen = torch.Generator().manual_seed(seed + k)
        outs.append(rollout.full_rollout(pipe, src, msk, emb, steps, guidance, gen, transformer=transformer)[0])
    return outs


def oracle_means(triplets, images, recipe_tasks=None) -> dict[str, float]:
    """Mean oracle score per task (over its dimensions) of `images` for `triplets`."""
    from PIL import Image

    from ..synth import oracle_scores
    from ..tasks import ALL_DIMENSIONS

    dims = {"fill": ALL_DIMENSIONS[:4], "extend": ALL_DIMENSIONS[:4], "extend_no_prompt": ALL_DIMENSIONS[1:4],
            "removal": ("removal quality",)}
    by: dict[str, list[float]] = {}
    for t, im in zip(triplets, images):
        if torch.is_tensor(im):
            im = Image.fromarray((im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        s = oracle_scores(t.source, t.mask, im, dims[t.task], t.user_prompt)
        by.setdefault(t.task, []).append(sum(s.values()) / len(s))
    return {k: float(np.mean(v)) for k, v in by.items()}


def run(pipe, work: Path, cfg: world.WorldConfig, loop: LoopConfig, *, seed: int, batch: int = 16,
        max_sequence_length: int = 32, distill_from: float = 0.6, resume: bool = True, console=None,
        eval_n: int = 16, mask_weight: float = 0.0) -> dict:
    pipe.vae.requires_grad_(False)
    pipe.vae.eval()
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    for m in modules.values():
        m.requires_grad_(True)
    held = draw_triplets(random.Random(f"flux-heldout:{seed}"), cfg, eval_n)

    def loss_fn(step):
        rng, gen = step_rng(seed, "flux", step)
        ts = draw_triplets(rng, cfg, batch)
        return flow_loss(pipe, ts, rng, gen, max_sequence_length=max_sequence_length,
                         distill=step >= distill_from * loop.steps, mask_weight=mask_weight)

    def evaluate():
        scores = oracle_means(held, sample(pipe, held, max_sequence_length=max_sequence_length))
        return {f"oracle/{k}": v for k, v in scores.items()}

    log = train("flux", work, modules, loop, loss_fn, seed=seed, resume=resume, evaluate=evaluate,
                eval_every=loop.save_every, console=console)
    for m in modules.values():
        m.requires_grad_(False)
    return {"steps": loop.steps, "log": log[-1] if log else {}}

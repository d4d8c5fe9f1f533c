"""Pretraining the tiny FLUX VAE (`AutoencoderKL`): reconstruction + a small KL term.

The images are what the VAE meets in the pipeline: world scenes, masked sources (the hole is 0 in
[-1, 1], as `prepare_condition` makes it), extension canvases and edit targets. Training runs on
random 32 px crops (the VAE is convolutional); PSNR is measured on whole held-out images. After
training, `shift_factor` / `scaling_factor` are set from the latent statistics, as FLUX's are, so
the flow model sees latents of zero mean and unit variance.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import synth
from . import world
from .loop import LoopConfig, step_rng, train

TASKS = ("fill", "extend", "extend_no_prompt", "removal")
KL_WEIGHT = 1e-6


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def sample_images(rng: random.Random, cfg: world.WorldConfig, n: int) -> list[torch.Tensor]:
    """n images in [-1, 1] (3, H, W), mixed like the pipeline's inputs and outputs."""
    out = []
    while len(out) < n:
        t = world.triplet(rng.choice(TASKS), rng, cfg)
        src = _to_tensor(t.source)
        keep = torch.from_numpy((t.mask == 0).astype(np.float32))[None]
        out += [_to_tensor(t.target), src * keep]  # a clean image and a masked source (hole = 0)
    return out[:n]


def _crop(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    _, h, w = x.shape
    y0, x0 = rng.randint(0, h - size), rng.randint(0, w - size)
    return x[:, y0:y0 + size, x0:x0 + size]


def heldout_images(cfg: world.WorldConfig, n: int = 64, seed: int = 10_000) -> list[torch.Tensor]:
    rng = random.Random(f"vae-heldout:{seed}")
    return [_to_tensor(synth.render_scene(world.random_scene(rng, cfg))) for _ in range(n)]


@torch.no_grad()
def psnr(vae, images: list[torch.Tensor]) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decode(encode(x)) with the posterior mode."""
    vals = []
    for x in images:
        x = x[None].to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = float(((y - x) / 2).square().mean())
        vals.append(10 * np.log10(1.0 / max(mse, 1e-10)))
    return float(np.mean(vals))


@torch.no_grad()
def latent_stats(vae, cfg: world.WorldConfig, n: int = 128, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of sampled latents over world images: FLUX's shift_factor and 1 / scaling_factor."""
    rng = random.Random(f"vae-stats:{seed}")
    zs = []
    g = torch.Generator().manual_seed(seed)
    for x in sample_images(rng, cfg, n):
        zs.append(vae.encode(x[None]).latent_dist.sample(generator=g).flatten())
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def run(vae, work: Path, cfg: world.WorldConfig, loop: LoopConfig, *, seed: int, batch: int = 16, crop: int = 32,
        resume: bool = True, console=None, eval_n: int = 32) -> dict:
    held = heldout_images(cfg, eval_n)

    def loss_fn(step):
        rng, gen = step_rng(seed, "vae", step)
        x = torch.stack([_crop(im, crop, rng) for im in sample_images(rng, cfg, batch)])
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=gen)).sample
        rec = (y - x).abs().mean() + (y - x).square().mean()
        kl = post.kl().mean()  # summed over the latent, as diffusers computes it
        return rec + KL_WEIGHT * kl, {"rec": rec.detach(), "kl": kl.detach()}

    log = train("vae", work, {"vae": vae}, loop, loss_fn, seed=seed, resume=resume,
                evaluate=lambda: {"psnr": psnr(vae, held)}, eval_every=loop.save_every, console=console)
    mean, std = latent_stats(vae, cfg, n=4 * eval_n, seed=seed)
    vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
    return {"psnr": psnr(vae, heldout_images(cfg, 2 * eval_n)), "shift_factor": vae.config.shift_factor,
            "scaling_factor": vae.config.scaling_factor, "steps": loop.steps, "log": log[-1] if log else {}}

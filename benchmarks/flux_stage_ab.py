"""A/B of the zoo's flux pretraining stage: train it from scratch at the shipped budget with a setting
changed (the mask-weighted loss, `pretrain.flux.token_mask_weights`, or the step count) and score
zoo_quality.py's held-out triplets (24 per task, oracle mean over the task's dimensions) against the
shipped generator.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/flux_stage_ab.py --mask-weight 0 --work /tmp/ab-mw0 \
        [--steps 1200] [--vae DIR] [--png grid.png]

Defaults: the shipped budget (`pretrain.Budget`: 1800 steps, mask weight 4). Run a control on the same
machine and threads: the shipped zoo was trained at one thread, and another thread count rounds
differently, so only a control run isolates the setting. --vae defaults to the shipped VAE (the stage
normally uses the VAE stage's fp32 output).
Writes WORK/flux/model/ (transformer, text encoders), prints the scores.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel
    from PIL import Image
    from transformers import CLIPTextModel, T5EncoderModel

    from onereward_cli.models.tiny import build_zoo, resolve_model_path
    from onereward_cli.pretrain import Budget, _loop
    from onereward_cli.pretrain import flux as flux_stage
    from onereward_cli.pretrain import world
    from onereward_cli.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mask-weight", type=float, default=None, help="default: the shipped budget's")
    p.add_argument("--steps", type=int, default=None, help="flux steps (default: the shipped budget's)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the shipped zoo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", type=Path, default=None)
    a = p.parse_args(argv)
    shipped = resolve_model_path("zoo:flux-fill")
    model = a.work / "flux" / "model"
    if not (model / "transformer").exists():
        torch.manual_seed(a.seed)
        b = Budget()
        steps = a.steps or b.flux_steps
        mw = b.flux_mask_weight if a.mask_weight is None else a.mask_weight
        base = build_zoo(a.work / "base", seed=a.seed)
        pipe = FluxFillPipeline.from_pretrained(base / "flux-fill")
        pipe.vae = (AutoencoderKL.from_pretrained(a.vae) if a.vae else
                    AutoencoderKL.from_pretrained(shipped, subfolder="vae", torch_dtype=torch.float32))
        pipe.set_progress_bar_config(disable=True)
        flux_stage.run(pipe, a.work / "flux", world.WorldConfig(), _loop(steps, b.flux_lr, b, ema=b.flux_ema),
                       seed=a.seed, batch=b.flux_batch, max_sequence_length=b.max_sequence_length, eval_n=b.eval_n,
                       mask_weight=mw)
        for sub in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(pipe, sub).save_pretrained(model / sub)
    cfg = world.WorldConfig.from_recipe(load_recipe("tiny"))
    held = {}
    for task in flux_stage.TASK_MIX:
        rng = random.Random(f"zoo-quality:{task}")
        held[task] = [world.triplet(task, rng, cfg) for _ in range(24)]
    ts = [t for v in held.values() for t in v]
    rows = {}
    for name in ("shipped", "trained here"):
        pipe = FluxFillPipeline.from_pretrained(shipped)
        pipe.set_progress_bar_config(disable=True)
        if name != "shipped":
            pipe.transformer = FluxTransformer2DModel.from_pretrained(model / "transformer")
            pipe.text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
            pipe.text_encoder_2 = T5EncoderModel.from_pretrained(model / "text_encoder_2")
        ims = flux_stage.sample(pipe, ts, steps=4, guidance=30.0, max_sequence_length=32)
        print(name, ", ".join(f"{k} {v:.4f}" for k, v in flux_stage.oracle_means(ts, ims).items()), flush=True)
        rows[name] = np.concatenate([(im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                                     for im in ims[:8]], 1)
    if a.png:
        src = np.concatenate([np.asarray(t.source) for t in held["fill"][:8]], 1)
        tgt = np.concatenate([np.asarray(t.target) for t in held["fill"][:8]], 1)
        Image.fromarray(np.concatenate([src, tgt, rows["shipped"], rows["trained here"]], 0)).resize(
            (1024, 512), Image.NEAREST).save(a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

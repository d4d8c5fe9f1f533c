"""Is the tiny generator's fill undertrained? Continue the shipped FLUX Fill transformer (and its text
encoders) with the pretraining's own flow-matching loss (`pretrain.flux.flow_loss`, guidance distillation
on), on the fill task alone or on a fill-weighted mix (--fill-share; the rest split as pretrain.flux.TASK_MIX),
and score held-out triplets of every task by the oracle (issue 12 diagnosis).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flux_fill_budget.py --steps 600 --lr 3e-4 \
        [--fill-share 1.0] [--png docs/flux-fill-budget.png]

Nothing is saved but the picture (rows: source, ground truth, shipped fills, fills after the extra steps)
and the printed scores; the shipped zoo is not changed. The held-out triplets are zoo_quality.py's.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from diffusers import FluxFillPipeline
    from PIL import Image

    from onereward_cli.models.tiny import resolve_model_path
    from onereward_cli.pretrain import flux, world
    from onereward_cli.pretrain.loop import step_rng
    from onereward_cli.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heldout", type=int, default=24, help="held-out triplets per task")
    p.add_argument("--fill-share", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--png", type=Path, default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = world.WorldConfig.from_recipe(load_recipe("tiny"))
    pipe = FluxFillPipeline.from_pretrained(resolve_model_path("zoo:flux-fill"))
    pipe.set_progress_bar_config(disable=True)
    held = {}
    for task in flux.TASK_MIX:  # zoo_quality.py's held-out sets
        rng = random.Random(f"zoo-quality:{task}")
        held[task] = [world.triplet(task, rng, cfg) for _ in range(a.heldout)]
    rest = {k: v for k, v in flux.TASK_MIX.items() if k != "fill"}
    mix = {"fill": a.fill_share, **{k: (1 - a.fill_share) * v / sum(rest.values()) for k, v in rest.items()}}
    mods = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]

    def score():
        for m in mods:
            m.eval()
        ts = [t for v in held.values() for t in v]
        ims = flux.sample(pipe, ts, steps=4, guidance=30.0, max_sequence_length=32)
        for m in mods:
            m.train()
        return flux.oracle_means(ts, ims), ims[:len(held["fill"])]

    def fmt(sc):
        return ", ".join(f"{k} {v:.4f}" for k, v in sc.items())

    s0, first = score()
    print(f"step 0: oracle {fmt(s0)}", flush=True)
    params = [q for m in mods for q in m.parameters()]
    for m in mods:
        m.requires_grad_(True)
    pipe.vae.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    t0, last = time.time(), first
    for s in range(a.steps):
        rng_s, gen = step_rng(99, "flux-fill-budget", s)
        ts = flux.draw_triplets(rng_s, cfg, a.batch, mix=mix)
        loss, _ = flux.flow_loss(pipe, ts, rng_s, gen, max_sequence_length=32, distill=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (s + 1) % a.eval_every == 0 or s + 1 == a.steps:
            sc, last = score()
            print(f"step {s + 1}: loss {loss.item():.4f}, oracle {fmt(sc)} ({time.time() - t0:.0f} s)", flush=True)
    if a.png:
        def row(ims):
            return np.concatenate([(im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in ims[:8]], 1)
        src = np.concatenate([np.asarray(t.source) for t in held["fill"][:8]], 1)
        tgt = np.concatenate([np.asarray(t.target) for t in held["fill"][:8]], 1)
        Image.fromarray(np.concatenate([src, tgt, row(first), row(last)], 0)).resize((1024, 512), Image.NEAREST).save(a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

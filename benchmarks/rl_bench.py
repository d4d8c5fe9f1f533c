"""RL iteration time, broken down, and the speed-up of our optimisations over a naive loop.

Optimised: static reference rollouts cached per condition (rl.cache_reference) and one vision pass
shared by all dimension queries of a pair. Naive: the reference regenerated every step and one reward
forward per dimension. Same recipe, same steps, one process, tiny zoo on CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rl_bench.py --steps 12
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from onereward_cli import rl  # noqa: E402
from onereward_cli.recipe import load_recipe  # noqa: E402


def make_conditions(d: Path, n: int, res: int) -> Path:
    rng = np.random.default_rng(0)
    tasks = ["fill", "extend", "extend_no_prompt", "removal"]
    recs = []
    for i in range(n):
        Image.fromarray((rng.random((res, res, 3)) * 255).astype(np.uint8)).save(d / f"s{i}.png")
        m = np.zeros((res, res), np.uint8)
        m[res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        t = tasks[i % 4]
        recs.append({"id": f"c{i}", "task": t, "source": f"s{i}.png", "mask": f"m{i}.png",
                     "prompt": "a red circle" if t in ("fill", "extend") else ""})
    (d / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "c.jsonl"


def bench(recipe, conds_path, steps, naive: bool):
    conds = rl.load_conditions(recipe, conds_path)
    tr = rl.Trainer(recipe, conds, recipe.models.reward, dynamic=False)
    if naive:
        tr.cfg = dataclasses.replace(tr.cfg, cache_reference=False)
        tr.share_vision = False
    loss, *_ = tr.step(0)  # warm-up (kernels, allocator); not timed
    tr.optimizer_step(loss)
    tr.timers.clear()
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        loss, *_ = tr.step(s)
        tr.optimizer_step(loss)
    wall = time.perf_counter() - t0
    return wall / steps, {k: v / steps for k, v in tr.timers.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--conditions", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--recipe", default="tiny")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    r = load_recipe(a.recipe, [f"rl.resolution={a.resolution}", "rl.batch_size=2", "rl.rollout_steps=8",
                               "rl.t1=3", "rl.t2=6"])
    with tempfile.TemporaryDirectory() as d:
        cp = make_conditions(Path(d), a.conditions, a.resolution)
        rows = {}
        for name, naive in (("optimised", False), ("naive", True)):
            rows[name] = bench(r, cp, a.steps, naive)
    keys = ["condition", "reference_rollout", "policy_rollout", "decode", "reward", "backward"]
    print(f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}; tiny zoo, {a.resolution}px, batch 2, "
          f"8 rollout steps, {a.steps} timed steps after 1 warm-up, {a.conditions} conditions")
    print("| loop | s/iter | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, (per, parts) in rows.items():
        print(f"| {name} | {per:.3f} | " + " | ".join(f"{parts.get(k, 0.0):.3f}" for k in keys) + " |")
    print(f"speed-up (naive / optimised): {rows['naive'][0] / rows['optimised'][0]:.2f}x")


if __name__ == "__main__":
    main()

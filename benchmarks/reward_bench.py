"""Reward scorer speed: shared-vision batching vs one forward per query.

Two workloads:
  pairs/s     N image pairs, one query each (accuracy evaluation, reward training without grad)
  RL call     one pair x all 4 dimensions of image fill, forward + backward to the pixels (eq. 5)

Each is timed for the batched path (ViT once per image, all sequences in one left-padded forward)
and for the reference path (one plain `model(pixel_values=...)` forward per query).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_bench.py                 # tiny zoo, CPU
    .venv/bin/python benchmarks/reward_bench.py --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda \
        --dtype bfloat16 --size 448 --image-size 448
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    from rich.console import Console
    from rich.table import Table

    from onereward_cli.recipe import load_recipe
    from onereward_cli.reward import RewardScorer, build_query

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:qwen2.5-vl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per batch for the pairs/s workload")
    ap.add_argument("--size", type=int, default=56, help="image side in pixels")
    ap.add_argument("--image-size", type=int, default=56, help="recipe reward.image_size (pixel budget side)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default; 1 gives stable numbers on a shared CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    r = load_recipe("tiny", [f"reward.image_size={a.image_size}"])
    scorer = RewardScorer.load(a.model, r.reward, device=a.device, dtype=getattr(torch, a.dtype))
    fill = r.tasks["fill"]
    all_dims = [build_query(fill, d, "a red circle on a striped background") for d in fill.dimensions]
    g = torch.Generator().manual_seed(0)
    first = torch.rand(a.pairs, 3, a.size, a.size, generator=g).to(a.device)
    second = torch.rand(a.pairs, 3, a.size, a.size, generator=g).to(a.device)
    one_query = [[all_dims[i % len(all_dims)]] for i in range(a.pairs)]

    def eval_batch(share):
        with torch.no_grad():
            scorer.p_yes(first, second, one_query, share_vision=share)

    def rl_call(share):
        x = first[:1].clone().requires_grad_(True)
        p = scorer.p_yes(x, second[:1], [all_dims], share_vision=share)[0]
        torch.relu(1.0 - p).mean().backward()  # eq. 5 with lambda = 1

    rows = []
    for name, share in (("shared ViT, batched", True), ("1 forward per query", False)):
        te = timed(lambda: eval_batch(share), a.repeats, a.warmup, a.device)
        tr = timed(lambda: rl_call(share), a.repeats, a.warmup, a.device)
        rows.append({"path": name, "pairs_per_s": a.pairs / statistics.median(te),
                     "eval_batch_ms": 1000 * statistics.median(te),
                     "rl_call_ms": 1000 * statistics.median(tr), "rl_call_ms_min": 1000 * min(tr)})

    t = Table(title=f"Reward scorer ({a.model}, {a.device}, {a.dtype}, {a.size}px images, "
                    f"torch threads {torch.get_num_threads()})")
    for col in ("path", f"pairs/s (batch of {a.pairs}, 1 query)", "batch ms (median)",
                f"RL call ms: 1 pair x {len(all_dims)} dims, fwd+bwd (median)", "RL call ms (min)"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for row in rows:
        t.add_row(row["path"], f"{row['pairs_per_s']:.1f}", f"{row['eval_batch_ms']:.1f}", f"{row['rl_call_ms']:.1f}",
                  f"{row['rl_call_ms_min']:.1f}")
    Console().print(t)
    speedup = rows[1]["rl_call_ms"] / rows[0]["rl_call_ms"]
    print(f"RL call speed-up from shared vision: {speedup:.2f}x; "
          f"eval throughput ratio: {rows[0]['pairs_per_s'] / rows[1]['pairs_per_s']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

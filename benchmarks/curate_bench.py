"""Benchmark `onereward curate` selection at pool scale (synthetic CLIP-like embeddings).

    python benchmarks/curate_bench.py                         # 1,000,000 -> 100,000 (the target)
    python benchmarks/curate_bench.py --n 100000 --select 10000
    python benchmarks/curate_bench.py --n 20000 --select 2000 --embed-images 0

What is measured, per configuration, each in a fresh subprocess (so peak memory is its own):
  wall time of dedup + selection (the code `onereward curate` runs after embedding:
  curate.select_subset), peak RSS (getrusage ru_maxrss: includes the loaded embedding matrix),
  and quality:
    coverage  mean cosine distance from a pool point to its nearest selected point (lower is better;
              exact, over a fixed random sample of --eval-sample pool points, +- its standard error)
    dup pairs planted near-duplicate/identical pairs with both members selected (lower is better)
Configurations: hierarchical and flat x faiss and sklearn; "baseline" = flat scikit-learn
MiniBatchKMeans (k = select) given the same wall-clock budget as hierarchical/faiss, then the pool
point nearest each centroid (faiss IVF lookup, inside the budget); "random" = a uniform sample.
Flat runs whose K-means work exceeds --flat-max-work flops are skipped with a projected time.

Synthetic data: L2-normalised d-dim vectors from a topic/sub-topic mixture with Zipf-like topic
sizes and a shared direction (pairwise cosine ~0.1 across topics, ~0.6 within a topic, ~0.8 within
a sub-topic, like CLIP image embeddings), plus 1% identical copies and 2% near-copies (cos ~0.9995).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_pool(n: int, d: int, seed: int, chunk: int = 50_000):
    """(x [n, d] float32 unit rows, pixel hashes [n], planted duplicate pairs [m, 2] (src < dst))."""
    rng = np.random.default_rng(seed)
    n_topics, n_sub = max(8, n // 500), 16
    w = 1.0 / np.arange(1, n_topics + 1) ** 0.7
    w /= w.sum()
    shared = _unit(rng.standard_normal(d)).astype(np.float32)
    topics = _unit(rng.standard_normal((n_topics, d))).astype(np.float32)
    subs = (rng.standard_normal((n_topics, n_sub, d)) / math.sqrt(d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        t, s = rng.choice(n_topics, m, p=w), rng.integers(n_sub, size=m)
        noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(0.6 / math.sqrt(d))
        x[a:a + m] = _unit(0.5 * shared + topics[t] + 0.7 * subs[t, s] + noise)
    hashes = rng.integers(-2**62, 2**62, size=n, dtype=np.int64)
    n_exact, n_near = n // 100, n // 50
    dst = np.sort(rng.choice(np.arange(1, n), n_exact + n_near, replace=False))
    src = (rng.random(len(dst)) * dst).astype(np.int64)
    exact = np.zeros(len(dst), dtype=bool)
    exact[rng.choice(len(dst), n_exact, replace=False)] = True
    for i, (a, b) in enumerate(zip(src, dst)):  # ascending dst: a source is final before it is copied
        if exact[i]:
            x[b], hashes[b] = x[a], hashes[a]
        else:
            x[b] = _unit(x[a] + rng.standard_normal(d).astype(np.float32) * np.float32(0.03 / math.sqrt(d)))
    return x, hashes, np.stack([src, dst], 1)


# ----------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------
def coverage(x, selected_rows, sample: int, seed: int, block: int = 1024):
    """Mean (and standard error) over sampled pool points of 1 - max cosine to a selected point."""
    rng = np.random.default_rng(seed + 99)
    q = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    s = np.ascontiguousarray(x[selected_rows])
    best = np.empty(len(q), dtype=np.float32)
    for a in range(0, len(q), block):
        best[a:a + block] = (x[q[a:a + block]] @ s.T).max(1)
    dist = 1.0 - best
    return float(dist.mean()), float(dist.std() / math.sqrt(len(dist)))


def dup_pairs_selected(pairs, selected_rows, n):
    chosen = np.zeros(n, dtype=bool)
    chosen[selected_rows] = True
    return int((chosen[pairs[:, 0]] & chosen[pairs[:, 1]]).sum())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# Configurations (run inside a worker subprocess)
# ----------------------------------------------------------------------------------------------
def run_curate(x, hashes, select, mode, backend, seed):
    from onereward_cli import curate

    res = curate.select_subset(x, hashes, select, mode=mode, backend=backend, seed=seed, iters=20)
    rows = res.selection.arrays()[0]
    return res.distinct[rows], {"duplicates_dropped": int((res.dup_of >= 0).sum()),
                                "clusters": res.selection.n_clusters, "dedup_s": res.dedup_seconds}


def run_baseline(x, select, seed, budget_s):
    """Flat MiniBatchKMeans (k = select) for what is left of the budget after the nearest-point lookup."""
    import faiss
    from sklearn.cluster import MiniBatchKMeans

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n, d = x.shape
    nlist = int(4 * math.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(x)
    index.nprobe = 8
    t_probe = time.perf_counter()
    index.search(x[:1000], 1)
    search_est = (time.perf_counter() - t_probe) * select / 1000 * 1.2
    km = MiniBatchKMeans(n_clusters=select, init="random", batch_size=4096, n_init=1, random_state=seed,
                         compute_labels=False)
    km.partial_fit(x[np.sort(rng.choice(n, min(n, max(select, 3 * 4096)), replace=False))])
    steps = 1
    while time.perf_counter() - t0 + search_est < budget_s:
        km.partial_fit(x[rng.integers(0, n, 4096)])
        steps += 1
    c = km.cluster_centers_.astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    _, nearest = index.search(c, 1)
    rows = np.unique(nearest[:, 0][nearest[:, 0] >= 0])
    short = select - len(rows)
    if short > 0:  # centroids that share a nearest point: fill with random unpicked points
        free = np.setdiff1d(np.arange(n), rows)
        rows = np.sort(np.r_[rows, rng.choice(free, short, replace=False)])
    return rows, {"minibatch_steps": steps, "filled_randomly": max(short, 0)}


def worker(args):
    data = Path(args.data)
    x, hashes, pairs = np.load(data / "x.npy"), np.load(data / "hashes.npy"), np.load(data / "pairs.npy")
    n = len(x)
    load_gb = peak_rss_gb()
    mode, _, backend = args.worker.partition(":")
    t0 = time.perf_counter()
    if mode == "random":
        rows, info = np.sort(np.random.default_rng(args.seed).choice(n, args.select, replace=False)), {}
    elif mode == "baseline":
        rows, info = run_baseline(x, args.select, args.seed, args.budget)
    else:
        rows, info = run_curate(x, hashes, args.select, mode, backend, args.seed)
    wall = time.perf_counter() - t0
    peak = peak_rss_gb()
    if mode in ("flat", "hierarchical"):  # select_subset compacted x in place: measure on a fresh copy
        del x
        x = np.load(data / "x.npy")
    cov, cov_se = coverage(x, rows, args.eval_sample, args.seed)
    out = {"config": args.worker, "wall_s": round(wall, 2), "peak_rss_gb": round(peak, 2),
           "data_rss_gb": round(load_gb, 2), "selected": int(len(np.unique(rows))),
           "coverage": round(cov, 5), "coverage_se": round(cov_se, 5),
           "dup_pairs_selected": dup_pairs_selected(pairs, rows, n), **info}
    Path(args.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def gflops() -> float:
    a = np.random.rand(2048, 768).astype(np.float32)
    b = np.random.rand(768, 8192).astype(np.float32)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 2048 * 768 * 8192 / (time.perf_counter() - t) / 1e9


def embed_throughput(n_images: int, workers: list[int]):
    """Images/s of the tiny zoo CLIP on this CPU through the real embed step (decode + encode)."""
    import random

    from onereward_cli import curate, synth
    from onereward_cli.artifacts import save_png
    from onereward_cli.recipe import load_recipe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)
        for i in range(n_images):
            img, *_ = synth.make_image(rng, 64, 2)
            save_png(Path(tmp, "pool", f"{i:06d}.png"), img)
        listing = curate.list_pool(Path(tmp, "pool"))
        for nw in workers:
            r = load_recipe("tiny", [f"curate.num_workers={nw}", "curate.batch_size=64", "curate.shard_size=512"])
            emb_dir = Path(tmp, f"emb-{nw}")
            emb_dir.mkdir()
            st = curate.embed_pool(r, listing, emb_dir, device="cpu")
            rows.append({"num_workers": nw, "images": n_images, "seconds": st["embed_seconds"],
                         "images_per_s": round(n_images / st["embed_seconds"], 1)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="pool size")
    ap.add_argument("--select", type=int, default=100_000, help="subset size")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", help="comma-separated: MODE:BACKEND, baseline, random",
                    default="hierarchical:faiss,hierarchical:sklearn,flat:faiss,flat:sklearn,baseline,random")
    ap.add_argument("--eval-sample", type=int, default=20_000, help="pool points used to measure coverage")
    ap.add_argument("--flat-max-work", type=float, default=5e13, help="skip flat runs above this many flops")
    ap.add_argument("--budget", type=float, default=0.0, help="baseline budget (s); 0 = hierarchical:faiss time")
    ap.add_argument("--timeout", type=float, default=1800, help="per-configuration time limit (s)")
    ap.add_argument("--embed-images", type=int, default=2000, help="images for the embedding throughput (0 = skip)")
    ap.add_argument("--data-dir", default=None, help="where the synthetic pool is cached (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    tmp = Path(args.data_dir or tempfile.mkdtemp(prefix="curate-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / f"pool-{args.n}-{args.dim}-{args.seed}"
    flops = gflops()
    print(f"# curate benchmark: n={args.n:,} select={args.select:,} dim={args.dim} seed={args.seed} "
          f"cpus={os.cpu_count()} matmul={flops:.0f} GFLOP/s", flush=True)
    if not data.exists():
        t = time.perf_counter()
        x, hashes, pairs = make_pool(args.n, args.dim, args.seed)
        part = data.with_name(data.name + ".partial")
        part.mkdir(exist_ok=True)
        for name, arr in (("x", x), ("hashes", hashes), ("pairs", pairs)):
            np.save(part / f"{name}.npy", arr)
        part.rename(data)
        del x
        print(f"# synthetic pool: {time.perf_counter() - t:.1f} s -> {data}", flush=True)
    results = []
    budget = args.budget
    for cfg in args.configs.split(","):
        mode = cfg.split(":")[0]
        if mode == "flat":
            work = 2.0 * args.n * args.select * args.dim * 20
            if work > args.flat_max_work:
                results.append({"config": cfg, "skipped": f"K-means work {work:.1e} flops, projected "
                                f"{work / (flops * 1e9) / 3600:.1f} h at {flops:.0f} GFLOP/s"})
                print(json.dumps(results[-1]), flush=True)
                continue
        if mode == "baseline" and not budget:
            ref = [r for r in results if r["config"] == "hierarchical:faiss" and "wall_s" in r]
            budget = ref[0]["wall_s"] if ref else 60.0
        res_file = tmp / f"result-{cfg.replace(':', '-')}.json"
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", cfg, "--data", str(data), "--result", str(res_file),
               "--select", str(args.select), "--seed", str(args.seed), "--eval-sample", str(args.eval_sample),
               "--budget", str(budget)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"config": cfg, "error": f"not finished after {args.timeout:.0f} s (stopped)"})
            print(json.dumps(results[-1]), flush=True)
            continue
        if proc.returncode != 0:
            results.append({"config": cfg, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(res_file.read_text()))
        if mode == "baseline":
            results[-1]["budget_s"] = budget
        print(json.dumps(results[-1]), flush=True)
    embed = embed_throughput(args.embed_images, [0, 2]) if args.embed_images else []
    for row in embed:
        print(json.dumps({"embed": row}), flush=True)
    print_table(args, results, embed)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "gflops": flops, "results": results,
                                               "embed": embed}, indent=2))


def print_table(args, results, embed):
    print(f"\n| config | wall (s) | peak RSS (GB) | coverage (mean cos dist, lower=better) | dup pairs selected |")
    print("|---|---|---|---|---|")
    for r in results:
        if "skipped" in r or "error" in r:
            print(f"| {r['config']} | {r.get('skipped') or r.get('error')} | | | |")
            continue
        print(f"| {r['config']} | {r['wall_s']} | {r['peak_rss_gb']} | {r['coverage']:.4f} +- {r['coverage_se']:.4f}"
              f" | {r['dup_pairs_selected']} |")
    for e in embed:
        print(f"\nembedding (tiny zoo CLIP, CPU, 64px PNGs, num_workers={e['num_workers']}): "
              f"{e['images_per_s']} images/s")


if __name__ == "__main__":
    main()

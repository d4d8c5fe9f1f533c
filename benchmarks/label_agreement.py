"""How much can the query matter? For each Table 1 cell of a replication seed's held-out pairs, the share of
pairs whose oracle label a judge that ignores the dimension would still get right (issue 13).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/label_agreement.py SEED_DIR [SEED_DIR ...]

Two dimension-blind oracles are scored on each test pair (winner, loser) of SEED_DIR/data/pairs/test.jsonl:

- blind: the mean of the oracle's scores over the pair's task dimensions (a perfect judge of "overall
  quality" that is never told the dimension);
- removal: the oracle's removal-quality score, what Table 4's fixed query literally asks of every pair.

A perfect full-query judge gets 100 % on every cell; a perfect judge asked without the dimension at most
the blind row. The gap between them is the most the Fig. 3 query can add over a dimension-blind judge with
perfect perception. Prints a markdown table (mean over the seeds given).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def agreement(seed_dir: Path, tasks) -> dict[tuple[str, str], dict[str, float]]:
    from onereward_cli.artifacts import open_image
    from onereward_cli.synth import oracle_scores

    pairs = seed_dir / "data" / "pairs"
    hits: dict = defaultdict(lambda: {"blind": [], "removal": []})
    cache: dict = {}

    def scores(rec, img):
        key = (rec["sample_id"], img)
        if key not in cache:
            dims = tuple(tasks[rec["task"]].dimensions) + ("removal quality",)
            cache[key] = oracle_scores(open_image(pairs / rec["source"]), open_image(pairs / rec["mask"], mode="L"),
                                       open_image(pairs / img), dims, rec.get("prompt") or "")
        return cache[key]

    for line in (pairs / "test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        w, l = scores(rec, rec["winner"]), scores(rec, rec["loser"])
        dims = tasks[rec["task"]].dimensions
        cell = hits[(rec["task"], rec["dimension"])]
        cell["blind"].append(np.mean([w[d] for d in dims]) > np.mean([l[d] for d in dims]))
        cell["removal"].append(w["removal quality"] > l["removal quality"])
    return {c: {k: float(np.mean(v)) for k, v in h.items()} | {"n": len(h["blind"])} for c, h in hits.items()}


def main(argv=None) -> int:
    from onereward_cli.recipe import load_recipe

    dirs = [Path(x) for x in (argv if argv is not None else sys.argv[1:])]
    tasks = load_recipe("replicate").tasks
    per = [agreement(d, tasks) for d in dirs]
    cells = sorted({c for p in per for c in p}, key=lambda c: (list(tasks).index(c[0]), c[1]))
    print("| cell | pairs | dimension-blind oracle | removal-quality oracle (the fixed query) |")
    print("|---|---|---|---|")
    for c in cells:
        got = [p[c] for p in per if c in p]
        print(f"| {c[0]} / {c[1]} | {sum(g['n'] for g in got)} | "
              f"{100 * np.mean([g['blind'] for g in got]):.1f} | {100 * np.mean([g['removal'] for g in got]):.1f} |")
    for k in ("blind", "removal"):
        print(f"cell mean, {k}: {100 * np.mean([np.mean([p[c][k] for p in per if c in p]) for c in cells]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

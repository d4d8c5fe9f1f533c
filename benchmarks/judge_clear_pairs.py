"""Does the judge learn more from clear preferences? Train the full-query reward model on the share of a
replication seed's training pairs with the largest oracle gap (winner's score minus loser's on the pair's
dimension) and test it on every held-out pair, as Table 1 does (issue 13).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_clear_pairs.py SEED_DIR OUT \
        [--keep 0.5] [--set reward.epochs=4 ...]

SEED_DIR is a seed of `onereward demo --replicate` (or `benchmarks/replicate_sweep.py --build-data`) whose
data phases are done. The kept pairs are written to SEED_DIR/data/pairs-clearKEEP/ (the test split copied
unchanged). With --keep 0.5, --set reward.epochs=4 keeps the number of optimizer steps of the recipe's 2
epochs on all pairs, so the comparison is of the data, not of the training length. Compare with the seed's
own reward-full (or a `replicate_sweep.py --reward` run) on the same pairs. The recipe-level equivalent is
`pairs.train_min_margin` (a threshold on the margin the oracle writes into each label; on the replicate
recipe's pools the median training margin is 0.11-0.12, so 0.11 keeps about half).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from onereward_cli import train_reward
    from onereward_cli.artifacts import open_image
    from onereward_cli.recipe import load_recipe
    from onereward_cli.synth import oracle_scores

    p = argparse.ArgumentParser()
    p.add_argument("seed_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--recipe", default="replicate")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args(argv)
    seed = int(a.seed_dir.name.rsplit("-", 1)[-1])
    r = load_recipe(a.recipe, [f"seed={seed}", "reward.eval_every=200", "reward.save_every=200", *a.sets])
    src = a.seed_dir / "data" / "pairs"
    dst = a.seed_dir / "data" / f"pairs-clear{a.keep}"  # same depth as pairs/: the relative image paths hold
    if not (dst / "train.jsonl").exists():
        recs = [json.loads(x) for x in (src / "train.jsonl").read_text().splitlines()]
        gaps = []
        for rec in recs:
            d = rec["dimension"]
            s = [oracle_scores(open_image(src / rec["source"]), open_image(src / rec["mask"], mode="L"),
                               open_image(src / rec[k]), (d,), rec.get("prompt") or "")[d] for k in ("winner", "loser")]
            gaps.append(s[0] - s[1])
        keep = np.argsort(gaps)[::-1][: int(len(recs) * a.keep)]
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "test.jsonl").write_text((src / "test.jsonl").read_text())
        (dst / "train.jsonl").write_text("".join(json.dumps(recs[i]) + "\n" for i in sorted(keep)))
        print(f"kept {len(keep)} of {len(recs)} training pairs (oracle gap >= {min(gaps[i] for i in keep):.3f})")
    train_reward.run(r, dst, a.out, resume=(a.out / "checkpoints").exists())
    acc = json.loads((a.out / "accuracy.json").read_text())
    cells = [c["symmetric_accuracy"] for c in acc["cells"] if c["n"] > 0]
    print(f"held-out symmetric accuracy, cell mean {100 * np.mean(cells):.1f} %, all pairs "
          f"{100 * acc['overall']['symmetric_accuracy']:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

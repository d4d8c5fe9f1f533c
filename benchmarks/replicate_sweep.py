"""The sweep that chose the replicate recipe's reward-model and RL settings (issue 13).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/replicate_sweep.py SEED_DIR --out DIR \
        [--reward reward.lr=3e-4 --reward reward.lr=1e-3 ...] [--rl rl.lr=1e-12 --rl rl.lr=1e-3 ...] [--set k=v ...]

SEED_DIR is one seed of `onereward demo --replicate` whose data phases are done (data/pairs,
data/rl_conditions.jsonl, benchmark/, validation/); `--build-data` runs those phases first (named seed-N,
the seed is N), so an RL sweep with `--reward-model zoo:onereward` needs no reward training. Each `--reward` setting trains a full-query reward model
on that seed's pairs and reports held-out accuracy (mean over Table 1 cells, as the replication does); each
`--rl` setting runs static RL (Alg. 1) with the best reward model, logging the held-out oracle on the seed's
validation set (what rl.keep_best selects on), and reports the mean reward of the first and last steps,
the validation curve, the step policy/ holds and, with --benchmark, that policy's oracle score on the seed's
benchmark against the base model's (the number Table 2 reports). A setting that contains the bare word `dynamic` runs Alg. 2 (EMA reference) instead of Alg. 1.
Include `rl.lr=1e-12` as the control: a
setting is only an improvement where it beats the control, not a running mean. Writes DIR/sweep.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cells(acc: dict, key: str) -> float:
    cells = [c[key] for c in acc["cells"] if c["n"] > 0] if "cells" in acc else []
    return float(np.mean(cells)) if cells else float("nan")


def _dir_seed(seed_dir: Path) -> int:
    """seed-N -> N (how `demo --replicate` names its seed folders)."""
    return int(seed_dir.name.rsplit("-", 1)[-1])


def main(argv=None) -> int:
    from onereward_cli import rl, train_reward
    from onereward_cli.recipe import load_recipe

    p = argparse.ArgumentParser()
    p.add_argument("seed_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", default="replicate")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--reward", action="append", default=[], help="one reward setting, comma-separated k=v")
    p.add_argument("--rl", action="append", default=[], help="one rl setting, comma-separated k=v")
    p.add_argument("--reward-model", default=None, help="use this reward model for the rl sweep")
    p.add_argument("--benchmark", action="store_true", help="score each rl policy/ on the seed's benchmark")
    p.add_argument("--build-data", action="store_true", help="run the seed's data phases first (resumable)")
    a = p.parse_args(argv)
    if a.build_data:
        from onereward_cli.replicate import run_data_phases

        run_data_phases(load_recipe(a.recipe, [f"seed={_dir_seed(a.seed_dir)}", *a.sets]), a.seed_dir)
    val = a.seed_dir / "validation" / "validation.jsonl"
    heldout = val if val.exists() else a.seed_dir / "benchmark" / "benchmark.jsonl"
    seed = json.loads((a.seed_dir / "seed.json").read_text())["seed"] if (a.seed_dir / "seed.json").exists() \
        else _dir_seed(a.seed_dir)
    base = [f"seed={seed}", *a.sets]
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"seed_dir": str(a.seed_dir), "reward": [], "rl": []}
    best, best_acc = a.reward_model, -1.0
    for k, setting in enumerate(a.reward):
        r = load_recipe(a.recipe, base + setting.split(","))
        out = a.out / f"reward-{k}"
        if not (out / "accuracy.json").exists():
            train_reward.run(r, a.seed_dir / "data" / "pairs", out, resume=(out / "checkpoints").exists())
        acc = json.loads((out / "accuracy.json").read_text())
        row = {"setting": setting, "symmetric_accuracy": acc["overall"]["symmetric_accuracy"],
               "accuracy": acc["overall"]["accuracy"], "n": acc["overall"]["n"],
               "cell_mean_symmetric": _cells(acc, "symmetric_accuracy")}
        res["reward"].append(row)
        if row["symmetric_accuracy"] > best_acc:
            best, best_acc = str(out / "final"), row["symmetric_accuracy"]
    best = best or str(a.seed_dir / "reward-full" / "final")
    res["rl_reward_model"] = best
    for k, setting in enumerate(a.rl):
        parts = [x for x in setting.split(",") if x]
        r = load_recipe(a.recipe, base + [x for x in parts if x != "dynamic"])
        out = a.out / f"rl-{k}"
        if not (out / "policy").exists():
            rl.run(r, a.seed_dir / "data" / "rl_conditions.jsonl", out, reward_model=best,
                   dynamic="dynamic" in parts, heldout=heldout, resume=(out / "checkpoints").exists())
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        w = max(1, len(log) // 5)
        held = [x["heldout_oracle"] for x in log if "heldout_oracle" in x]
        sel = json.loads((out / "run.json").read_text()).get("selected")
        row = {"setting": setting, "reward_first": float(np.mean([x["mean_reward"] for x in log[:w]])),
               "reward_last": float(np.mean([x["mean_reward"] for x in log[-w:]])),
               "heldout_first": held[0] if held else None, "heldout_last": held[-1] if held else None,
               "heldout_max": max(held) if held else None, "selected": sel}
        if a.benchmark:
            row["benchmark"] = benchmark_scores(r, out, a.seed_dir)
        res["rl"].append(row)
    (a.out / "sweep.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["| reward setting | held-out sym. acc. | acc. | pairs |", "|---|---|---|---|"]
    md += [f"| `{x['setting']}` | {100 * x['symmetric_accuracy']:.1f} | {100 * x['accuracy']:.1f} | {x['n']} |"
           for x in res["reward"]]
    md += ["", "| rl setting | reward first → last | validation oracle first → last (max) | policy/ step | "
           "benchmark oracle, policy/ − base |", "|---|---|---|---|---|"]
    for x in res["rl"]:
        heldc = (f"{x['heldout_first']:.4f} → {x['heldout_last']:.4f} ({x['heldout_max']:.4f})"
                 if x["heldout_first"] is not None else "–")
        step = str(x["selected"]["step"]) if x.get("selected") else "last"
        b = x.get("benchmark")
        bench = (f"{b['policy'] - b['base']:+.4f} (" + ", ".join(f"{t} {v:+.3f}" for t, v in b["per_task"].items())
                 + ")") if b else "–"
        md.append(f"| `{x['setting']}` | {x['reward_first']:.3f} → {x['reward_last']:.3f} | {heldc} | {step} | {bench} |")
    (a.out / "sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def benchmark_scores(r, rl_out: Path, seed_dir: Path) -> dict:
    """Mean oracle score on the seed's benchmark of rl_out/policy and of the base model (eval's own path;
    per task: the mean over the task's samples of their mean over dimensions, as Table 2)."""
    import dataclasses

    from onereward_cli import evaluate

    r = dataclasses.replace(r, eval=dataclasses.replace(r.eval, gsb=False))  # the oracle alone
    ev = rl_out / "eval"
    if not (ev / "metrics.json").exists():
        evaluate.run(r, policy=str(rl_out / "policy"), benchmark=seed_dir / "benchmark" / "benchmark.jsonl", out=ev,
                     compare=[r.models.policy], reward_model=None, human=None)
    from onereward_cli.replicate import task_means

    m = json.loads((ev / "metrics.json").read_text())
    pol, base = [p["label"] for p in m["policies"]]
    means = {label: task_means({rec["id"]: (rec["task"], rec["values"]["oracle"]) for rec in m["per_sample"]
                                if rec["policy"] == label and "oracle" in rec["values"]})
             for label in (pol, base)}
    return {"policy": float(np.mean(list(means[pol].values()))), "base": float(np.mean(list(means[base].values()))),
            "per_task": {t: means[pol][t] - means[base][t] for t in means[pol]}}


if __name__ == "__main__":
    raise SystemExit(main())

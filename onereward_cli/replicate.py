"""`onereward demo --replicate`: a miniature replication of the paper's two central claims on the
synthetic data, with the oracle annotator playing the human annotators.

1. Tables 1 and 4: reward models trained and tested with the full query (task + dimension), the task
   only, neither, and the fixed query (every pair asked as object removal / removal quality);
   held-out accuracy per task x dimension against the oracle's picks, plus the untuned model.
2. Fig. 4 and Table 2: reward curves per task x dimension during RL, and the oracle's held-out scores
   of the base, static-RL (Alg. 1) and dynamic-RL (Alg. 2) policies.

It reports what comes out, whatever it is; nothing here is tuned to make a number look right.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .artifacts import write_text

console = Console(stderr=True)

MODES = ("none", "task", "full", "fixed")
MODE_LABELS = {"none": "Qwen2.5VL* (no task, no dimension)", "task": "Qwen2.5VL*+task",
               "full": "Qwen2.5VL*+task+dimension", "fixed": "fixed query (removal / removal quality)"}


def _cells(report: dict, key: str = "accuracy") -> dict[tuple[str, str], float]:
    return {(c["task"], c["dimension"]): c[key] for c in report.get("cells", [])}


def accuracy_rows(out: Path, key: str = "accuracy") -> tuple[list[tuple[str, str]], list[tuple[str, dict]]]:
    """(columns, rows) for the Table 1/4 layout from the ablation runs under `out`; `key` is
    "accuracy" (the paper's P(yes|w,l) > 0.5) or "symmetric_accuracy" (P(yes|w,l) > P(yes|l,w))."""
    rows, cols = [], []
    base = out / "reward-full" / "accuracy_baseline.json"
    if base.exists():
        rows.append(("untuned (no finetune)", _cells(json.loads(base.read_text()), key)))
    for m in MODES:
        f = out / f"reward-{m}" / "accuracy.json"
        if f.exists():
            rows.append((MODE_LABELS[m], _cells(json.loads(f.read_text()), key)))
    for _, cells in rows:
        for k in cells:
            if k not in cols:
                cols.append(k)
    return cols, rows


def oracle_rows(metrics_json: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """Mean oracle score per task for each evaluated policy (the held-out judge of Table 2's role)."""
    m = json.loads(metrics_json.read_text())
    tasks = list(m["summary"])
    rows = []
    for pol in m["policies"]:
        vals = {}
        for t in tasks:
            cols = m["summary"][t].get(pol["label"], {})
            ora = [v["mean"] for k, v in cols.items() if k.startswith("oracle") and v.get("mean") is not None]
            if ora:
                vals[t] = sum(ora) / len(ora)
        rows.append((pol["label"], vals))
    return tasks, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def run(recipe, out, pairs_dir, conditions, benchmark):
    """Train the three remaining query ablations next to the demo's full-query model, then report."""
    from . import train_reward

    rep = Path(out) / "replicate"
    rep.mkdir(parents=True, exist_ok=True)
    # The demo already trained the full-query model; train the others on the same pairs.
    full_src = Path(out) / "reward"
    for m in MODES:
        target = rep / f"reward-{m}"
        if m == "full" and full_src.exists():
            if not target.exists():
                target.symlink_to(full_src.resolve(), target_is_directory=True)
            continue
        if (target / "final").exists():  # finished earlier: a re-run only rewrites the report
            continue
        r_m = dataclasses.replace(recipe, reward=dataclasses.replace(recipe.reward, query_mode=m))
        train_reward.run(r_m, pairs_dir, target, resume=False)
    md = ["# Miniature replication", "",
          "Synthetic pool, oracle annotator as the human labellers, tiny random-init models (see README).", ""]
    for key, title in (("accuracy", "held-out accuracy, P(yes | winner, loser) > 0.5 (the paper's number)"),
                       ("symmetric_accuracy", "held-out order-symmetric accuracy, P(yes | w, l) > P(yes | l, w)")):
        cols, rows = accuracy_rows(rep, key)
        t1 = Table(title=f"Tables 1/4 (miniature): {title} (%)")
        t1.add_column("reward model")
        for task, dim in cols:
            t1.add_column(f"{task}\n{dim}", justify="right")
        md_rows = []
        for name, cells in rows:
            vals = [("—" if (k not in cells) else f"{100 * cells[k]:.1f}") for k in cols]
            t1.add_row(name, *vals)
            md_rows.append([name] + vals)
        console.print(t1)
        md += [f"## Tables 1 and 4: query ablation, {title} (%)", "",
               _md_table(["reward model"] + [f"{t} / {d}" for t, d in cols], md_rows), ""]
    mj = Path(out) / "eval" / "metrics.json"
    if mj.exists():
        tasks, orows = oracle_rows(mj)
        t2 = Table(title="Table 2 (miniature): oracle held-out score per task (higher is better)")
        t2.add_column("policy")
        for t in tasks:
            t2.add_column(t, justify="right")
        md2 = []
        for label, vals in orows:
            cells = [("—" if t not in vals else f"{vals[t]:.4f}") for t in tasks]
            t2.add_row(label, *cells)
            md2.append([label] + cells)
        console.print(t2)
        md += ["## Table 2: oracle held-out scores of base, static RL and dynamic RL", "",
               _md_table(["policy"] + tasks, md2), ""]
    for name in ("rl-static", "rl-dynamic"):
        png = Path(out) / name / "reward_curves.png"
        if png.exists():
            md += [f"## Fig. 4: reward curves, {name}", "", f"![{name}](../{name}/reward_curves.png)", ""]
    write_text(rep / "replication.md", "\n".join(md) + "\n")
    console.print(f"replication report: {rep / 'replication.md'}")
    return rep / "replication.md"

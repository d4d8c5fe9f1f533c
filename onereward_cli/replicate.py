"""`onereward demo --replicate`: a miniature replication of the paper's claims on the trained tiny world,
repeated over several seeds (different synthetic pools, not just different inits), the oracle annotator
playing the human annotators.

Per seed, with every stage the CLI runs (same code):
  synth -> curate -> generate -> annotate --oracle -> export-pairs
  train-reward x 3 query modes (Table 1: none, task, full; the untuned model is the full run's
      baseline evaluation); Table 4's fixed query is the full model asked every test pair as object
      removal / removal quality, as the paper's ablation does (no model is trained on it)
  rl static (Alg. 1) and rl --dynamic (Alg. 2) with the full-query reward model (Fig. 4: reward curves,
      held-out oracle beside them)
  eval base vs static vs dynamic on a held-out benchmark of world triplets whose ground truth is known
      (Table 2 role: oracle score per task, the ground truth as the ceiling; Fig. 7 role: Good-Same-Bad
      against base, judged by the oracle and by the reward model)
Across seeds every figure is reported as mean +- the 95 % t-interval. A re-run skips finished phases.
With replicate.jobs > 1 the seeds run side by side, each in a child process at one thread.
It reports what comes out, whatever it is; nothing here is tuned per seed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .artifacts import read_jsonl, write_json, write_text

console = Console(stderr=True)

MODES = ("none", "task", "full")  # trained; "fixed" is the full model asked another query
ROWS = ("untuned", "none", "task", "full", "fixed")
ROW_LABELS = {"untuned": "untuned (no preference training)", "none": "Qwen2.5VL* (no task, no dimension)",
              "task": "Qwen2.5VL*+task", "full": "Qwen2.5VL*+task+dimension (OneReward)",
              "fixed": "fixed query at test (OneReward asked removal / removal quality)"}
FIXED_QUERY_REPORT = "accuracy_fixed_query"  # in reward-full/
POLICIES = ("base", "static", "dynamic")
ORACLE_SAME_MARGIN = 0.02  # the oracle annotator's own "no difference" margin (synth.oracle_pick)
# Two-sided 95 % Student t quantiles by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t-interval, n); the half-width is nan for a single value."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    m = float(np.mean(v))
    if len(v) < 2:
        return m, float("nan"), 1
    t = _T975.get(len(v) - 1, 1.96)
    return m, t * float(np.std(v, ddof=1)) / math.sqrt(len(v)), len(v)


def fmt(mci, scale: float = 1.0, digits: int = 1) -> str:
    m, h, n = mci
    if n == 0:
        return "—"
    if n == 1 or math.isnan(h):
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * h:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------
class _Phases:
    def __init__(self, root: Path):
        self.root = root
        self.file = root / "phases.json"
        self.done = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def run(self, name: str, fn):
        if name in self.done:
            return
        console.rule(f"[bold cyan]{self.root.name}: {name}")
        t = time.perf_counter()
        fn()
        self.done[name] = round(time.perf_counter() - t, 1)
        write_json(self.file, self.done)


def run_data_phases(recipe, root: Path) -> tuple["_Phases", Path, Path]:
    """The phases of one seed that need no reward model: synthetic pool, curation, candidates, oracle labels,
    pairs, benchmark and validation triplets, RL conditions. Returns (phases, benchmark, RL's held-out set)."""
    from . import annotate, curate, generate, pairs, synth
    from .demo import write_conditions
    from .pretrain import world

    root.mkdir(parents=True, exist_ok=True)
    ph = _Phases(root)
    r = recipe
    ph.run("synth", lambda: synth.run(r, root / "pool", n=r.synth.n, seed=r.seed))
    ph.run("curate", lambda: curate.run(r, root / "pool" / "manifest.jsonl", root / "curated", select=r.curate.select))
    ph.run("generate", lambda: generate.run(r, root / "curated" / "curated.jsonl", root / "candidates",
                                            candidates=r.generate.candidates))
    ph.run("annotate", lambda: annotate.annotate_with_oracle(r, root / "candidates",
                                                             root / "candidates" / "annotations.jsonl"))
    ph.run("export-pairs", lambda: pairs.run(r, root / "candidates" / "annotations.jsonl", root / "data",
                                             test_fraction=r.pairs.test_fraction))
    pairs_dir = root / "data" / "pairs"
    cfg = world.WorldConfig.from_recipe(r)
    per_task = {t: r.replicate.benchmark_per_task for t in r.tasks if r.tasks[t].probability > 0}
    ph.run("benchmark", lambda: world.write_benchmark(root / "benchmark", per_task, cfg, seed=r.seed))
    bench = root / "benchmark" / "benchmark.jsonl"
    heldout = bench  # what RL logs its held-out oracle on (and rl.keep_best selects on)
    if r.replicate.validation_per_task:
        val_n = {t: r.replicate.validation_per_task for t in per_task}
        ph.run("validation", lambda: world.write_benchmark(root / "validation", val_n, cfg, seed=r.seed,
                                                           namespace="validation"))
        heldout = root / "validation" / "validation.jsonl"
    train_ids = {p["sample_id"] for p in read_jsonl(pairs_dir / "train.jsonl")}
    conds = root / "data" / "rl_conditions.jsonl"
    if not conds.exists():
        write_conditions(root / "candidates", train_ids, conds)
    return ph, bench, heldout


def run_seed(recipe, root: Path):
    """Every phase of one seed under `root` (resumable: a finished phase is skipped)."""
    from . import evaluate, rl, train_reward

    r = recipe
    ph, bench, heldout = run_data_phases(r, root)
    pairs_dir = root / "data" / "pairs"
    conds = root / "data" / "rl_conditions.jsonl"
    for m in MODES:
        r_m = dataclasses.replace(r, reward=dataclasses.replace(r.reward, query_mode=m))
        out = root / f"reward-{m}"
        ph.run(f"train-reward ({m})",
               lambda r_m=r_m, out=out: train_reward.run(r_m, pairs_dir, out, resume=(out / "checkpoints").exists()))
    reward_model = str(root / "reward-full" / "final")
    ph.run("fixed query (Table 4)", lambda: fixed_query_report(r, reward_model, pairs_dir / "test.jsonl",
                                                               root / "reward-full"))
    for name, dynamic in (("rl-static", False), ("rl-dynamic", True)):
        out = root / name
        ph.run(name, lambda out=out, dynamic=dynamic: rl.run(r, conds, out, reward_model=reward_model, dynamic=dynamic,
                                                             heldout=heldout,
                                                             resume=(out / "checkpoints" / "latest.json").exists()))
    ph.run("eval", lambda: evaluate.run(r, policy=str(root / "rl-static" / "policy"), benchmark=bench,
                                        out=root / "eval", compare=[r.models.policy, str(root / "rl-dynamic" / "policy")],
                                        reward_model=reward_model, human=None))
    ph.run("ground truth", lambda: write_json(root / "ground_truth.json", ground_truth_scores(r, bench)))
    return ph.done


def fixed_query_report(r, model: str, test: Path, out: Path) -> Path:
    """Table 4's second row: the trained OneReward model scores every test pair asked as object removal /
    removal quality. A model that uses its query loses accuracy here; one that ignores it does not."""
    from .reward import RewardScorer, evaluate_pairs, load_pairs, save_accuracy

    scorer = RewardScorer.load(model, r.reward)
    scorer.model.eval()
    report = evaluate_pairs(scorer, load_pairs(test, r.tasks), r.tasks, "fixed", bold=r.reward.bold,
                            batch_size=r.reward.batch_size)
    save_accuracy(report, out, name=FIXED_QUERY_REPORT)
    return out / f"{FIXED_QUERY_REPORT}.json"


def ground_truth_scores(r, bench: Path) -> dict:
    """Per-sample oracle scores of the benchmark's ground-truth images (the ceiling)."""
    from .artifacts import open_image
    from .synth import oracle_scores

    out = []
    for rec in read_jsonl(bench):
        d = bench.parent
        s = oracle_scores(open_image(d / rec["source"]), open_image(d / rec["mask"], mode="L"),
                          open_image(d / rec["target"]), r.tasks[rec["task"]].dimensions, rec.get("prompt") or "")
        out.append({"id": rec["id"], "task": rec["task"], "values": s, "mean": float(np.mean(list(s.values())))})
    return {"per_sample": out}


# ----------------------------------------------------------------------------------------------
# Reading one seed's results
# ----------------------------------------------------------------------------------------------
def accuracy_cells(root: Path, key: str) -> dict[str, dict[tuple[str, str], float]]:
    """{row: {(task name, dimension): value}} for the Table 1/4 rows of one seed."""
    rows = {}
    base = root / "reward-full" / "accuracy_baseline.json"
    if base.exists():
        rows["untuned"] = {(c["task"], c["dimension"]): c[key] for c in json.loads(base.read_text())["cells"]}
    files = {m: root / f"reward-{m}" / "accuracy.json" for m in MODES}
    files["fixed"] = root / "reward-full" / f"{FIXED_QUERY_REPORT}.json"
    for m, f in files.items():
        if f.exists():
            rows[m] = {(c["task"], c["dimension"]): c[key] for c in json.loads(f.read_text())["cells"]}
    return rows


def pair_counts(root: Path) -> dict[tuple[str, str], int]:
    f = root / "reward-full" / "accuracy.json"
    return {(c["task"], c["dimension"]): c["n"] for c in json.loads(f.read_text())["cells"]} if f.exists() else {}


def _policy_labels(metrics: dict) -> dict[str, str]:
    """Our names (base, static, dynamic) -> eval's policy labels, in the order eval was given them."""
    labels = [p["label"] for p in metrics["policies"]]
    return {"static": labels[0], "base": labels[1], "dynamic": labels[2]}


def oracle_per_sample(root: Path) -> dict[str, dict[str, tuple[str, float]]]:
    """{policy: {sample id: (task, mean oracle score over the task's dimensions)}} incl. ground truth."""
    m = json.loads((root / "eval" / "metrics.json").read_text())
    names = {v: k for k, v in _policy_labels(m).items()}
    out: dict = {k: {} for k in POLICIES}
    for rec in m["per_sample"]:
        if rec["policy"] in names and "oracle" in rec["values"]:
            out[names[rec["policy"]]][rec["id"]] = (rec["task"], rec["values"]["oracle"])
    gt = json.loads((root / "ground_truth.json").read_text())["per_sample"]
    out["ground truth"] = {g["id"]: (g["task"], g["mean"]) for g in gt}
    return out


def task_means(per_sample: dict[str, tuple[str, float]]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for task, v in per_sample.values():
        by.setdefault(task, []).append(v)
    return {t: float(np.mean(v)) for t, v in by.items()}


def oracle_gsb(per_sample: dict, p: str, q: str = "base") -> dict[str, dict[str, float]]:
    """Good/Same/Bad of policy p against q judged by the oracle (mean score, the annotator's margin)."""
    by: dict[str, list[str]] = {}
    for sid, (task, v) in per_sample[p].items():
        if sid not in per_sample[q]:
            continue
        d = v - per_sample[q][sid][1]
        by.setdefault(task, []).append("good" if d > ORACLE_SAME_MARGIN else "bad" if d < -ORACLE_SAME_MARGIN
                                       else "same")
    by["all"] = [x for t, xs in list(by.items()) for x in xs]
    return {t: {k: xs.count(k) / len(xs) for k in ("good", "same", "bad")} for t, xs in by.items() if xs}


def reward_gsb(root: Path, p: str) -> dict[str, dict[str, float]]:
    """Good/Same/Bad of policy p against base judged by the reward model (eval's own judgement)."""
    m = json.loads((root / "eval" / "metrics.json").read_text())
    lab = _policy_labels(m)
    comps = m.get("gsb", {}).get("comparisons", {})
    for key in (f"{lab[p]} vs {lab['base']} (reward)", f"{lab['base']} vs {lab[p]} (reward)"):
        if key in comps:
            flip = key.startswith(lab["base"])
            out, alls = {}, {"good": 0, "same": 0, "bad": 0}
            for task, per in comps[key].items():
                a = per["all"]
                g, b = (a["bad"], a["good"]) if flip else (a["good"], a["bad"])
                out[task] = {"good": g / a["n"], "same": a["same"] / a["n"], "bad": b / a["n"]}
                for k, v in (("good", g), ("same", a["same"]), ("bad", b)):
                    alls[k] += v
            n = sum(alls.values())
            out["all"] = {k: v / n for k, v in alls.items()} if n else {}
            return out
    return {}


def curves(root: Path, name: str) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """({task/dimension: [(step, reward)]}, [(step, held-out oracle)]) from one rl log."""
    f = root / name / "log.jsonl"
    rew: dict[str, list] = {}
    held = []
    if f.exists():
        for rec in read_jsonl(f, tolerate_torn_tail=True):
            for k, v in rec.get("rewards", {}).items():
                rew.setdefault(k, []).append((rec["step"], v))
            if "heldout_oracle" in rec:
                held.append((rec["step"], rec["heldout_oracle"]))
    sel = selected(root, name)
    if sel and held:  # rl.keep_best scored the starting model too: the curve starts at step 0
        held.insert(0, (0, sel["start_heldout_oracle"]))
    return rew, held


def selected(root: Path, name: str) -> dict | None:
    """rl.keep_best's choice of one rl run ({step, heldout_oracle, start_heldout_oracle}), if it made one."""
    f = root / name / "run.json"
    return json.loads(f.read_text()).get("selected") if f.exists() else None


# ----------------------------------------------------------------------------------------------
# Across seeds
# ----------------------------------------------------------------------------------------------
def aggregate(seed_dirs: list[Path]) -> dict:
    res: dict = {"seeds": [d.name for d in seed_dirs]}
    for key in ("symmetric_accuracy", "accuracy"):
        per_seed = [accuracy_cells(d, key) for d in seed_dirs]
        cols = list(dict.fromkeys(c for s in per_seed for row in s.values() for c in row))
        table = {}
        for row in ROWS:
            cells = {f"{t} / {dim}": mean_ci([s.get(row, {}).get((t, dim)) for s in per_seed]) for t, dim in cols}
            cells["mean"] = mean_ci([np.mean([s[row][c] for c in cols if c in s.get(row, {})])
                                     for s in per_seed if s.get(row)])
            table[row] = cells
        res[key] = {"columns": [f"{t} / {dim}" for t, dim in cols] + ["mean"], "rows": table}
    counts = [pair_counts(d) for d in seed_dirs]
    res["test_pairs_min"] = {f"{t} / {dim}": min(c.get((t, dim), 0) for c in counts)
                             for t, dim in dict.fromkeys(k for c in counts for k in c)}
    ora = [oracle_per_sample(d) for d in seed_dirs if (d / "eval" / "metrics.json").exists()]
    tasks = list(dict.fromkeys(t for o in ora for t, _ in o["ground truth"].values()))
    tab2 = {}
    for pol in POLICIES + ("ground truth",):
        tm = [task_means(o[pol]) for o in ora]
        tab2[pol] = {t: mean_ci([x.get(t) for x in tm]) for t in tasks}
        tab2[pol]["mean"] = mean_ci([np.mean(list(x.values())) for x in tm])
    for pol in ("static", "dynamic"):
        diffs = [{t: task_means(o[pol])[t] - task_means(o["base"])[t] for t in tasks} for o in ora]
        tab2[f"{pol} - base"] = {t: mean_ci([d[t] for d in diffs]) for t in tasks}
        tab2[f"{pol} - base"]["mean"] = mean_ci([np.mean(list(d.values())) for d in diffs])
    diffs = [{t: task_means(o["dynamic"])[t] - task_means(o["static"])[t] for t in tasks} for o in ora]
    tab2["dynamic - static"] = {t: mean_ci([d[t] for d in diffs]) for t in tasks}
    tab2["dynamic - static"]["mean"] = mean_ci([np.mean(list(d.values())) for d in diffs])
    res["table2"] = {"columns": tasks + ["mean"], "rows": tab2}
    gsb = {}
    for pol in ("static", "dynamic"):
        for judge, per_seed in (("oracle", [oracle_gsb(o, pol) for o in ora]),
                                ("reward model", [reward_gsb(d, pol) for d in seed_dirs if (d / "eval").exists()])):
            keys = list(dict.fromkeys(t for g in per_seed for t in g))
            gsb[f"{pol} vs base ({judge})"] = {t: {k: mean_ci([g.get(t, {}).get(k) for g in per_seed])
                                                   for k in ("good", "same", "bad")} for t in keys}
    res["gsb"] = gsb
    res["selected"] = {d.name: {m: sel for m in ("static", "dynamic") if (sel := selected(d, f"rl-{m}"))}
                       for d in seed_dirs}
    phases: dict[str, list[float]] = {}
    for d in seed_dirs:
        f = d / "phases.json"
        for k, v in (json.loads(f.read_text()) if f.exists() else {}).items():
            phases.setdefault(k, []).append(v)
    res["phase_seconds"] = {k: {"mean": float(np.mean(v)), "total": float(np.sum(v))} for k, v in phases.items()}
    res["total_seconds"] = float(sum(v["total"] for v in res["phase_seconds"].values()))
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _rich(title: str, header: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def seed_mean_curve(series: list[dict[int, float]], window: int) -> tuple[list[int], list[float]]:
    """Mean over seeds of each seed's moving average (its last `window` logged values at or before each
    step). A key is logged only on the steps that drew its task, and those steps differ by seed, so the
    seeds are smoothed first and then averaged at every step where all of them have a value."""
    if not series:
        return [], []
    last = max(max(s) for s in series)
    per_seed = []
    for s in series:
        steps = sorted(s)
        sm, i = {}, 0
        for x in range(1, last + 1):
            while i < len(steps) and steps[i] <= x:
                i += 1
            if i:
                sm[x] = float(np.mean([s[t] for t in steps[max(0, i - window): i]]))
        per_seed.append(sm)
    xs = [x for x in range(1, last + 1) if all(x in sm for sm in per_seed)]
    return xs, [float(np.mean([sm[x] for sm in per_seed])) for x in xs]


def plot_curves(seed_dirs: list[Path], path: Path, window: int = 10):
    """Fig. 4: reward per task x dimension (mean over seeds, moving average), static and dynamic, with
    the held-out oracle on a second axis."""
    from .report import pyplot, save_figure
    from .rl import TASK_COLOURS

    plt = pyplot()
    runs = {}
    for name in ("rl-static", "rl-dynamic"):
        cs = [curves(d, name) for d in seed_dirs]
        runs[name] = cs
    dims = sorted({k.split("/", 1)[1] for cs in runs.values() for rew, _ in cs for k in rew})
    if not dims:
        return None
    fig, axes = plt.subplots(2, len(dims) + 1, figsize=(3.0 * (len(dims) + 1), 5.4), squeeze=False)
    for row, (name, cs) in enumerate(runs.items()):
        for ax, dim in zip(axes[row], dims):
            keys = sorted({k for rew, _ in cs for k in rew if k.endswith("/" + dim)})
            for k in keys:
                series = [dict(rew[k]) for rew, _ in cs if k in rew]
                steps, ys = seed_mean_curve(series, window)
                ax.plot(steps, ys, color=TASK_COLOURS.get(k.split("/")[0]), label=k.split("/")[0], lw=1.2)
            ax.set_title(f"{name}: {dim}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=7)
            if keys:
                ax.legend(fontsize=6)
        ax = axes[row][-1]
        helds = [dict(h) for _, h in cs if h]
        if helds:
            steps = sorted(set.intersection(*[set(h) for h in helds]))
            for h in helds:
                ax.plot(sorted(h), [h[x] for x in sorted(h)], color="grey", lw=0.6, alpha=0.6)
            ax.plot(steps, [float(np.mean([h[x] for h in helds])) for x in steps], color="black", lw=1.5,
                    label="mean over seeds")
            ax.legend(fontsize=6)
        ax.set_title(f"{name}: held-out oracle", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("P(yes | policy, ref)", fontsize=8)
    axes[1][0].set_ylabel("P(yes | policy, ref)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_accuracy(res: dict, path: Path):
    """Tables 1/4 as bars: order-symmetric accuracy per cell, one bar per row, 95 % intervals."""
    from .report import pyplot, save_figure

    plt = pyplot()
    tab = res["symmetric_accuracy"]
    cols = tab["columns"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(cols) + 2), 4.0))
    width = 0.8 / len(ROWS)
    for k, row in enumerate(ROWS):
        vals = [tab["rows"][row][c] for c in cols]
        xs = [i + (k - (len(ROWS) - 1) / 2) * width for i in range(len(cols))]
        ax.bar(xs, [100 * v[0] for v in vals], width, yerr=[0 if math.isnan(v[1]) else 100 * v[1] for v in vals],
               label=ROW_LABELS[row], capsize=1.5, error_kw={"lw": 0.6})
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cols)), [c.replace(" / ", "\n") for c in cols], fontsize=6.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel("order-symmetric accuracy (%)")
    ax.legend(fontsize=6.5, loc="lower right")
    ax.set_title(f"Reward model accuracy on held-out pairs, mean ± 95 % CI over {len(res['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def report(res: dict, out: Path, recipe=None) -> Path:
    md = ["# Miniature replication", "",
          f"Trained tiny world, oracle annotator as the human labellers, seeds {', '.join(res['seeds'])} "
          "(each its own synthetic pool). Every figure: mean ± 95 % t-interval across seeds.", ""]
    for key, what in (("symmetric_accuracy", "order-symmetric accuracy, P(yes | w, l) > P(yes | l, w)"),
                      ("accuracy", "the paper's number, P(yes | w, l) > 0.5")):
        tab = res[key]
        rows = [[ROW_LABELS[r]] + [fmt(tab["rows"][r][c], 100) for c in tab["columns"]] for r in ROWS]
        header = ["reward model"] + tab["columns"]
        console.print(_rich(f"Tables 1/4 (miniature): {what} (%)", header, rows))
        md += [f"## Tables 1 and 4: held-out {what} (%)", "", _md_table(header, rows), ""]
    md += ["Held-out test pairs per cell (fewest over seeds): " +
           ", ".join(f"{k} {v}" for k, v in res["test_pairs_min"].items()), "",
           "![accuracy](accuracy.png)", ""]
    t2 = res["table2"]
    rows = [[name] + [fmt(t2["rows"][name][c], 1, 4) for c in t2["columns"]] for name in t2["rows"]]
    header = ["policy"] + t2["columns"]
    console.print(_rich("Table 2 (miniature): held-out oracle score per task", header, rows))
    md += ["## Table 2: held-out oracle score per task (mean over the task's dimensions)", "",
           _md_table(header, rows), "", "## Fig. 4: reward curves and held-out oracle", "",
           "![curves](reward_curves.png)", ""]
    sel = [[seed, m, str(v["step"]), f"{v['start_heldout_oracle']:.4f}", f"{v['heldout_oracle']:.4f}"]
           for seed, per in res.get("selected", {}).items() for m, v in per.items()]
    if sel:
        header = ["seed", "rl", "selected step", "held-out oracle at step 0", "at the selected step"]
        console.print(_rich("rl.keep_best: the step each policy/ holds (0 = the base model)", header, sel))
        md += ["rl.keep_best: the step each run's policy/ holds (0 = the base model), chosen on the held-out "
               "oracle of the validation set (not the benchmark above):", "", _md_table(header, sel), ""]
    md += ["## Fig. 7: Good / Same / Bad against base", ""]
    rows = []
    for comp, per in res["gsb"].items():
        for task, v in per.items():
            rows.append([comp, task] + [fmt(v[k], 100) for k in ("good", "same", "bad")])
    header = ["comparison", "task", "good %", "same %", "bad %"]
    console.print(_rich("Fig. 7 (miniature): Good / Same / Bad against base", header, rows))
    md += [_md_table(header, rows), "",
           f"Oracle GSB: Good when the policy's mean oracle score beats base by more than {ORACLE_SAME_MARGIN} "
           "(the annotator's no-difference margin), Bad when it trails by more, else Same. Reward-model GSB: "
           "eval's both-orders judgement.", "", "## Wall time per phase (seconds, summed over seeds)", "",
           _md_table(["phase", "mean per seed", "total"],
                     [[k, f"{v['mean']:.0f}", f"{v['total']:.0f}"] for k, v in res["phase_seconds"].items()]),
           "", f"Total: {res['total_seconds'] / 60:.1f} min.", ""]
    write_text(out / "replication.md", "\n".join(md) + "\n")
    return out / "replication.md"


def _json_safe(o):
    """NaN (an interval from one seed, a cell without pairs) -> null: strict JSON readers reject NaN."""
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {(k if isinstance(k, str) else " / ".join(map(str, k)) if isinstance(k, tuple) else str(k)): _json_safe(v)
                for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def _finished_phases(d: Path) -> list[str]:
    try:
        return list(json.loads((d / "phases.json").read_text()))
    except (OSError, ValueError):  # not written yet (the writes are atomic, so never half a file)
        return []


def run_seeds_in_processes(work: list[tuple[object, Path]], jobs: int) -> None:
    """Each (recipe, seed dir) in a child process (`python -m onereward_cli.replicate`), `jobs` at a time,
    one thread each; a child's output goes to SEED_DIR/replicate.log. Resumable like run_seed."""
    import os
    import subprocess
    import sys

    import yaml

    from .errors import InputError, TrainingAborted
    from .recipe import to_plain

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue, running, failed, printed = list(work), [], [], {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                r, d = queue.pop(0)
                d.mkdir(parents=True, exist_ok=True)
                write_text(d / "recipe.yaml", yaml.safe_dump(to_plain(r), sort_keys=False))
                log = open(d / "replicate.log", "a")
                cmd = [sys.executable, "-m", "onereward_cli.replicate", str(d / "recipe.yaml"), str(d)]
                running.append((d, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
                console.print(f"replicate: {d.name} in process {running[-1][2].pid} (log: {d / 'replicate.log'})")
            time.sleep(1.0)
            for item in list(running):
                d, log, proc = item
                done = _finished_phases(d)  # one line per finished phase, so a 20-minute run shows progress
                for name in done[printed.get(d, 0):]:
                    console.print(f"replicate: {d.name}: {name} done")
                printed[d] = len(done)
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    if proc.returncode != 0:
                        failed.append((f"{d.name} (exit {proc.returncode}, see {d / 'replicate.log'})",
                                       proc.returncode))
                    else:
                        console.print(f"replicate: {d.name} done")
    finally:  # Ctrl-C or an error here: no child outlives the parent (a re-run resumes their phases)
        for _, log, proc in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
    if failed:  # a child exits 2 on bad input (as the CLI does), else the run stopped: exit 3 with the logs
        msg = "replicate.jobs: seed(s) failed: " + "; ".join(f for f, _ in failed) + "; re-run to resume them"
        raise (InputError if all(c == 2 for _, c in failed) else TrainingAborted)(msg, path=work[0][1].parent)


def run(recipe, out, seeds: int | None = None) -> Path:
    """Run (or resume) every seed under OUT/seed-N, then aggregate into OUT/replication.{md,json}."""
    out = Path(out)
    n = seeds or recipe.replicate.seeds
    work = [(dataclasses.replace(recipe, seed=recipe.seed + k), out / f"seed-{recipe.seed + k}") for k in range(n)]
    if recipe.replicate.jobs > 1 and n > 1:
        run_seeds_in_processes(work, recipe.replicate.jobs)
    else:
        for r, d in work:
            run_seed(r, d)
    dirs = [d for _, d in work]
    res = aggregate(dirs)
    write_json(out / "replication.json", _json_safe(res))
    plot_accuracy(res, out / "accuracy.png")
    plot_curves(dirs, out / "reward_curves.png")
    md = report(res, out, recipe)
    console.print(f"replication report: {md}")
    return md


def main(argv=None) -> int:
    """`python -m onereward_cli.replicate RECIPE SEED_DIR`: one seed's phases (what replicate.jobs runs)."""
    import sys

    from .recipe import load_recipe

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m onereward_cli.replicate RECIPE SEED_DIR", file=sys.stderr)
        return 2
    from .errors import InputError, TrainingAborted

    try:
        run_seed(load_recipe(args[0]), Path(args[1]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`onereward demo`: the whole pipeline on the embedded default, through the same stage code the
subcommands run, with every artifact under one folder and a summary at the end.

tiny-models -> synth -> curate -> generate -> annotate --oracle -> export-pairs -> train-reward
            -> rl (static, Alg. 1) -> rl --dynamic (Alg. 2) -> eval (base vs static vs dynamic)

`--replicate` runs the miniature replication instead (replicate.py: every stage above per seed, the
query ablations, both RL modes, aggregated over seeds); a re-run resumes it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .artifacts import read_jsonl, strip_meta, write_jsonl
from .errors import InputError

console = Console(stderr=True)


def _stage(name: str, timings: dict):
    class _Ctx:
        def __enter__(self):
            console.rule(f"[bold cyan]{name}")
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.t
            if exc[0] is None:
                console.print(f"[green]done[/] {name} in {timings[name]:.1f} s")
            return False

    return _Ctx()


def write_benchmark(candidates_dir: Path, test_ids: set[str], out: Path) -> Path:
    """Held-out triplets (the test split's samples) as a benchmark JSONL for `eval`."""
    recs = []
    for r in read_jsonl(candidates_dir / "candidates.jsonl"):
        if r["id"] in test_ids:
            recs.append({"id": r["id"], "task": r["task"], "prompt": r.get("user_prompt") or "",
                         "source": str((candidates_dir / r["source"]).resolve()),
                         "mask": str((candidates_dir / r["mask"]).resolve())})
    write_jsonl(out, recs)
    return out


def write_conditions(candidates_dir: Path, keep_ids: set[str], out: Path) -> Path:
    """Training conditions for RL: the train split's samples only (the test split stays held out)."""
    recs = [strip_meta(r) for r in read_jsonl(candidates_dir / "candidates.jsonl") if r["id"] in keep_ids]
    for r in recs:
        r["source"] = str((candidates_dir / r["source"]).resolve())
        r["mask"] = str((candidates_dir / r["mask"]).resolve())
        r["prompt"] = r.get("user_prompt") or ""
    write_jsonl(out, recs)
    return out


def run(recipe, out, replicate: bool = False):
    import math

    from . import annotate, curate, evaluate, generate, pairs, rl, synth, train_reward
    from .pretrain import world

    out = Path(out)
    marker = out / ".onereward-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():  # never delete a folder the demo did not make
            raise InputError("folder exists and was not made by `onereward demo`; choose another --out", path=out)
        if replicate and marker.read_text().startswith("replicate"):
            console.print(f"demo --replicate: resuming the replication in {out}")
        else:
            console.print(f"demo: replacing the previous demo run in {out}")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if replicate:
        from . import replicate as rep

        marker.write_text("replicate: made by `onereward demo --replicate`; a re-run resumes it\n")
        t0 = time.perf_counter()
        md = rep.run(recipe, out)
        console.print(f"replication: {time.perf_counter() - t0:.0f} s -> {md}")
        return out
    marker.write_text("made by `onereward demo`; the next demo run replaces this folder\n")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with _stage("tiny-models", t):
        from .models.tiny import ZOO_MODELS, resolve_model_path

        for name in ZOO_MODELS:  # the trained zoo, checked against its recorded hashes
            console.print(f"zoo: {resolve_model_path('zoo:' + name)}")
    with _stage("synth", t):
        synth.run(recipe, out / "pool", n=recipe.synth.n, seed=recipe.seed)
    with _stage("curate", t):
        curate.run(recipe, out / "pool" / "manifest.jsonl", out / "curated", select=recipe.curate.select)
    with _stage("generate", t):
        generate.run(recipe, out / "curated" / "curated.jsonl", out / "candidates",
                     candidates=recipe.generate.candidates, limit=0)
    with _stage("annotate --oracle", t):
        annotate.annotate_with_oracle(recipe, out / "candidates", out / "candidates" / "annotations.jsonl")
    with _stage("export-pairs", t):
        pairs.run(recipe, out / "candidates" / "annotations.jsonl", out / "data",
                  test_fraction=recipe.pairs.test_fraction)
    pairs_dir = out / "data" / "pairs"
    test_ids = {r["sample_id"] for r in read_jsonl(pairs_dir / "test.jsonl")}
    train_ids = {r["sample_id"] for r in read_jsonl(pairs_dir / "train.jsonl")}
    with _stage("train-reward", t):
        train_reward.run(recipe, pairs_dir, out / "reward", resume=False)
    reward_model = recipe.demo.rl_reward_model or str(out / "reward" / "final")
    conds = write_conditions(out / "candidates", train_ids, out / "data" / "rl_conditions.jsonl")
    tasks = [k for k, v in recipe.tasks.items() if v.probability > 0]
    wcfg = world.WorldConfig.from_recipe(recipe)
    if recipe.demo.benchmark_per_task:  # world triplets: scenes neither the pool nor validation holds
        bench = world.write_benchmark(out / "data" / "benchmark", {k: recipe.demo.benchmark_per_task for k in tasks},
                                      wcfg, seed=recipe.seed)
    else:
        bench = write_benchmark(out / "candidates", test_ids, out / "data" / "benchmark.jsonl")
    heldout = bench
    if recipe.rl.keep_best:  # select on other scenes than the benchmark eval reports: world triplets
        per = {k: math.ceil(recipe.rl.heldout_n / len(tasks)) for k in tasks}
        heldout = world.write_benchmark(out / "data" / "validation", per, wcfg, seed=recipe.seed,
                                        namespace="validation")
    with _stage("rl (static, Alg. 1)", t):
        rl.run(recipe, conds, out / "rl-static", reward_model=reward_model, dynamic=False, heldout=heldout)
    with _stage("rl --dynamic (Alg. 2)", t):
        rl.run(recipe, conds, out / "rl-dynamic", reward_model=reward_model, dynamic=True, heldout=heldout)
    with _stage("eval", t):
        evaluate.run(recipe, policy=str(out / "rl-static" / "policy"), benchmark=bench, out=out / "eval",
                     compare=[recipe.models.policy, str(out / "rl-dynamic" / "policy")],
                     reward_model=reward_model, human=None)
    t["total"] = time.perf_counter() - t0
    summarise(out, t, judge=recipe.demo.rl_reward_model)
    return out


def summarise(out: Path, timings: dict, judge: str = ""):
    tab = Table(title="onereward demo: what each stage produced", show_lines=False)
    tab.add_column("stage")
    tab.add_column("seconds", justify="right")
    tab.add_column("output")
    produced = {
        "tiny-models": "offline tiny zoo (FLUX Fill, Qwen2.5-VL, open_clip)",
        "synth": f"{out}/pool/manifest.jsonl",
        "curate": f"{out}/curated/curated.jsonl",
        "generate": f"{out}/candidates/candidates.jsonl",
        "annotate --oracle": f"{out}/candidates/annotations.jsonl",
        "export-pairs": f"{out}/data/pairs/{{train,test}}.jsonl",
        "train-reward": f"{out}/reward/final (+ accuracy.json, accuracy.png)",
        "rl (static, Alg. 1)": f"{out}/rl-static/{{policy,ema}} + reward_curves.png",
        "rl --dynamic (Alg. 2)": f"{out}/rl-dynamic/{{policy,ema}} + reward_curves.png",
        "eval": f"{out}/eval/report.html",
    }
    for k, v in timings.items():
        if k != "total":
            tab.add_row(k, f"{v:.1f}", produced.get(k, ""))
    tab.add_row("[bold]total", f"[bold]{timings['total']:.1f}", "")
    console.print(tab)
    acc = out / "reward" / "accuracy.json"
    if acc.exists():
        console.print(Panel(_accuracy_text(json.loads(acc.read_text())), title="reward model accuracy (test pairs)"))
    if judge:
        console.print(f"rl: both runs optimise {judge} (demo.rl_reward_model), not the reward model trained above")
    for name in ("rl-static", "rl-dynamic"):
        log = out / name / "log.jsonl"
        if log.exists():
            recs = read_jsonl(log, tolerate_torn_tail=True)
            if recs:
                k = max(1, len(recs) // 4)
                first = sum(r["mean_reward"] for r in recs[:k]) / k
                last = sum(r["mean_reward"] for r in recs[-k:]) / k
                console.print(f"{name}: mean reward first {k} steps {first:.3f} -> last {k} steps {last:.3f}; "
                              f"curves: {out / name / 'reward_curves.png'}")
                man = out / name / "run.json"
                sel = json.loads(man.read_text()).get("selected") if man.exists() else None
                if sel:
                    console.print(f"{name}: policy/ is step {sel['step']} of {recs[-1]['step']} "
                                  f"({'the base model: no step beat it' if sel['step'] == 0 else 'the best'} on the "
                                  f"validation oracle, {sel['start_heldout_oracle']:.4f} -> {sel['heldout_oracle']:.4f})")
    metrics = out / "eval" / "metrics.json"
    if metrics.exists():
        line = _oracle_line(json.loads(metrics.read_text()))
        if line:
            console.print(line)
    rep = out / "eval" / "report.html"
    if rep.exists():
        console.print(f"eval report: {rep}")


def _oracle_line(m: dict) -> str:
    """Held-out oracle score per policy (mean over the benchmark's samples), each against base."""
    totals: dict[str, list[float]] = {}
    for task in m.get("summary", {}).values():
        for label, v in task.items():
            o = v.get("oracle")
            if o:
                totals.setdefault(label, []).extend([o["mean"] * o["n"], o["n"]])
    means = {k: sum(v[0::2]) / sum(v[1::2]) for k, v in totals.items() if sum(v[1::2])}
    labels = [p["label"] for p in m.get("policies", [])]
    if len(labels) < 2 or not all(x in means for x in labels):
        return ""
    base = labels[1]  # demo order: static, base, dynamic
    parts = [f"{base} {means[base]:.4f}"] + [f"{x} {means[x]:.4f} ({means[x] - means[base]:+.4f})"
                                             for x in labels if x != base]
    return "held-out oracle score (eval benchmark): " + ", ".join(parts)


def _accuracy_text(acc: dict) -> str:
    lines = [f"{'task':>16} | {'dimension':<16} | {'acc':>6} | {'sym':>6} | {'n':>4}"]
    for c in acc.get("cells", []):
        lines.append(f"{c['task']:>16} | {c['dimension']:<16} | {100 * c['accuracy']:6.1f} | "
                     f"{100 * c['symmetric_accuracy']:6.1f} | {c['n']:>4}")
    o = acc.get("overall")
    if o:
        lines.append(f"{'overall':>16} | {'':<16} | {100 * o['accuracy']:6.1f} | {100 * o['symmetric_accuracy']:6.1f} | {o['n']:>4}")
    return "\n".join(lines)

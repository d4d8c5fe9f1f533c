"""`onereward eval`: generate with fixed seeds, score (paper Table 2), compare (Fig. 7), report.

    onereward eval --policy ./rl/policy --compare zoo:flux-fill --benchmark bench.jsonl --out ./eval

1. Benchmark: a JSONL of triplets {"id","source","mask","prompt","task"} (paths relative to the JSONL)
   or a `generate` output folder (candidates.jsonl: its source, mask, user prompt and task per sample).
   Every row is validated (images readable, mask aspect = image aspect, mask not empty, a prompt for
   tasks that need one) before any model is loaded.
2. Generation: every policy edits every sample with the same seed (eval.seed + sample index) and the
   recipe's eval steps / guidance / true CFG / negative prompt / resolution, through the one rollout
   implementation. Edits go to images/<policy label>/<id>.png; edits.jsonl records how each was made,
   so a re-run reuses the edits whose policy, seed and parameters are unchanged.
3. Metrics (onereward_cli.metrics): each enabled metric scores every policy's edits for its tasks;
   a metric that fails is recorded in metrics.json and the report, the others go on.
4. Good-Same-Bad of the first policy against each --compare policy, judged by the OneReward scorer in
   both orders per dimension, and from --human ratings when given; Table 3 from --human.
5. metrics.json, run.json, report.md and a self-contained report.html; tables also in the terminal.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .artifacts import RunManifest, append_jsonl, open_image, read_jsonl, save_png, write_json
from .errors import InputError
from .metrics import EvalItem, MetricRun, _free_memory, mean_std, run_metrics
from .metrics import gsb as G
from .metrics import human as H
from .recipe import resolve_device, torch_dtype
from .report import Figure, Grid, Section, Table, print_tables, pyplot, save_figure, write_report

console = Console(stderr=True)
TASK_TITLES = H.TASK_TITLES
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TRIPLET_SCHEMA = {"id": ((str, int), True), "source": (str, True), "mask": (str, True), "prompt": (str, False),
                  "task": (str, True)}
CANDIDATES_SCHEMA = {"id": ((str, int), True), "source": (str, True), "mask": (str, True),
                     "user_prompt": (str, False), "task": (str, True)}


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    index: int                 # position in the benchmark; the generation seed is eval.seed + index
    id: str
    task: str
    user_prompt: str | None
    prompt: str                # what the generator sees
    source: Image.Image        # RGB at generation size
    mask: np.ndarray           # uint8 (H, W), 255 = edit, at generation size
    where: str                 # "file:line" of the row


def _benchmark_rows(path: Path) -> tuple[Path, list[dict], str]:
    """(file, rows, prompt key) for a triplet JSONL or a generate folder."""
    if path.is_dir():
        f = path / "candidates.jsonl"
        if not f.is_file():
            raise InputError("not a generate output folder (no candidates.jsonl); pass a triplet JSONL or a "
                             "folder written by `onereward generate`", path=path, field="--benchmark")
        return f, read_jsonl(f, CANDIDATES_SCHEMA), "user_prompt"
    if not path.is_file():
        raise InputError("benchmark not found", path=path, field="--benchmark")
    if path.suffix.lower() != ".jsonl":
        raise InputError("expected a .jsonl file of triplets or a generate output folder", path=path,
                         field="--benchmark")
    return path, read_jsonl(path, TRIPLET_SCHEMA), "prompt"


def load_benchmark(path, recipe, warn=None) -> list[Sample]:
    """Read and validate every benchmark row (InputError names file:line:field and the sample)."""
    from .tasks import check_mask, fit_size, load_user_mask, resize_mask, task_prompt

    f, rows, prompt_key = _benchmark_rows(Path(path))
    if not rows:
        raise InputError("the benchmark has no samples", path=f)
    samples, seen = [], {}
    for rec in rows:
        line = rec["_line"]
        sid = str(rec["id"])
        if not _SAFE_ID.match(sid):
            raise InputError(f"id '{sid}' must be 1-128 letters, digits, '.', '_' or '-' (it names a file)",
                             path=f, line=line, field="id")
        if sid in seen:
            raise InputError(f"duplicate id '{sid}' (also on line {seen[sid]})", path=f, line=line, field="id")
        seen[sid] = line
        task = rec["task"]
        if task not in recipe.tasks:
            raise InputError(f"task '{task}' is not in the recipe (tasks: {', '.join(recipe.tasks)})", path=f,
                             line=line, field="task")
        tcfg = recipe.tasks[task]
        user = (rec.get(prompt_key) or "").strip() or None
        if tcfg.fixed_prompt is None and user is None:
            raise InputError(f"sample '{sid}': task {task} needs a prompt", path=f, line=line, field=prompt_key)
        src_path = (f.parent / rec["source"]).expanduser()
        mask_path = (f.parent / rec["mask"]).expanduser()
        src = open_image(src_path, where=f, line=line, field="source")
        if not mask_path.is_file():
            raise InputError(f"sample '{sid}': mask not found: {mask_path}", path=f, line=line, field="mask")
        user_mask = load_user_mask(mask_path, src.size, where=f, line=line, on_resize=(
            (lambda old, new: warn(f"{f}:{line}: sample '{sid}': mask is {old[0]}x{old[1]}, image "
                                   f"{new[0]}x{new[1]}; resized (nearest)")) if warn else None))
        size = fit_size(*src.size, recipe.eval.resolution)
        mask = resize_mask(user_mask, size)
        check_mask(mask, task, path=f, line=line)
        samples.append(Sample(len(samples), sid, task, user, task_prompt(tcfg, user),
                              src.resize(size, Image.BICUBIC) if src.size != size else src, mask, f"{f}:{line}"))
    return samples


# ----------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------
@dataclass
class Policy:
    label: str
    spec: str


def policy_label(spec: str) -> str:
    """A short, file-safe name: zoo:flux-fill -> zoo-flux-fill, runs/a/policy -> a-policy, org/Model -> Model."""
    s = spec.strip().rstrip("/")
    if s.startswith("zoo:"):
        base = "zoo-" + s[4:]
    else:
        parts = Path(s).expanduser().parts
        base = parts[-1] if parts else s
        if base in ("policy", "ema", "transformer") and len(parts) > 1:
            base = f"{parts[-2]}-{base}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "policy"


def make_policies(specs: list[str]) -> list[Policy]:
    out, used = [], set()
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise InputError("empty policy spec", field="--policy/--compare")
        label, k = policy_label(spec), 2
        while label in used:
            label = f"{policy_label(spec)}-{k}"
            k += 1
        used.add(label)
        out.append(Policy(label, spec.strip()))
    return out


def policy_fingerprint(spec: str) -> str:
    """What decides a policy's outputs: the spec, plus the names, sizes and mtimes of local files."""
    from .models.tiny import resolve_model_path

    h = hashlib.sha256(spec.encode())
    p = Path(resolve_model_path(spec) if spec.startswith("zoo:") else spec).expanduser()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _check_model_spec(spec: str, field: str):
    """Fail before any generation when a local model path plainly does not exist."""
    if spec.startswith("zoo:"):
        return
    p = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_local and not p.exists():
        raise InputError("model folder not found", path=spec, field=field)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def _to_tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _to_uint8(x) -> np.ndarray:
    # The pipeline's numpy_to_pil arithmetic: round(x * 255).
    return (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def gen_params(recipe) -> dict:
    e = recipe.eval
    return {"steps": e.steps, "guidance": e.guidance, "true_cfg": e.true_cfg, "negative_prompt": e.negative_prompt,
            "resolution": e.resolution, "max_sequence_length": e.max_sequence_length}


def _batches(samples: list[Sample], size: int):
    """Consecutive runs of same-sized samples, at most `size` each (a batch must share H and W)."""
    batch = []
    for s in samples:
        if batch and (len(batch) == size or batch[0].source.size != s.source.size):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _existing_edits(out: Path) -> dict[tuple[str, str], dict]:
    f = out / "edits.jsonl"
    if not f.is_file():
        return {}
    return {(r["policy"], r["id"]): r for r in read_jsonl(f, tolerate_torn_tail=True)}


def generate_edits(recipe, pol: Policy, samples: list[Sample], out: Path, device, dtype, progress,
                   existing: dict) -> tuple[dict[str, Image.Image], int]:
    """Edits of one policy for every sample ({id: image}, number generated now), reusing valid ones."""
    import torch

    from . import rollout
    from .models.flux_fill import load_fill_pipeline

    params = gen_params(recipe)
    fp = policy_fingerprint(pol.spec)
    edits: dict[str, Image.Image] = {}
    todo = []
    for s in samples:
        rec = existing.get((pol.label, s.id))
        path = out / "images" / pol.label / f"{s.id}.png"
        if (rec and rec.get("fingerprint") == fp and rec.get("seed") == recipe.eval.seed + s.index
                and rec.get("params") == params and path.is_file()):
            edits[s.id] = open_image(path)
        else:
            todo.append(s)
    if not todo:
        return edits, 0
    pipe = load_fill_pipeline(pol.spec, device=device, dtype=dtype)
    e = recipe.eval
    task = progress.add_task(f"generate {pol.label}", total=len(todo))
    try:
        for batch in _batches(todo, e.batch_size):
            texts = [s.prompt for s in batch] + ([e.negative_prompt] if e.true_cfg > 1 else [])
            table = rollout.encode_unique(pipe, texts, e.max_sequence_length, device=device)
            neg = table.lookup([e.negative_prompt] * len(batch)) if e.true_cfg > 1 else None
            gens = [torch.Generator("cpu").manual_seed(e.seed + s.index) for s in batch]
            imgs = rollout.full_rollout(pipe, torch.stack([_to_tensor(s.source) for s in batch]),
                                        torch.stack([torch.from_numpy(s.mask.astype(np.float32) / 255.0)[None]
                                                     for s in batch]),
                                        table.lookup([s.prompt for s in batch]), e.steps, e.guidance, gens,
                                        true_cfg=e.true_cfg, neg_embeds=neg)
            for s, x in zip(batch, imgs):
                rel = f"images/{pol.label}/{s.id}.png"
                arr = _to_uint8(x)
                save_png(out / rel, arr)
                append_jsonl(out / "edits.jsonl", {"policy": pol.label, "spec": pol.spec, "fingerprint": fp,
                                                   "id": s.id, "task": s.task, "seed": e.seed + s.index,
                                                   "params": params, "path": rel})
                edits[s.id] = Image.fromarray(arr)
            progress.advance(task, len(batch))
    finally:
        progress.remove_task(task)
        del pipe
        _free_memory()
    return edits, len(todo)


# ----------------------------------------------------------------------------------------------
# Summaries and tables
# ----------------------------------------------------------------------------------------------
MAIN_METRICS = ("pickscore", "imagereward", "hpsv2", "hpsv3", "remove", "oracle")


def summarise(mrun: MetricRun, policies: list[Policy], samples: list[Sample]) -> dict:
    """{task: {policy: {column: {"mean","std","n"}}}}."""
    task_of = {s.id: s.task for s in samples}
    acc: dict = {}
    for vals in mrun.values.values():
        for (pol, sid), row in vals.items():
            for col, v in row.items():
                acc.setdefault(task_of[sid], {}).setdefault(pol, {}).setdefault(col, []).append(v)
    return {t: {p: {c: mean_std(v) for c, v in cols.items()} for p, cols in per.items()} for t, per in acc.items()}


def _task_order(samples: list[Sample]) -> list[str]:
    present = {s.task for s in samples}
    return [t for t in TASK_TITLES if t in present] + sorted(present - set(TASK_TITLES))


def table2(summary: dict, mrun: MetricRun, policies: list[Policy], tasks: list[str]) -> Table | None:
    """Rows = policies; column groups = tasks; columns = the metrics that scored that task."""
    main = [c for c in mrun.columns if c.key.split(":")[0] in MAIN_METRICS and not c.key.startswith("oracle:")]
    groups, cols, keys = [], [], []
    for t in tasks:
        here = [c for c in main if any(c.key in summary.get(t, {}).get(p.label, {}) for p in policies)]
        if here:
            groups.append((task_title(t), len(here)))
            cols += [c.label for c in here]
            keys += [(t, c.key) for c in here]
    if not keys:
        return None
    rows = [[p.label] + [summary.get(t, {}).get(p.label, {}).get(k, {}).get("mean") for t, k in keys]
            for p in policies]
    return Table("Automatic metrics (Table 2 layout; mean over the benchmark samples of each task)",
                 ["Policy"] + cols, rows, groups=[("", 1)] + groups,
                 caption="Raw scores as each metric's authors define them; (norm.) columns divide by the scale "
                         "noted under the table. Higher is better for every metric.")


def oracle_table(summary: dict, mrun: MetricRun, policies: list[Policy], tasks: list[str], task_dims) -> Table | None:
    if "oracle" not in mrun.values:
        return None
    groups, cols, keys = [], [], []
    for t in tasks:
        dims = [d for d in task_dims.get(t, ()) if any(f"oracle:{d}" in summary.get(t, {}).get(p.label, {})
                                                       for p in policies)]
        if dims:
            groups.append((task_title(t), len(dims)))
            cols += dims
            keys += [(t, f"oracle:{d}") for d in dims]
    if not keys:
        return None
    rows = [[p.label] + [summary.get(t, {}).get(p.label, {}).get(k, {}).get("mean") for t, k in keys]
            for p in policies]
    return Table("Oracle judge per evaluation dimension (synthetic data only; in [0, 1])", ["Policy"] + cols, rows,
                 groups=[("", 1)] + groups)


def status_table(mrun: MetricRun) -> Table:
    rows = [[s.label, s.status, s.spec or "–", ", ".join(task_title(t) for t in s.tasks), s.note or "",
             round(s.seconds, 2)] for s in mrun.status.values()]
    return Table("Metric status", ["Metric", "Status", "Checkpoint", "Tasks", "Note", "Seconds"], rows, digits=2)


def plot_metrics(summary: dict, mrun: MetricRun, policies: list[Policy], tasks: list[str], path) -> Path | None:
    """One panel per metric: mean +- std per task, one bar per policy."""
    cols = [c for c in mrun.columns if c.key in MAIN_METRICS]
    if not cols:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols) + 1, 3.2), squeeze=False)
    width = 0.8 / max(1, len(policies))
    for ax, c in zip(axes[0], cols):
        ts = [t for t in tasks if any(c.key in summary.get(t, {}).get(p.label, {}) for p in policies)]
        for i, p in enumerate(policies):
            stats = [summary.get(t, {}).get(p.label, {}).get(c.key, {}) for t in ts]
            means = [s.get("mean") if s.get("mean") is not None else np.nan for s in stats]
            stds = [s.get("std") or 0.0 for s in stats]
            x = np.arange(len(ts)) + (i - (len(policies) - 1) / 2) * width
            ax.bar(x, means, width * 0.92, yerr=stds, capsize=2, label=p.label)
        ax.set_xticks(range(len(ts)))
        ax.set_xticklabels([task_title(t).replace(" w", "\nw") for t in ts], fontsize=7)
        ax.set_title(c.label, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# GSB and human ratings
# ----------------------------------------------------------------------------------------------
def run_reward_gsb(recipe, reward_spec: str, policies: list[Policy], samples: list[Sample], edits, device, dtype,
                   progress) -> tuple[dict, list[dict], str]:
    """({comparison: tally}, judgement records, note). A reward model that fails to load is a note."""
    from .metrics import first_line

    if len(policies) < 2:
        return {}, [], "no --compare policy: Good-Same-Bad needs two policies"
    if not recipe.eval.gsb:
        return {}, [], "disabled (eval.gsb=false)"
    try:
        from .reward import RewardScorer

        scorer = RewardScorer.load(reward_spec, recipe.reward, device=device, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - metrics and the report must survive a bad reward model
        return {}, [], f"reward model '{reward_spec}' failed to load: {first_line(e)}"
    p = policies[0]
    results, records = {}, []
    note = f"judged by {reward_spec} (P(yes) in both orders, query mode {recipe.reward.query_mode})"
    try:
        for q in policies[1:]:
            pairs = [(s.id, s.task, s.user_prompt, _to_tensor(edits[p.label][s.id]), _to_tensor(edits[q.label][s.id]))
                     for s in samples]
            recs = G.reward_judgements(scorer, recipe.tasks, pairs, query_mode=recipe.reward.query_mode,
                                       bold=recipe.reward.bold, batch_size=recipe.eval.batch_size, progress=progress)
            comp = f"{p.label} vs {q.label} (reward)"
            results[comp] = G.tally(recs)
            records += [{"comparison": comp, **r} for r in recs]
    except Exception as e:  # noqa: BLE001 - keep the metrics and the report
        note = f"reward-model judging failed: {first_line(e)}"
        results, records = {}, []
    finally:
        del scorer
        _free_memory()
    return results, records, note


def human_results(ratings, policies: list[Policy]) -> tuple[dict, dict, list[dict]]:
    """(Table 3 aggregate, {comparison: tally}, judgement records) from human ratings."""
    aliases = {p.spec: p.label for p in policies}
    for r in ratings:
        r.model = aliases.get(r.model, r.model)
    agg = H.aggregate(ratings)
    means = H.sample_means(ratings)
    results, records = {}, []
    models = {r.model for r in ratings}
    p = policies[0]
    for q in policies[1:]:
        if p.label in models and q.label in models:
            recs = G.rating_judgements(means, p.label, q.label)
            if recs:
                comp = f"{p.label} vs {q.label} (human)"
                results[comp] = G.tally(recs)
                records += [{"comparison": comp, **r} for r in recs]
    return agg, results, records


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def run(r, *, policy: str, benchmark, out, compare=(), reward_model: str | None = None, human=None):
    out = Path(out)
    benchmark = Path(benchmark)
    policies = make_policies([policy] + list(compare or []))
    reward_spec = reward_model or r.models.reward
    for p in policies:
        _check_model_spec(p.spec, "--policy" if p is policies[0] else "--compare")
    if len(policies) > 1 and r.eval.gsb:
        _check_model_spec(reward_spec, "--reward-model")
    warnings: list[str] = []
    samples = load_benchmark(benchmark, r, warn=lambda m: (warnings.append(m),
                                                            console.print(f"[yellow]{escape(m)}[/]", soft_wrap=True)))
    ratings = None
    if human is not None:
        ratings = H.attach_tasks(H.read_ratings(human), {s.id: s.task for s in samples}, human)

    device, dtype = resolve_device(r.device), torch_dtype(r.dtype)
    inputs = {"benchmark": benchmark}
    if human is not None:
        inputs["human"] = human
    man = RunManifest("eval", out, r, inputs=inputs, seed=r.eval.seed)
    man.set(policies=[{"label": p.label, "spec": p.spec} for p in policies], device=device,
            reward_model=reward_spec if len(policies) > 1 else None)
    out.mkdir(parents=True, exist_ok=True)
    _save_inputs(out, samples)

    existing = _existing_edits(out)
    edits: dict[str, dict[str, Image.Image]] = {}
    generated = 0
    task_dims = {t: tuple(c.dimensions) for t, c in r.tasks.items()}
    with _progress() as prog:
        with man.timed("generate"):
            for p in policies:
                edits[p.label], n = generate_edits(r, p, samples, out, device, dtype, prog, existing)
                generated += n
        items = {p.label: [EvalItem(s.id, s.task, s.prompt, s.source, s.mask, edits[p.label][s.id],
                                    task_dims[s.task]) for s in samples] for p in policies}
        with man.timed("metrics"):
            mrun = run_metrics(r.eval.metrics, items, device=device, dtype=dtype, batch_size=r.eval.batch_size,
                               dimensions_by_task=task_dims, progress=prog,
                               log=lambda m: console.print(m, highlight=False, soft_wrap=True))
        with man.timed("gsb"):
            gsb_results, gsb_records, gsb_note = run_reward_gsb(r, reward_spec, policies, samples, edits, device,
                                                                dtype, prog)
    agg, human_gsb, human_records = (None, {}, [])
    if ratings is not None:
        agg, human_gsb, human_records = human_results(ratings, policies)
    gsb_results.update(human_gsb)
    gsb_records += human_records

    tasks = _task_order(samples)
    summary = summarise(mrun, policies, samples)
    with man.timed("report"):
        sections, tables = _sections(r, out, benchmark, samples, policies, mrun, summary, tasks, task_dims,
                                     gsb_results, gsb_note, agg, human, warnings)
        write_json(out / "metrics.json", _metrics_json(benchmark, samples, policies, mrun, summary, gsb_results,
                                                       gsb_records, gsb_note, agg, human, r))
        md, page = write_report(out, "OneReward evaluation", sections,
                                subtitle=f"benchmark {benchmark} · {len(samples)} samples · "
                                         f"policies {', '.join(p.label for p in policies)}")
    print_tables(tables, console)
    man.count(samples=len(samples), policies=len(policies), edits_generated=generated,
              edits_reused=len(samples) * len(policies) - generated, gsb_judgements=len(gsb_records),
              human_ratings=len(ratings or []))
    man.set(metrics={k: {"status": s.status, "note": s.note, "spec": s.spec} for k, s in mrun.status.items()},
            gsb_note=gsb_note, outputs=["metrics.json", "report.md", "report.html", "edits.jsonl", "images/"])
    man.write()
    errors = [s for s in mrun.status.values() if s.status == "error"]
    for s in errors:
        console.print(f"[yellow]metric {s.name} failed: {escape(s.note)}[/]", highlight=False, soft_wrap=True)
    console.print(f"eval: {len(samples)} samples x {len(policies)} policies -> {page}", highlight=False, soft_wrap=True)
    return out / "metrics.json"


def _save_inputs(out: Path, samples: list[Sample]):
    for s in samples:
        src, msk = out / "images" / "_inputs" / f"{s.id}_source.png", out / "images" / "_inputs" / f"{s.id}_mask.png"
        if not src.is_file():
            save_png(src, s.source)
        if not msk.is_file():
            save_png(msk, Image.fromarray(s.mask))


def _sections(r, out, benchmark, samples, policies, mrun, summary, tasks, task_dims, gsb_results, gsb_note, agg,
              human, warnings):
    counts = {t: sum(1 for s in samples if s.task == t) for t in tasks}
    e = r.eval
    setup = Section("Setup", text=(
        f"Benchmark `{benchmark}`: " + ", ".join(f"{counts[t]} {task_title(t)}" for t in tasks) + ". "
        f"Every policy edits every sample with seed {e.seed} + sample index, {e.steps} steps, guidance {e.guidance:g}, "
        f"true CFG {e.true_cfg:g}" + (f" (negative prompt \"{e.negative_prompt}\")" if e.true_cfg > 1 else "")
        + f", about {e.resolution}² pixels."),
        tables=[Table("Policies", ["Label", "Spec", "Role"],
                      [[p.label, p.spec, "P" if i == 0 else "compared (Q)"] for i, p in enumerate(policies)])],
        notes=warnings)
    t2 = table2(summary, mrun, policies, tasks)
    ot = oracle_table(summary, mrun, policies, tasks, task_dims)
    st = status_table(mrun)
    notes = [f"{s.label}: {s.status} — {s.note}" for s in mrun.status.values() if s.status == "error"]
    notes += [f"{s.label}: {s.note}" for s in mrun.status.values() if s.status == "ok" and s.note]
    skipped = [s.label for s in mrun.status.values() if s.status == "skipped"]
    if skipped:
        notes.append(f"not configured (skipped): {', '.join(skipped)}; set eval.metrics.<name> to a checkpoint")
    figs = []
    mp = plot_metrics(summary, mrun, policies, tasks, out / "metrics.png")
    if mp:
        figs.append(Figure(mp, "Mean ± std of each metric per task and policy."))
    metrics_sec = Section("Automatic metrics", tables=[t for t in (t2, ot, st) if t is not None], figures=figs,
                          notes=notes, text="" if t2 else "No metric produced values (see the status table).")
    sections = [setup, metrics_sec]
    tables = [t for t in (t2, ot) if t is not None]

    gsec = Section("Good-Same-Bad (Fig. 7)", notes=[gsb_note] if gsb_note else [])
    if gsb_results:
        gt = Table("Good / Same / Bad of P against each compared policy (%)",
                   ["Comparison", "Task", "Dimension", "Good %", "Same %", "Bad %", "n", "Net"],
                   G.gsb_rows(gsb_results, task_title), digits=1,
                   caption="Reward model: Good when P wins both orders (P(yes|P,Q) > 0.5 and P(yes|Q,P) < 0.5), "
                           "Bad when the compared policy wins both, Same otherwise. Human: higher mean rating. "
                           "Net = (Good - Bad) / n.")
        gp = G.plot_gsb(gsb_results, out / "gsb.png", task_title)
        gsec.tables.append(gt)
        gsec.figures.append(Figure(gp, "Good (orange) / Same (green) / Bad (blue) per task, Fig. 7 layout."))
        # The terminal gets the per-task lines only; the report keeps the per-dimension breakdown.
        tables.append(Table(gt.title, ["Comparison", "Task", "Good %", "Same %", "Bad %", "n"],
                            [[c, t, g, s_, b, n] for c, t, d, g, s_, b, n, _ in gt.rows if d == "all dimensions"],
                            digits=1))
    sections.append(gsec)

    if agg is not None:
        t3 = H.table3(agg, model_order=[p.label for p in policies])
        sections.append(Section("Human evaluation (Table 3)", text=f"Ratings from `{human}`.", tables=[t3]))
        tables.append(t3)

    grids = []
    for t in tasks:
        rows = []
        for s in [s for s in samples if s.task == t][:max(0, e.grid_samples)]:
            label = s.id + (f" — “{s.user_prompt}”" if s.user_prompt else "")
            rows.append((label, [out / "images" / "_inputs" / f"{s.id}_source.png",
                                 out / "images" / "_inputs" / f"{s.id}_mask.png"]
                         + [out / "images" / p.label / f"{s.id}.png" for p in policies]))
        if rows:
            grids.append(Grid(task_title(t), ["source", "mask"] + [p.label for p in policies], rows,
                              caption="Mask: white = edited region."))
    if grids:
        sections.append(Section("Edits", grids=grids,
                                text=f"The first {e.grid_samples} samples of each task; all edits are under `images/`."))
    return sections, tables


def _metrics_json(benchmark, samples, policies, mrun, summary, gsb_results, gsb_records, gsb_note, agg, human, r):
    task_of = {s.id: s.task for s in samples}
    per_sample = {}
    for vals in mrun.values.values():
        for (pol, sid), row in vals.items():
            per_sample.setdefault((pol, sid), {}).update(row)
    return {
        "benchmark": str(benchmark),
        "n_samples": len(samples),
        "tasks": {t: sum(1 for s in samples if s.task == t) for t in _task_order(samples)},
        "policies": [{"label": p.label, "spec": p.spec} for p in policies],
        "generation": gen_params(r) | {"seed": r.eval.seed, "seed_rule": "eval.seed + sample index"},
        "metrics": {k: {"label": s.label, "status": s.status, "note": s.note, "spec": s.spec, "tasks": list(s.tasks),
                        "seconds": round(s.seconds, 3)} for k, s in mrun.status.items()},
        "columns": [{"key": c.key, "label": c.label, "metric": c.metric} for c in mrun.columns],
        "summary": summary,
        "per_sample": [{"policy": p, "id": sid, "task": task_of[sid], "values": v}
                       for (p, sid), v in sorted(per_sample.items())],
        "gsb": {"note": gsb_note,
                "comparisons": {c: {t: {d: g.to_dict() for d, g in per.items()} for t, per in res.items()}
                                for c, res in gsb_results.items()},
                "judgements": gsb_records},
        "human": None if agg is None else {"file": str(human), "table3": agg},
    }

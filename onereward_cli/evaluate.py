"""`onereward eval`: generate with fixed seeds, score (paper Table 2), compare (Fig. 7), report.

    onereward eval --policy ./rl/policy --compare zoo:flux-fill --benchmark bench.jsonl --out ./eval
    onereward eval --recipe eval-onereward-release --benchmark bench.jsonl --out ./eval

1. Benchmark: a JSONL of triplets {"id","source","mask","prompt","task"} (paths relative to the JSONL)
   or a `generate` output folder (candidates.jsonl: its source, mask, user prompt and task per sample).
   Every row is validated (images readable, mask aspect = image aspect, mask not empty at every
   resolution a policy runs at, a prompt for tasks that need one) before any model is loaded.
2. Policies: --policy/--compare, or the recipe's eval.policy/eval.compare. Each runs with its own
   inference settings (onereward_policy.json of an rl output, or the OneReward release's) where it has
   them, the recipe's eval.* where it has none, and eval.override.* wherever the recipe forces a value;
   a policy's own fixed prompts ("remove", ...) replace the recipe's for prompt-free tasks.
3. Generation: every policy edits every sample with the same seed (eval.seed + sample index) through
   the one rollout implementation. Each edit is written to images/<policy label>/<id>.png and recorded
   in edits.jsonl as soon as its batch is done, and nothing keeps edits in memory: a killed run resumes
   with the edits whose policy files, seed, prompt and settings are unchanged.
4. Metrics (onereward_cli.metrics): each enabled metric scores every policy's edits for its tasks,
   reading them from disk a batch at a time; a metric that fails is recorded in metrics.json and the
   report, the others go on. Scores (and reward-model judgements) are appended to scores.jsonl as
   they are made, so a re-run scores only what is new.
5. Good-Same-Bad of the first policy against each compared policy, judged by the OneReward scorer in
   both orders per dimension, and from --human ratings when given; Table 3 from --human.
6. metrics.json, run.json, report.md and a self-contained report.html; tables also in the terminal.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .artifacts import RunManifest, append_jsonl, open_image, read_jsonl, remove_stale_temps, save_png, write_json
from .errors import InputError
from .metrics import MetricRun, _free_memory, mean_std, run_metrics
from .metrics import gsb as G
from .metrics import human as H
from .recipe import resolve_device, torch_dtype
from .report import Figure, Grid, Section, Table, print_tables, pyplot, save_figure, write_report
from .text_cache import TextCache, cache_root

console = Console(stderr=True)
TASK_TITLES = H.TASK_TITLES
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TRIPLET_SCHEMA = {"id": ((str, int), True), "source": (str, True), "mask": (str, True), "prompt": (str, False),
                  "task": (str, True)}
CANDIDATES_SCHEMA = {"id": ((str, int), True), "source": (str, True), "mask": (str, True),
                     "user_prompt": (str, False), "task": (str, True)}
SETTING_LABELS = {"steps": "Steps", "guidance": "Guidance", "true_cfg": "True CFG",
                  "negative_prompt": "Negative prompt", "resolution": "Resolution"}


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One benchmark row, validated. Pixels stay on disk: `condition(resolution)` reads them."""
    index: int                 # position in the benchmark; the generation seed is eval.seed + index
    id: str
    task: str
    user_prompt: str | None
    source_path: Path
    mask_path: Path
    size: tuple[int, int]      # the source's (W, H)
    where: str                 # "file:line" of the row

    def condition(self, resolution: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB source, uint8 mask with 255 = edit) at about resolution**2 pixels, multiples of 16."""
        from .tasks import fit_size, load_user_mask, resize_mask

        src = open_image(self.source_path)
        size = fit_size(*src.size, resolution)
        mask = resize_mask(load_user_mask(self.mask_path, src.size), size)
        return (src.resize(size, Image.BICUBIC) if src.size != size else src), mask


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


def load_benchmark(path, recipe, warn=None, resolutions=()) -> list[Sample]:
    """Read and validate every benchmark row (InputError names file:line:field and the sample). Masks
    are checked at eval.resolution and at every resolution in `resolutions`."""
    from .tasks import check_mask, fit_size, load_user_mask, resize_mask

    f, rows, prompt_key = _benchmark_rows(Path(path))
    if not rows:
        raise InputError("the benchmark has no samples", path=f)
    sizes = sorted({recipe.eval.resolution, *resolutions})
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
        for res in sizes:
            check_mask(resize_mask(user_mask, fit_size(*src.size, res)), task, path=f, line=line)
        samples.append(Sample(len(samples), sid, task, user, src_path, mask_path, src.size, f"{f}:{line}"))
    return samples


# ----------------------------------------------------------------------------------------------
# Policies and their inference settings
# ----------------------------------------------------------------------------------------------
@dataclass
class Policy:
    label: str
    spec: str
    settings: dict = field(default_factory=dict)   # steps, guidance, true_cfg, negative_prompt, resolution
    sources: dict = field(default_factory=dict)    # key -> "policy" | "recipe" | "override"
    prompts: dict = field(default_factory=dict)    # its own fixed prompts {task: prompt}
    settings_from: str = ""                         # where its own settings come from ("" = none)

    def prompt(self, recipe, s: Sample) -> str:
        """The prompt the generator sees: the user's, or the fixed prompt of a prompt-free task (the
        policy's own when it has one, e.g. the release's "remove")."""
        tcfg = recipe.tasks[s.task]
        if tcfg.fixed_prompt is None:
            return s.user_prompt or ""
        return self.prompts.get(s.task) or tcfg.fixed_prompt

    def settings_note(self) -> str:
        """Where the settings came from, for the report."""
        by = {src: [k for k in self.settings if self.sources.get(k) == src] for src in ("policy", "recipe", "override")}
        parts = []
        if by["policy"]:
            parts.append(f"own ({self.settings_from})")
        if by["recipe"]:
            parts.append("recipe eval.*" + (f": {', '.join(by['recipe'])}" if by["policy"] or by["override"] else ""))
        if by["override"]:
            parts.append(f"eval.override: {', '.join(by['override'])}")
        return "; ".join(parts)


def policy_label(spec: str) -> str:
    """A short, file-safe name: zoo:flux-fill -> zoo-flux-fill, runs/a/policy -> a-policy, org/Model -> Model,
    bytedance-research/OneReward/flux.1-fill-dev-OneReward-transformer -> OneReward (release folders)."""
    s = spec.strip().rstrip("/")
    if s.startswith("zoo:"):
        base = "zoo-" + s[4:]
    else:
        parts = Path(s).expanduser().parts
        base = parts[-1] if parts else s
        if base in ("policy", "ema", "transformer") and len(parts) > 1:
            base = f"{parts[-2]}-{base}"
        m = re.fullmatch(r"flux\.1-fill-dev-(.+?)(-transformer)?", base)
        if m:  # the OneReward release's folder names
            base = m.group(1)
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


def recipe_settings(recipe) -> dict:
    e = recipe.eval
    return {"steps": e.steps, "guidance": e.guidance, "true_cfg": e.true_cfg, "negative_prompt": e.negative_prompt,
            "resolution": e.resolution}


def describe_policies(recipe, policies: list[Policy]):
    """Fill in each policy's settings and prompts (reads policy files, nothing heavy); bad specs fail here,
    before any generation."""
    import dataclasses

    from .models.flux_fill import describe_policy, resolve_settings

    override = dataclasses.asdict(recipe.eval.override)
    for p in policies:
        info = describe_policy(p.spec)  # errors name the spec
        p.settings, p.sources = resolve_settings(info.inference, recipe_settings(recipe), override)
        p.prompts, p.settings_from = dict(info.prompts), info.settings_from


def gen_params(recipe, pol: Policy) -> dict:
    """Everything besides the seed and prompt that decides an edit."""
    return dict(pol.settings) | {"max_sequence_length": recipe.eval.max_sequence_length}


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


# ----------------------------------------------------------------------------------------------
# Generation: edits go to disk as soon as they exist; nothing holds them in memory
# ----------------------------------------------------------------------------------------------
def _to_tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _to_uint8(x) -> np.ndarray:
    # The pipeline's numpy_to_pil arithmetic: round(x * 255).
    return (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _batches(samples: list[Sample], size: int, resolution: int):
    """Consecutive runs of samples of the same generation size, at most `size` each."""
    from .tasks import fit_size

    batch, shape = [], None
    for s in samples:
        here = fit_size(*s.size, resolution)
        if batch and (len(batch) == size or shape != here):
            yield batch
            batch = []
        batch.append(s)
        shape = here
    if batch:
        yield batch


def inputs_dir(out: Path, resolution: int) -> Path:
    return out / "images" / "_inputs" / f"{resolution}px"


def edit_path(out: Path, pol: Policy, s: Sample) -> Path:
    return out / "images" / pol.label / f"{s.id}.png"


def edit_key(rec: dict) -> str:
    """Identity of an edit (its policy files, seed, prompt and settings) for the score cache."""
    keep = {k: rec.get(k) for k in ("policy", "fingerprint", "id", "seed", "prompt", "params")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:20]


def _existing_edits(out: Path) -> dict[tuple[str, str], dict]:
    f = out / "edits.jsonl"
    if not f.is_file():
        return {}
    return {(r["policy"], r["id"]): r for r in read_jsonl(f, tolerate_torn_tail=True)}


def generate_edits(recipe, pol: Policy, samples: list[Sample], out: Path, device, dtype, progress,
                   existing: dict) -> tuple[dict[str, dict], int]:
    """Write every missing edit of one policy to disk. Returns ({id: edit record}, number generated now);
    `existing` (policy, id) -> record from an earlier run supplies the edits that are still valid."""
    import torch

    from . import rollout
    from .models.flux_fill import load_fill_pipeline

    params = gen_params(recipe, pol)
    fp = policy_fingerprint(pol.spec)
    records: dict[str, dict] = {}
    todo = []
    for s in samples:
        rec = existing.get((pol.label, s.id))
        want = {"policy": pol.label, "spec": pol.spec, "fingerprint": fp, "id": s.id, "task": s.task,
                "seed": recipe.eval.seed + s.index, "prompt": pol.prompt(recipe, s), "params": params,
                "path": f"images/{pol.label}/{s.id}.png"}
        if rec and all(rec.get(k) == want[k] for k in ("fingerprint", "seed", "prompt", "params")) \
                and edit_path(out, pol, s).is_file():
            records[s.id] = want
        else:
            todo.append((s, want))
    if not todo:
        return records, 0
    e, st = recipe.eval, pol.settings
    pipe = load_fill_pipeline(pol.spec, device=device, dtype=dtype,
                              default_base=recipe.models.fill_pipeline or recipe.models.policy)
    task = progress.add_task(f"generate {pol.label}", total=len(todo))
    wants = {s.id: w for s, w in todo}
    cfg = st["true_cfg"] > 1
    try:
        # Every prompt of this policy's edits into the on-disk cache (policies sharing text encoders
        # share it), then only each batch's rows on the device.
        text = TextCache(cache_root(recipe, out), pipe, e.max_sequence_length, recipe.text_cache.batch_size)
        text.ensure([w["prompt"] for w in wants.values()] + ([st["negative_prompt"]] if cfg else []), device=device)
        for batch in _batches([s for s, _ in todo], e.batch_size, st["resolution"]):
            conds = [s.condition(st["resolution"]) for s in batch]
            prompts = [wants[s.id]["prompt"] for s in batch]
            neg = text.get([st["negative_prompt"]] * len(batch), device=device) if cfg else None
            gens = [torch.Generator("cpu").manual_seed(e.seed + s.index) for s in batch]
            imgs = rollout.full_rollout(pipe, torch.stack([_to_tensor(src) for src, _ in conds]),
                                        torch.stack([torch.from_numpy(m.astype(np.float32) / 255.0)[None]
                                                     for _, m in conds]),
                                        text.get(prompts, device=device), st["steps"], st["guidance"], gens,
                                        true_cfg=st["true_cfg"], neg_embeds=neg)
            for s, x in zip(batch, imgs):
                save_png(edit_path(out, pol, s), _to_uint8(x))
                append_jsonl(out / "edits.jsonl", wants[s.id])  # after the PNG: a record means a whole edit
                records[s.id] = wants[s.id]
            del conds, imgs
            progress.advance(task, len(batch))
    finally:
        progress.remove_task(task)
        del pipe
        _free_memory()
    return records, len(todo)


@dataclass
class DiskItem:
    """An edit to score, read from disk on every access (the metrics' EvalItem, without the pixels)."""
    id: str
    task: str
    prompt: str
    dimensions: tuple[str, ...]
    source_path: Path
    mask_path: Path
    image_path: Path
    key: str = ""   # edit_key of the edit: scores are cached under it

    @property
    def source(self) -> Image.Image:
        return open_image(self.source_path)

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(open_image(self.mask_path, mode="L"))

    @property
    def image(self) -> Image.Image:
        return open_image(self.image_path)


class ScoreCache:
    """scores.jsonl: metric scores and reward-model judgements, appended as they are made. A value is
    reused when its metric (name, checkpoint files, columns) and its edit (edit_key) are the same."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, object] = {}
        if path.is_file():
            for r in read_jsonl(path, tolerate_torn_tail=True):
                self.rows[r["key"]] = r["value"]
        self._fp: dict[str, str] = {}
        self.reused = 0

    def fingerprint(self, spec: str) -> str:
        if spec not in self._fp:
            self._fp[spec] = policy_fingerprint(spec) if spec else ""
        return self._fp[spec]

    def _get(self, key: str):
        v = self.rows.get(key)
        if v is not None:
            self.reused += 1
        return v

    def _put(self, key: str, value):
        append_jsonl(self.path, {"key": key, "value": value})
        self.rows[key] = value

    def _metric_key(self, metric, policy: str, item) -> str | None:
        if not getattr(item, "key", ""):
            return None
        cols = ",".join(c.key for c in metric.columns)
        return f"metric|{metric.name}|{self.fingerprint(metric.spec)}|{cols}|{policy}|{item.key}"

    def lookup(self, metric, policy: str, item):
        k = self._metric_key(metric, policy, item)
        return None if k is None else self._get(k)

    def store(self, metric, policy: str, item, row: dict):
        k = self._metric_key(metric, policy, item)
        if k is not None:
            self._put(k, row)

    def gsb_key(self, recipe, reward_spec: str, sid: str, p_key: str, q_key: str) -> str:
        from .recipe import to_plain

        # Everything that changes a judgement: the reward model's files, the query settings, the tasks.
        how = hashlib.sha256(json.dumps([to_plain(recipe.reward), to_plain(recipe.tasks)], sort_keys=True)
                             .encode()).hexdigest()[:12]
        return f"gsb|{self.fingerprint(reward_spec)}|{how}|{sid}|{p_key}|{q_key}"


class LazyPairs(SequenceABC):
    """(id, task, user prompt, P edit, Q edit) per sample for gsb.reward_judgements, read a slice at a time."""

    def __init__(self, samples: list[Sample], p_paths: list[Path], q_paths: list[Path]):
        self.samples, self.p, self.q = samples, p_paths, q_paths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self.samples[i]
        return s.id, s.task, s.user_prompt, _to_tensor(open_image(self.p[i])), _to_tensor(open_image(self.q[i]))


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
def run_reward_gsb(recipe, reward_spec: str, policies: list[Policy], samples: list[Sample], edits: dict, out: Path,
                   device, dtype, progress, cache: ScoreCache) -> tuple[dict, list[dict], str]:
    """({comparison: tally}, judgement records, note). Edits are read from disk a batch at a time and
    judgements cached per sample; a reward model that fails to load is a note."""
    from .metrics import first_line

    if len(policies) < 2:
        return {}, [], "no --compare policy: Good-Same-Bad needs two policies"
    if not recipe.eval.gsb:
        return {}, [], "disabled (eval.gsb=false)"
    p = policies[0]
    keys = {(q.label, s.id): cache.gsb_key(recipe, reward_spec, s.id, edit_key(edits[p.label][s.id]),
                                           edit_key(edits[q.label][s.id]))
            for q in policies[1:] for s in samples}
    todo = {q.label: [s for s in samples if cache._get(keys[(q.label, s.id)]) is None] for q in policies[1:]}
    note = f"judged by {reward_spec} (P(yes) in both orders, query mode {recipe.reward.query_mode})"
    scorer = None
    if any(todo.values()):
        try:
            from .reward import RewardScorer

            scorer = RewardScorer.load(reward_spec, recipe.reward, device=device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - metrics and the report must survive a bad reward model
            return {}, [], f"reward model '{reward_spec}' failed to load: {first_line(e)}"
    results, records = {}, []
    bar = progress.add_task("GSB (reward model)", total=sum(len(v) for v in todo.values()))
    try:
        bs = recipe.eval.batch_size
        for q in policies[1:]:
            mine = todo[q.label]
            for i in range(0, len(mine), bs):
                chunk = mine[i:i + bs]
                pairs = LazyPairs(chunk, [out / edits[p.label][s.id]["path"] for s in chunk],
                                  [out / edits[q.label][s.id]["path"] for s in chunk])
                recs = G.reward_judgements(scorer, recipe.tasks, pairs, query_mode=recipe.reward.query_mode,
                                           bold=recipe.reward.bold, batch_size=bs)
                for s in chunk:
                    cache._put(keys[(q.label, s.id)], [r for r in recs if r["id"] == s.id])
                progress.advance(bar, len(chunk))
            recs = [r for s in samples for r in cache.rows[keys[(q.label, s.id)]]]
            comp = f"{p.label} vs {q.label} (reward)"
            results[comp] = G.tally(recs)
            records += [{"comparison": comp, **r} for r in recs]
    except Exception as e:  # noqa: BLE001 - keep the metrics and the report
        note = f"reward-model judging failed: {first_line(e)}"
        results, records = {}, []
    finally:
        progress.remove_task(bar)
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


def run(r, *, policy: str | None = None, benchmark, out, compare=None, reward_model: str | None = None, human=None):
    out = Path(out)
    benchmark = Path(benchmark)
    if not policy and not r.eval.policy:
        raise InputError("name the policy to evaluate (or set eval.policy in the recipe)", field="--policy")
    # The command line replaces the recipe's eval.policy / eval.compare, each on its own.
    specs = [policy or r.eval.policy] + list(compare or r.eval.compare)
    policies = make_policies(specs)
    reward_spec = reward_model or r.models.reward
    describe_policies(r, policies)
    if len(policies) > 1 and r.eval.gsb:
        _check_model_spec(reward_spec, "--reward-model" if reward_model else "models.reward")
    _check_metric_specs(r.eval.metrics)
    warnings: list[str] = []
    samples = load_benchmark(benchmark, r, warn=lambda m: (warnings.append(m),
                                                            console.print(f"[yellow]{escape(m)}[/]", soft_wrap=True)),
                             resolutions=[p.settings["resolution"] for p in policies])
    ratings = None
    if human is not None:
        ratings = H.attach_tasks(H.read_ratings(human), {s.id: s.task for s in samples}, human)

    device, dtype = resolve_device(r.device), torch_dtype(r.dtype)
    inputs = {"benchmark": benchmark}
    if human is not None:
        inputs["human"] = human
    man = RunManifest("eval", out, r, inputs=inputs, seed=r.eval.seed)
    man.set(policies=[_policy_json(p) for p in policies], device=device,
            reward_model=reward_spec if len(policies) > 1 else None)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # what a killed run's half-done writes left (eval is one process)
    resolutions = sorted({p.settings["resolution"] for p in policies})
    _save_inputs(out, samples, resolutions)
    print_tables([policies_table(policies)], console)

    existing = _existing_edits(out)
    edits: dict[str, dict[str, dict]] = {}
    cache = ScoreCache(out / "scores.jsonl")
    generated = 0
    task_dims = {t: tuple(c.dimensions) for t, c in r.tasks.items()}
    with _progress() as prog:
        with man.timed("generate"):
            for p in policies:
                edits[p.label], n = generate_edits(r, p, samples, out, device, dtype, prog, existing)
                generated += n
        items = {p.label: [DiskItem(s.id, s.task, p.prompt(r, s), task_dims[s.task],
                                    inputs_dir(out, p.settings["resolution"]) / f"{s.id}_source.png",
                                    inputs_dir(out, p.settings["resolution"]) / f"{s.id}_mask.png",
                                    out / edits[p.label][s.id]["path"], edit_key(edits[p.label][s.id]))
                           for s in samples] for p in policies}
        with man.timed("metrics"):
            mrun = run_metrics(r.eval.metrics, items, device=device, dtype=dtype, batch_size=r.eval.batch_size,
                               dimensions_by_task=task_dims, progress=prog, cache=cache,
                               log=lambda m: console.print(m, highlight=False, soft_wrap=True))
        with man.timed("gsb"):
            gsb_results, gsb_records, gsb_note = run_reward_gsb(r, reward_spec, policies, samples, edits, out, device,
                                                                dtype, prog, cache)
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
              human_ratings=len(ratings or []), scores_reused=cache.reused)
    man.set(metrics={k: {"status": s.status, "note": s.note, "spec": s.spec} for k, s in mrun.status.items()},
            gsb_note=gsb_note, outputs=["metrics.json", "report.md", "report.html", "edits.jsonl", "scores.jsonl",
                                        "images/"])
    man.write()
    errors = [s for s in mrun.status.values() if s.status == "error"]
    for s in errors:
        console.print(f"[yellow]metric {s.name} failed: {escape(s.note)}[/]", highlight=False, soft_wrap=True)
    console.print(f"eval: {len(samples)} samples x {len(policies)} policies -> {page}", highlight=False, soft_wrap=True)
    return out / "metrics.json"


def _check_model_spec(spec: str, field: str, config: bool = True):
    """Fail before any generation when a local model path plainly cannot load: missing, an empty folder
    or file, or (with `config`, the reward model) a folder without config.json. A hub id is
    "owner/name"; anything with more slashes is a path."""
    if spec.startswith(("zoo:", "zoo-random:")):
        return
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    path = Path(spec).expanduser()
    if not path.exists():
        if looks_local:
            raise InputError("model folder not found", path=spec, field=field)
        return
    if path.is_dir() and not any(path.iterdir()):
        raise InputError("model folder is empty", path=spec, field=field)
    if path.is_dir() and config and not (path / "config.json").is_file():
        raise InputError("not a model folder (no config.json)", path=spec, field=field)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError("model file is empty", path=spec, field=field)


def _check_metric_specs(mcfg):
    """A configured metric whose checkpoint plainly cannot load is an error, not a quietly missing column."""
    from .metrics import metric_specs

    for name, spec in metric_specs(mcfg).items():
        if spec and name != "oracle":
            _check_model_spec(spec, f"eval.metrics.{name}", config=False)


def _policy_json(p: Policy) -> dict:
    return {"label": p.label, "spec": p.spec, "settings": p.settings, "settings_source": p.sources,
            "own_settings_from": p.settings_from or None, "prompts": p.prompts}


def _save_inputs(out: Path, samples: list[Sample], resolutions: list[int]):
    for res in resolutions:
        d = inputs_dir(out, res)
        for s in samples:
            src, msk = d / f"{s.id}_source.png", d / f"{s.id}_mask.png"
            if not (src.is_file() and msk.is_file()):
                image, mask = s.condition(res)
                save_png(src, image)
                save_png(msk, Image.fromarray(mask))


def _fmt_setting(k: str, v) -> str:
    if k == "negative_prompt":
        return f"“{v}”" if v else "–"
    if k == "resolution":
        return f"{v}²"
    return f"{v:g}" if isinstance(v, float) else str(v)


def policies_table(policies: list[Policy]) -> Table:
    """Which inference settings each policy ran with, and where they came from."""
    rows = [[p.label, p.spec, "P" if i == 0 else "compared (Q)"]
            + [_fmt_setting(k, p.settings[k]) for k in SETTING_LABELS] + [p.settings_note()]
            for i, p in enumerate(policies)]
    return Table("Policies and the inference settings each ran with", ["Label", "Spec", "Role"]
                 + list(SETTING_LABELS.values()) + ["Settings from"], rows,
                 caption="own = the policy's onereward_policy.json or the OneReward release's settings; recipe "
                         "eval.* = the recipe's values for policies without settings of their own; eval.override = "
                         "forced by the recipe. The negative prompt is used only with true CFG > 1.")


def _sections(r, out, benchmark, samples, policies, mrun, summary, tasks, task_dims, gsb_results, gsb_note, agg,
              human, warnings):
    counts = {t: sum(1 for s in samples if s.task == t) for t in tasks}
    e = r.eval
    own_prompts = [f"{p.label}: " + ", ".join(f"{task_title(t)} “{v}”" for t, v in p.prompts.items())
                   for p in policies if p.prompts]
    setup = Section("Setup", text=(
        f"Benchmark `{benchmark}`: " + ", ".join(f"{counts[t]} {task_title(t)}" for t in tasks) + ". "
        f"Every policy edits every sample with seed {e.seed} + sample index and its own inference settings "
        "(table below); prompt-free tasks use each policy's own fixed prompts where it has them."),
        tables=[policies_table(policies)],
        notes=warnings + ([f"fixed prompts of {x}" for x in own_prompts] if own_prompts else []))
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
            d = inputs_dir(out, e.resolution if any(p.settings["resolution"] == e.resolution for p in policies)
                           else policies[0].settings["resolution"])
            rows.append((label, [d / f"{s.id}_source.png", d / f"{s.id}_mask.png"]
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
        "policies": [_policy_json(p) for p in policies],
        "generation": {"seed": r.eval.seed, "seed_rule": "eval.seed + sample index",
                       "max_sequence_length": r.eval.max_sequence_length,
                       "per_policy": {p.label: p.settings for p in policies}},
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

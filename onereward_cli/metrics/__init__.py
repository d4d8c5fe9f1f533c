"""Automatic evaluation metrics (paper §5.1, Table 2), each computed as its authors define it.

| name        | model                                  | score                                         | tasks              |
|-------------|----------------------------------------|-----------------------------------------------|--------------------|
| pickscore   | CLIP-H (transformers CLIPModel)        | logit_scale.exp() * cos(text, image)          | fill, extend(*)    |
| imagereward | BLIP ViT-L + BERT cross-attn + MLP     | (mlp(h_cls) - 0.16717) / 1.03334               | fill, extend(*)    |
| hpsv2       | open_clip ViT-H-14 + HPS weights       | cos(text, image), no logit scale              | fill, extend(*)    |
| hpsv3       | Qwen2-VL-7B + <|Reward|> head          | mu of the (mu, log sigma) head output         | fill, extend(*)    |
| remove      | SAM ViT-H image encoder                | cos(mean feature inside mask, outside mask)   | removal            |
| oracle      | onereward_cli.synth.oracle_scores      | one column per task dimension, in [0, 1]      | all                |

(*) extend and extend_no_prompt; text-image metrics score the prompt the generator saw (the fixed
prompt for prompt-free tasks). A metric runs when its checkpoint is set in `eval.metrics.<name>` and is
skipped with a note otherwise. Loading or scoring failures are recorded per metric; the others go on.

Every loader reads safetensors only. Official checkpoints that ship as pickles (ImageReward.pt,
HPS_v2*_compressed.pt) are converted once with `python -m onereward_cli.metrics.convert`.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

TEXT_IMAGE_TASKS = ("fill", "extend", "extend_no_prompt")
REMOVAL_TASKS = ("removal",)
ALL_TASKS = ("fill", "extend", "extend_no_prompt", "removal")

# OpenAI CLIP normalisation, used by PickScore's processor, HPSv2 and ImageReward.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EvalItem:
    """One edit to score, with the inputs that produced it."""
    id: str
    task: str
    prompt: str                 # the prompt the generator saw
    source: Image.Image         # RGB input (canvas for extend), at the edit's size
    mask: np.ndarray            # uint8 (H, W), 255 = edit
    image: Image.Image          # the edit
    dimensions: tuple[str, ...] = ()


@dataclass
class Column:
    key: str          # "pickscore", "oracle:consistency", "pickscore:norm"
    label: str        # "PickScore", "Oracle consistency", "PickScore (norm.)"
    metric: str


@dataclass
class Metric:
    """A loaded metric: `score(items)` returns one {column key: value} dict per item."""
    name: str
    label: str
    tasks: tuple[str, ...]
    columns: list[Column]
    score: Callable[[Sequence[EvalItem]], list[dict[str, float]]]
    spec: str = ""


# Table 2's scales are not the raw ones for PickScore (~21 raw vs 0.76) and HPSv3 (~10 vs 0.4-0.8);
# the paper does not say how it normalised. PickScore / 26 follows flow_grpo (pickscore_scorer.py);
# HPSv3 / 10 is our guess (its own benchmark tops out near 10). The others are already on the
# paper's scale (HPSv2 raw cosine, ImageReward's official standardisation, ReMOVE raw cosine).
NORMALISERS: dict[str, tuple[str, Callable[[float], float]]] = {
    "pickscore": ("raw / 26 (flow_grpo's scale)", lambda v: v / 26.0),
    "hpsv3": ("raw / 10 (our guess; the paper does not say)", lambda v: v / 10.0),
}

# name -> (display label, module, tasks)
REGISTRY = {
    "pickscore": ("PickScore", "pickscore", TEXT_IMAGE_TASKS),
    "imagereward": ("ImageReward", "imagereward", TEXT_IMAGE_TASKS),
    "hpsv2": ("HPSv2", "hpsv2", TEXT_IMAGE_TASKS),
    "hpsv3": ("HPSv3", "hpsv3", TEXT_IMAGE_TASKS),
    "remove": ("ReMOVE", "remove", REMOVAL_TASKS),
    "oracle": ("Oracle", None, ALL_TASKS),
}
METRIC_NAMES = tuple(REGISTRY)


# ----------------------------------------------------------------------------------------------
# Shared preprocessing
# ----------------------------------------------------------------------------------------------
def clip_preprocess(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """CLIP's eval transform: bicubic resize of the short side, center crop, normalise -> (3, s, s).

    Same as torchvision Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize on a PIL image
    (torchvision delegates PIL resizing to PIL), which ImageReward and HPSv2 use.
    """
    import torch

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    image = image.resize((nw, nh), Image.BICUBIC)
    # torchvision's center_crop offsets: int(round((H - size) / 2.0)).
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def resolve_spec(spec: str) -> str:
    from ..models.tiny import resolve_model_path

    return resolve_model_path(spec)


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {msg[0] if msg else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------
# Oracle (the embedded default's held-out judge)
# ----------------------------------------------------------------------------------------------
def oracle_metric(dimensions_by_task: dict[str, tuple[str, ...]]) -> Metric:
    """Score each edit with the synthetic oracle on its task's dimensions, plus their mean."""
    from ..synth import oracle_scores

    dims = list(dict.fromkeys(d for ds in dimensions_by_task.values() for d in ds))
    columns = [Column("oracle", "Oracle (mean)", "oracle")] + \
        [Column(f"oracle:{d}", f"Oracle {d}", "oracle") for d in dims]

    def score(items):
        out = []
        for it in items:
            s = oracle_scores(it.source, it.mask, it.image, it.dimensions, it.prompt)
            row = {f"oracle:{d}": float(v) for d, v in s.items()}
            row["oracle"] = float(np.mean(list(s.values()))) if s else float("nan")
            out.append(row)
        return out

    return Metric("oracle", "Oracle", ALL_TASKS, columns, score, spec="onereward_cli.synth.oracle_scores")


# ----------------------------------------------------------------------------------------------
# Loading and running
# ----------------------------------------------------------------------------------------------
@dataclass
class MetricStatus:
    name: str
    label: str
    status: str            # ok | skipped | error
    note: str = ""
    spec: str = ""
    tasks: tuple[str, ...] = ()
    seconds: float = 0.0


def metric_specs(mcfg) -> dict[str, str]:
    """name -> checkpoint spec for every metric ("" = not configured)."""
    return {n: ("oracle" if mcfg.oracle else "") if n == "oracle" else getattr(mcfg, n) for n in METRIC_NAMES}


def load_metric(name: str, mcfg, device: str, dtype, dimensions_by_task=None) -> Metric:
    """Load one metric from its recipe spec (raises on a bad checkpoint; callers record the error)."""
    import importlib

    if name == "oracle":
        return oracle_metric(dimensions_by_task or {})
    label, module, tasks = REGISTRY[name]
    mod = importlib.import_module(f".{module}", __name__)
    return mod.load(getattr(mcfg, name), mcfg, device=device, dtype=dtype)


def with_normalised(metric: Metric) -> Metric:
    """Add a "<name>:norm" column next to the raw one, for metrics whose Table 2 scale differs."""
    if metric.name not in NORMALISERS:
        return metric
    _, fn = NORMALISERS[metric.name]
    raw_score = metric.score

    def score(items):
        rows = raw_score(items)
        for r in rows:
            if metric.name in r:
                r[f"{metric.name}:norm"] = fn(r[metric.name])
        return rows

    cols = list(metric.columns) + [Column(f"{metric.name}:norm", f"{metric.label} (norm.)", metric.name)]
    return Metric(metric.name, metric.label, metric.tasks, cols, score, metric.spec)


@dataclass
class MetricRun:
    """Per-item values for every metric that ran, and a status line for every metric."""
    values: dict[str, dict[tuple[str, str], dict[str, float]]] = field(default_factory=dict)  # metric -> (policy, id) -> cols
    columns: list[Column] = field(default_factory=list)
    status: dict[str, MetricStatus] = field(default_factory=dict)


def run_metrics(mcfg, items_by_policy: dict[str, list[EvalItem]], *, device: str, dtype, batch_size: int,
                dimensions_by_task: dict, progress=None, log=None, cache=None) -> MetricRun:
    """Load each enabled metric in turn, score every policy's items, free it. One metric's failure is
    recorded in its status and does not stop the others.

    Items need the EvalItem attributes only; they may read their images lazily (eval passes items that
    read from disk, so only a batch is in memory). `cache` (optional) has lookup(metric, policy, item)
    -> row | None and store(metric, policy, item, row): rows found there are not scored again."""
    import time

    run = MetricRun()
    specs = metric_specs(mcfg)
    for name in METRIC_NAMES:
        label, _, tasks = REGISTRY[name]
        if not specs[name]:
            key = "eval.metrics.oracle=true" if name == "oracle" else f"eval.metrics.{name}=<checkpoint>"
            run.status[name] = MetricStatus(name, label, "skipped", f"not configured (set {key})", tasks=tasks)
            continue
        t0 = time.perf_counter()
        metric = None
        try:
            metric = load_metric(name, mcfg, device, dtype, dimensions_by_task)
            if mcfg.normalised:
                metric = with_normalised(metric)
            vals = _score_all(metric, items_by_policy, batch_size, progress, cache)
        except Exception as e:  # noqa: BLE001 - a broken checkpoint must not take the other metrics down
            what = f"scoring failed: {first_line(e)}" if metric is not None else \
                f"cannot load '{specs[name]}': {first_line(e)}"
            run.status[name] = MetricStatus(name, label, "error", what, spec=specs[name], tasks=tasks,
                                            seconds=time.perf_counter() - t0)
            if log:
                from rich.markup import escape

                log(f"[yellow]metric {name}: {escape(what)}[/]")
                if metric is not None:
                    log(escape(traceback.format_exc(limit=3)))
            continue
        finally:
            info = (metric.columns, metric.tasks, metric.spec) if metric is not None else ([], tasks, specs[name])
            metric = None  # drop the model before the next one loads
            _free_memory()
        run.values[name] = vals
        run.columns.extend(info[0])
        note = "" if vals else "no benchmark sample of its tasks"
        if name in NORMALISERS and mcfg.normalised:
            note = (note + "; " if note else "") + f"norm. = {NORMALISERS[name][0]}"
        run.status[name] = MetricStatus(name, label, "ok", note, spec=info[2], tasks=info[1],
                                        seconds=time.perf_counter() - t0)
    return run


def _score_all(metric: Metric, items_by_policy, batch_size: int, progress, cache=None):
    vals: dict[tuple[str, str], dict[str, float]] = {}
    todo = []
    for p, items in items_by_policy.items():
        for it in items:
            if it.task not in metric.tasks:
                continue
            hit = cache.lookup(metric, p, it) if cache is not None else None
            if hit is not None:
                vals[(p, it.id)] = hit
            else:
                todo.append((p, it))
    task_id = progress.add_task(f"metric {metric.name}", total=len(todo)) if progress is not None else None
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            rows = metric.score([it for _, it in chunk])
            if len(rows) != len(chunk):
                raise RuntimeError(f"{metric.name} returned {len(rows)} scores for {len(chunk)} images")
            for (p, it), row in zip(chunk, rows):
                vals[(p, it.id)] = {k: float(v) for k, v in row.items()}
                if cache is not None:
                    cache.store(metric, p, it, vals[(p, it.id)])
            if progress is not None:
                progress.advance(task_id, len(chunk))
    finally:
        if progress is not None:
            progress.remove_task(task_id)
    return vals


def _free_memory():
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def mean_std(values: Sequence[float]) -> dict:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    a = np.asarray(v, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}

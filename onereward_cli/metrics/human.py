"""Human-study aggregation (paper A.2, Table 3).

Input: a CSV (header row) or JSONL file with one rating per row:
    sample     benchmark sample id
    model      the rated model: an eval policy label (as in images/<label>/) or any competitor's name
    dimension  usability | text alignment | texture consistency | style consistency | consistency |
               structure | aesthetics | text rendering | removal quality  (case, "_" and "-" are free;
               "usability rate"/"overall usability" and "structural plausibility" are accepted aliases)
    value      yes/no, true/false or 0/1 for the binary dimensions (usability, text rendering, removal
               quality); a number from 1 to 5 for the others (Likert)
    task       optional: fill | extend | extend_no_prompt | removal (else looked up from the benchmark)
    rater      optional
Output per task and model: binary dimensions as success rates in percent, the others as mean opinion
scores (MOS) on the 1-5 scale, as Table 3 reports them. Errors name file:line:field.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import read_utf8
from ..errors import InputError

BINARY_DIMENSIONS = ("usability", "text rendering", "removal quality")
LIKERT_DIMENSIONS = ("text alignment", "texture consistency", "style consistency", "consistency", "structure",
                     "aesthetics")
DIMENSIONS = BINARY_DIMENSIONS + LIKERT_DIMENSIONS
ALIASES = {"usability rate": "usability", "overall usability": "usability", "structural plausibility": "structure"}
# Table 3's column order.
TABLE3_COLUMNS = [("usability", "Usability Rate(%)"), ("text alignment", "Text Alignment"),
                  ("texture consistency", "Texture Consistency"), ("style consistency", "Style Consistency"),
                  ("consistency", "Consistency"), ("structure", "Structure"), ("aesthetics", "Aesthetics"),
                  ("text rendering", "Text Rendering(%)"), ("removal quality", "Removal Quality(%)")]
TASK_TITLES = {"fill": "Image Fill", "extend": "Image Extend w Prompt", "extend_no_prompt": "Image Extend w/o Prompt",
               "removal": "Object Removal"}
REQUIRED = ("sample", "model", "dimension", "value")
_YES = {"yes", "y", "true", "1", "1.0"}
_NO = {"no", "n", "false", "0", "0.0"}


@dataclass
class Rating:
    sample: str
    model: str
    dimension: str
    value: float          # 0/1 for binary dimensions, 1..5 otherwise
    task: str | None
    rater: str | None
    line: int


def normalise_dimension(raw: str) -> str | None:
    d = " ".join(str(raw).strip().lower().replace("_", " ").replace("-", " ").split())
    d = ALIASES.get(d, d)
    return d if d in DIMENSIONS else None


def parse_value(dim: str, raw, *, path, line) -> float:
    if dim in BINARY_DIMENSIONS:
        s = str(raw).strip().lower() if not isinstance(raw, bool) else ("true" if raw else "false")
        if s in _YES:
            return 1.0
        if s in _NO:
            return 0.0
        raise InputError(f"'{dim}' is a yes/no judgement: expected yes/no, true/false or 0/1, got {raw!r}",
                         path=path, line=line, field="value")
    try:
        v = float(raw) if not isinstance(raw, bool) else float("nan")
    except (TypeError, ValueError):
        v = float("nan")
    if not (1.0 <= v <= 5.0):
        raise InputError(f"'{dim}' is rated on the 1-5 scale, got {raw!r}", path=path, line=line, field="value")
    return v


def _rows(path: Path):
    """(line number, dict) for each data row of a CSV or JSONL file."""
    text = read_utf8(path)  # a bad byte is an error naming its line, not a traceback mid-read
    if path.suffix.lower() == ".csv":
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            for col in REQUIRED:
                if col not in header:
                    raise InputError(f"missing column (have: {', '.join(header) or 'none'})", path=path, line=1,
                                     field=col)
            try:
                for row in reader:
                    if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        continue
                    yield reader.line_num, {(k or "").strip(): (v.strip() if isinstance(v, str) else v)
                                            for k, v in row.items()}
            except csv.Error as e:
                raise InputError(f"malformed CSV ({e})", path=path, line=reader.line_num) from None
        return
    with io.StringIO(text) as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON ({e.msg})", path=path, line=i) from None
            if not isinstance(rec, dict):
                raise InputError("expected a JSON object", path=path, line=i)
            yield i, rec


def read_ratings(path, task_keys=("fill", "extend", "extend_no_prompt", "removal")) -> list[Rating]:
    """Read and validate every rating; the first bad row raises InputError(file:line:field)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("human ratings file not found", path=path, field="--human")
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise InputError("expected a .csv or .jsonl file", path=path, field="--human")
    out = []
    for line, rec in _rows(path):
        for col in REQUIRED:
            v = rec.get(col)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise InputError("missing", path=path, line=line, field=col)
        dim = normalise_dimension(rec["dimension"])
        if dim is None:
            raise InputError(f"unknown dimension {rec['dimension']!r}; dimensions: {', '.join(DIMENSIONS)}",
                             path=path, line=line, field="dimension")
        task = rec.get("task") or None
        if task is not None and task not in task_keys:
            raise InputError(f"unknown task {task!r}; tasks: {', '.join(task_keys)}", path=path, line=line,
                             field="task")
        out.append(Rating(str(rec["sample"]).strip(), str(rec["model"]).strip(), dim,
                          parse_value(dim, rec["value"], path=path, line=line), task,
                          (str(rec["rater"]) if rec.get("rater") not in (None, "") else None), line))
    if not out:
        raise InputError("no ratings in the file", path=path, field="--human")
    return out


def attach_tasks(ratings: list[Rating], sample_tasks: dict[str, str], path) -> list[Rating]:
    """Fill in each rating's task from the benchmark; a rating of an unknown sample without a task is an error."""
    for r in ratings:
        if r.task is None:
            t = sample_tasks.get(r.sample)
            if t is None:
                raise InputError(f"sample {r.sample!r} is not in the benchmark; add a task column",
                                 path=path, line=r.line, field="task")
            r.task = t
        elif r.sample in sample_tasks and sample_tasks[r.sample] != r.task:
            raise InputError(f"sample {r.sample!r} is a {sample_tasks[r.sample]} sample in the benchmark, "
                             f"not {r.task}", path=path, line=r.line, field="task")
    return ratings


def aggregate(ratings: list[Rating]) -> dict[str, dict[str, dict[str, dict]]]:
    """{task: {model: {dimension: {"value", "n", "kind"}}}}: success rate in % or MOS."""
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in ratings:
        acc[(r.task, r.model, r.dimension)].append(r.value)
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for (task, model, dim), vals in acc.items():
        binary = dim in BINARY_DIMENSIONS
        mean = sum(vals) / len(vals)
        out.setdefault(task, {}).setdefault(model, {})[dim] = {
            "value": 100.0 * mean if binary else mean, "n": len(vals), "kind": "rate" if binary else "mos"}
    return out


def sample_means(ratings: list[Rating]) -> dict[tuple[str, str, str, str], float]:
    """{(task, sample, model, dimension): mean over raters} (the unit GSB compares)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in ratings:
        acc[(r.task, r.sample, r.model, r.dimension)].append(r.value)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def table3(agg: dict, task_order=tuple(TASK_TITLES), model_order: list[str] | None = None):
    """Table 3 layout: one row per (task, model), the paper's dimension columns present in the data."""
    from ..report import Table

    present = {d for per_model in agg.values() for dims in per_model.values() for d in dims}
    cols = [(d, label) for d, label in TABLE3_COLUMNS if d in present]
    rows = []
    for task in [t for t in task_order if t in agg] + [t for t in agg if t not in task_order]:
        models = list(agg[task])
        if model_order:
            models = [m for m in model_order if m in agg[task]] + [m for m in models if m not in model_order]
        for m in models:
            rows.append([TASK_TITLES.get(task, task), m] + [agg[task][m].get(d, {}).get("value") for d, _ in cols])
    return Table("Human evaluation (Table 3 layout)", ["Task", "Model"] + [label for _, label in cols], rows,
                 caption="(%) columns are success rates of yes/no judgements; the others are mean opinion scores "
                         "on the 1-5 scale.", digits=2)

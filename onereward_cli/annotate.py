"""Best-of-N / Worst-of-N labelling per evaluation dimension (paper §4.3): a local web page, an
import from JSONL/CSV, or the synthetic oracle. All three write `annotations.jsonl`:

    {"sample_id", "annotator", "task", "labels": {"<dimension>": {"best": i, "worst": j} | "no difference"},
     "order": [i, ...], "time"}

A label may carry "margin": m >= 0, how clearly best beats worst (the oracle writes its score gap; an
import may give a rater's confidence); `pairs.train_min_margin` drops training pairs below it.

one record per (sample, annotator), holding every dimension of the sample's task (recipe
`tasks.<key>.dimensions`). Candidate indices are 0-based, as in candidates.jsonl. `order` (page labels
only) is the order the page showed the candidates in: each annotator sees each sample's candidates in
its own seeded shuffle (`shown_order`), so no candidate index is favoured by its place on the screen;
the page reports picks by shown position and the server maps them back to candidate indices.

    {"sample_id", "annotator", "task", "retract": true, "time"}

is an undo: it withdraws every earlier label of that (sample, annotator); readers fold the file in order
(`standing_records`). The page appends each submit, undo and skip at once (artifacts.append_jsonl; skips go
to annotations.skips.jsonl beside it), so killing the server loses nothing, and a restart resumes at
the first sample the annotator has not labelled, skipped samples last. Imports and the oracle build
every record first and then rewrite the file atomically, keeping the records of other (sample,
annotator) pairs; they hold `annotation_lock` meanwhile, as the page does for each append, so an import
next to a running page loses none of its labels.
"""
from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import math
import mimetypes
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from rich.console import Console
from rich.markup import escape

from .artifacts import (RunManifest, append_jsonl, open_image, read_jsonl, strip_meta, validate_record,
                        write_json, write_jsonl)
from .errors import InputError
from .tasks import DIMENSION_DEFINITIONS

console = Console(stderr=True)

NO_DIFFERENCE = "no difference"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# A submission is a few hundred bytes; anything far larger is a mistake or an attack.
MAX_BODY_BYTES = 64 * 1024

CANDIDATES_SCHEMA = {
    "id": (str, True), "task": (str, True), "prompt": (str, False), "user_prompt": (str, False),
    "source": (str, True), "mask": (str, True), "width": (int, False), "height": (int, False),
    "candidates": (list, True),
}
ANNOTATION_SCHEMA = {
    "sample_id": (str, True), "annotator": (str, False), "task": (str, False), "labels": (dict, False),
    "order": (list, False), "retract": (bool, False), "time": (str, False),
}
CSV_COLUMNS = ("sample_id", "dimension", "best", "worst")


# ----------------------------------------------------------------------------------------------
# Samples (candidates.jsonl)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    task_name: str
    user_prompt: str | None
    prompt: str
    source: str  # paths relative to the candidates dir
    mask: str
    candidates: tuple[str, ...]
    dimensions: tuple[str, ...]
    width: int | None
    height: int | None
    line: int


def _inside(root: Path, rel: str) -> Path | None:
    """`root/rel` resolved, or None when rel is absolute, climbs with '..', or resolves (symlinks
    included) outside root."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or Path(rel).is_absolute():
        return None
    if any(part in ("..", ".") for part in rel.split("/")):
        return None
    p = (root / rel).resolve()
    return p if p.is_relative_to(root.resolve()) else None


def _image_path(root: Path, rel, where: Path, line: int, field: str) -> str:
    if not isinstance(rel, str):
        raise InputError(f"expected a path string, got {rel!r}", path=where, line=line, field=field)
    p = _inside(root, rel)
    if p is None:
        raise InputError(f"path '{rel}' must be relative and stay inside {root}", path=where, line=line, field=field)
    if not p.is_file():
        raise InputError(f"image not found: {root / rel}", path=where, line=line, field=field)
    return rel


def load_samples(r, candidates_dir) -> dict[str, Sample]:
    """candidates.jsonl -> {id: Sample} in file order, every path checked to exist inside the dir."""
    root = Path(candidates_dir)
    path = root / "candidates.jsonl"
    if not path.is_file():
        raise InputError("no candidates.jsonl here; pass a `onereward generate` output directory", path=root)
    samples: dict[str, Sample] = {}
    for rec in read_jsonl(path, CANDIDATES_SCHEMA):
        line = rec["_line"]
        sid, task = rec["id"], rec["task"]
        if sid in samples:
            raise InputError(f"duplicate id '{sid}' (first on line {samples[sid].line})", path=path, line=line,
                             field="id")
        if task not in r.tasks:
            raise InputError(f"task '{task}' is not in the recipe's tasks ({', '.join(r.tasks)})",
                             path=path, line=line, field="task")
        cands = rec["candidates"]
        if len(cands) < 2:
            raise InputError("need at least 2 candidates to pick a best and a worst", path=path, line=line,
                             field="candidates")
        rels = []
        for i, c in enumerate(cands):
            if not isinstance(c, dict):
                raise InputError("expected an object", path=path, line=line, field=f"candidates[{i}]")
            if c.get("index", i) != i:
                raise InputError(f"index {c.get('index')!r} != position {i}", path=path, line=line,
                                 field=f"candidates[{i}].index")
            rels.append(_image_path(root, c.get("path"), path, line, f"candidates[{i}].path"))
        samples[sid] = Sample(
            id=sid, task=task, task_name=r.tasks[task].name, user_prompt=rec.get("user_prompt"),
            prompt=rec.get("prompt") or "", source=_image_path(root, rec["source"], path, line, "source"),
            mask=_image_path(root, rec["mask"], path, line, "mask"), candidates=tuple(rels),
            dimensions=tuple(r.tasks[task].dimensions), width=rec.get("width"), height=rec.get("height"),
            line=line)
    if not samples:
        raise InputError("no samples", path=path)
    return samples


# ----------------------------------------------------------------------------------------------
# Labels: one validator shared by the page, the imports and the oracle
# ----------------------------------------------------------------------------------------------
def check_label(value, sample: Sample, dimension: str, *, path=None, line=None, field=None):
    """One dimension's label -> {"best": i, "worst": j} or NO_DIFFERENCE; raises InputError."""
    field = f"labels.{dimension}" if field is None else field  # "" (CSV): plain best/worst columns
    if dimension not in sample.dimensions:
        raise InputError(f"'{dimension}' is not a dimension of task '{sample.task}' "
                         f"({', '.join(sample.dimensions)})", path=path, line=line, field=field)
    if isinstance(value, str) and value.strip().lower() == NO_DIFFERENCE:
        return NO_DIFFERENCE
    if not isinstance(value, dict) or not {"best", "worst"} <= set(value) <= {"best", "worst", "margin"}:
        raise InputError(f"expected {{\"best\": i, \"worst\": j}} (and optionally \"margin\": m) or "
                         f"\"{NO_DIFFERENCE}\", got {value!r}", path=path, line=line, field=field)
    n = len(sample.candidates)
    for key in ("best", "worst"):
        idx = value[key]
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise InputError(f"expected a candidate index (integer), got {idx!r}", path=path, line=line,
                             field=f"{field}.{key}" if field else key)
        if not 0 <= idx < n:
            raise InputError(f"candidate index {idx} out of range: sample '{sample.id}' has {n} candidates "
                             f"(0..{n - 1})", path=path, line=line, field=f"{field}.{key}" if field else key)
    if value["best"] == value["worst"]:
        raise InputError(f"best and worst are the same candidate ({value['best']}); pick two different ones "
                         f"or \"{NO_DIFFERENCE}\"", path=path, line=line, field=field or "worst")
    if "margin" in value:
        m = check_margin(value["margin"], path=path, line=line, field=f"{field}.margin" if field else "margin")
        return {"best": value["best"], "worst": value["worst"], "margin": m}
    return {"best": value["best"], "worst": value["worst"]}


def check_margin(m, *, path=None, line=None, field="margin") -> float:
    """A label's optional margin: how clearly best beats worst (the oracle writes its score gap), >= 0."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
        raise InputError(f"expected a number >= 0 (how clearly best beats worst), got {m!r}", path=path, line=line,
                         field=field)
    return float(m)


def check_labels(labels, sample: Sample, *, path=None, line=None) -> dict:
    """All of the task's dimensions, nothing else, each valid. Returns them in the task's order."""
    if not isinstance(labels, dict):
        raise InputError("expected an object {dimension: {best, worst} | \"no difference\"}", path=path,
                         line=line, field="labels")
    for dim in labels:
        if dim not in sample.dimensions:
            check_label(None, sample, str(dim), path=path, line=line)  # raises: not a dimension of the task
    missing = [d for d in sample.dimensions if d not in labels]
    if missing:
        raise InputError(f"missing dimension(s) {', '.join(missing)} for task '{sample.task}' (each needs best "
                         f"and worst, or \"{NO_DIFFERENCE}\")", path=path, line=line, field="labels")
    return {d: check_label(labels[d], sample, d, path=path, line=line) for d in sample.dimensions}


def check_annotator(name, *, path=None, line=None, field="annotator") -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
        raise InputError(f"annotator must be a printable name of 1-100 characters, got {name!r}", path=path,
                         line=line, field=field)
    return name.strip()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def make_record(sample: Sample, annotator: str, labels: dict, when: str | None = None, order=None) -> dict:
    rec = {"sample_id": sample.id, "annotator": annotator, "task": sample.task, "labels": labels}
    if order is not None:
        rec["order"] = list(order)
    rec["time"] = when or _now()
    return rec


def retraction(sample: Sample, annotator: str) -> dict:
    return {"sample_id": sample.id, "annotator": annotator, "task": sample.task, "retract": True, "time": _now()}


def shown_order(seed: int, annotator: str, sample_id: str, n: int) -> list[int]:
    """The order one annotator sees one sample's candidates in: a shuffle seeded by (recipe seed,
    annotator, sample), so it is the same after a restart and differs between annotators and samples."""
    order = list(range(n))
    random.Random(f"{seed}:annotate:{annotator}:{sample_id}").shuffle(order)
    return order


def check_order(order, n: int, *, path=None, line=None) -> list[int]:
    if not (isinstance(order, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in order)
            and sorted(order) == list(range(n))):
        raise InputError(f"expected the shown order, a permutation of 0..{n - 1}, got {order!r}", path=path,
                         line=line, field="order")
    return order


def _check_record_shape(r: dict, target, line):
    if r.get("retract") is True:
        return
    if r.get("retract") not in (None, False):
        raise InputError("expected true", path=target, line=line, field="retract")
    if not isinstance(r.get("labels"), dict):
        raise InputError("missing (a label record needs labels; an undo has \"retract\": true)", path=target,
                         line=line, field="labels")


def read_annotations(target) -> list[dict]:
    """Every record of `target` in file order, undos included (none if it does not exist); a torn last
    line is ignored."""
    target = Path(target)
    if not target.exists():
        return []
    recs = read_jsonl(target, ANNOTATION_SCHEMA, tolerate_torn_tail=True,
                      check=lambda r, line: _check_record_shape(r, target, line))
    return [strip_meta(r) for r in recs]


def standing_records(records: list[dict]) -> list[dict]:
    """The label records no undo has withdrawn, in file order (a retraction withdraws every earlier label
    of its (sample, annotator))."""
    out: dict[int, dict] = {}
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        key = (r["sample_id"], r.get("annotator"))
        if r.get("retract"):
            for j in by_key.pop(key, []):
                out.pop(j, None)
        else:
            out[i] = r
            by_key.setdefault(key, []).append(i)
    return [out[i] for i in sorted(out)]


@contextlib.contextmanager
def annotation_lock(target):
    """An exclusive lock shared by everything that writes `target` (the page's appends, imports, the
    oracle), across processes: an import's read-merge-rename can then never drop a label the page
    appended meanwhile. A sidecar file, because the rename replaces the annotations file's inode."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: one writer at a time is up to the user
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def merge_and_write(target, new_records: list[dict]) -> tuple[int, int]:
    """Replace the (sample, annotator) records in `target` that `new_records` redo, keep the rest, and
    rewrite the file atomically, under `annotation_lock`. Returns (kept, replaced)."""
    new_keys = {(r["sample_id"], r["annotator"]) for r in new_records}
    with annotation_lock(target):
        old = read_annotations(target)
        kept = [r for r in old if (r["sample_id"], r.get("annotator")) not in new_keys]
        write_jsonl(target, kept + new_records)
    return len(kept), len(old) - len(kept)


def _write_run_json(man: RunManifest, target: Path, t0: float):
    # The candidates dir already holds generate's run.json; ours sits beside the annotations file.
    man.data["timings_s"]["total"] = round(time.perf_counter() - t0, 4)
    man.data["finished"] = _now()
    write_json(target.with_name(target.stem + ".run.json"), man.data)


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------
def oracle_labels(root: Path, sample: Sample, where: Path) -> dict:
    from .synth import oracle_pick, oracle_scores

    def img(rel, mode, field):
        return open_image(root / rel, mode=mode, where=where, line=sample.line, field=field)

    source, mask = img(sample.source, "RGB", "source"), img(sample.mask, "L", "mask")
    scores = [oracle_scores(source, mask, img(c, "RGB", f"candidates[{i}].path"), sample.dimensions,
                            sample.user_prompt or "")
              for i, c in enumerate(sample.candidates)]
    picks = oracle_pick(scores, sample.dimensions)
    # The margin (best's score minus worst's) lets export-pairs keep only clear preferences for training
    # (pairs.train_min_margin); the label itself is Best-of-N / Worst-of-N as before.
    return {d: NO_DIFFERENCE if picks[d] is None else
            {"best": picks[d][0], "worst": picks[d][1],
             "margin": round(scores[picks[d][0]][d] - scores[picks[d][1]][d], 6)}
            for d in sample.dimensions}


def annotate_with_oracle(r, candidates_dir, target, annotator: str = "oracle"):
    """Label every sample with the synthetic oracle (synth.oracle_scores + oracle_pick)."""
    from rich.progress import Progress

    t0 = time.perf_counter()
    root, target = Path(candidates_dir), Path(target)
    samples = load_samples(r, root)
    where = root / "candidates.jsonl"
    man = RunManifest("annotate", target.parent, r, inputs={"candidates": where})
    records = []
    with Progress(console=console, transient=True) as prog, man.timed("oracle"):
        bar = prog.add_task("oracle", total=len(samples))
        for s in samples.values():
            records.append(make_record(s, annotator, oracle_labels(root, s, where)))
            prog.advance(bar)
    kept, replaced = merge_and_write(target, records)
    nodiff = sum(v == NO_DIFFERENCE for rec in records for v in rec["labels"].values())
    man.count(samples=len(records), labels=sum(len(rec["labels"]) for rec in records), no_difference=nodiff,
              kept_from_other_annotators=kept, replaced=replaced)
    man.set(mode="oracle", annotator=annotator, target=str(target))
    _write_run_json(man, target, t0)
    console.print(f"annotate: oracle labelled {len(records)} samples ({nodiff} no-difference labels) -> "
                  f"{escape(str(target))}", highlight=False)
    return target


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------
def _import_jsonl(path: Path, samples: dict[str, Sample], default_annotator: str) -> list[dict]:
    out, first_line = {}, {}
    for rec in read_jsonl(path, ANNOTATION_SCHEMA, check=lambda r, line: _check_record_shape(r, path, line)):
        line = rec["_line"]
        sample = samples.get(rec["sample_id"])
        if sample is None:
            raise InputError(f"unknown sample id '{rec['sample_id']}' (not in candidates.jsonl)", path=path,
                             line=line, field="sample_id")
        if rec.get("task") not in (None, sample.task):
            raise InputError(f"task '{rec['task']}' but sample '{sample.id}' is a '{sample.task}' sample",
                             path=path, line=line, field="task")
        annotator = check_annotator(rec.get("annotator") or default_annotator, path=path, line=line)
        key = (sample.id, annotator)
        if rec.get("retract"):  # an undo in a page-written file: the label before it does not stand
            out.pop(key, None)
            first_line.pop(key, None)
            continue
        if key in first_line:
            raise InputError(f"sample '{sample.id}' labelled twice by '{annotator}' (first on line "
                             f"{first_line[key]})", path=path, line=line, field="sample_id")
        first_line[key] = line
        labels = check_labels(rec["labels"], sample, path=path, line=line)
        order = check_order(rec["order"], len(sample.candidates), path=path, line=line) if "order" in rec else None
        out[key] = make_record(sample, annotator, labels, rec.get("time"), order)
    return list(out.values())


def _csv_index(raw, field, path, line):
    """A CSV best/worst cell: None for empty / "no difference", else an int (range checked later)."""
    text = (raw or "").strip()
    if not text or text.lower() == NO_DIFFERENCE:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"expected a candidate index, empty, or \"{NO_DIFFERENCE}\", got {text!r}", path=path,
                         line=line, field=field) from None


def _import_csv(path: Path, samples: dict[str, Sample], default_annotator: str) -> list[dict]:
    groups: dict[tuple[str, str], dict] = {}  # (sample, annotator) -> {"line", "labels", "lines"}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise InputError(f"missing column(s) {', '.join(missing)}; need {', '.join(CSV_COLUMNS)} "
                                 f"(+ optional annotator)", path=path, line=1, field="header")
            for row in reader:
                line = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise InputError(f"malformed line: expected {len(header)} columns", path=path, line=line)
                sid = row["sample_id"].strip()
                sample = samples.get(sid)
                if sample is None:
                    raise InputError(f"unknown sample id '{sid}' (not in candidates.jsonl)", path=path, line=line,
                                     field="sample_id")
                annotator = check_annotator((row.get("annotator") or "").strip() or default_annotator, path=path,
                                            line=line)
                dim = row["dimension"].strip().lower()
                best = _csv_index(row["best"], "best", path, line)
                worst = _csv_index(row["worst"], "worst", path, line)
                if (best is None) != (worst is None):
                    raise InputError(f"give both best and worst, or leave both empty / \"{NO_DIFFERENCE}\"",
                                     path=path, line=line, field="best" if best is None else "worst")
                if dim not in sample.dimensions:
                    check_label(None, sample, dim, path=path, line=line, field="dimension")  # raises
                value = NO_DIFFERENCE if best is None else {"best": best, "worst": worst}
                label = check_label(value, sample, dim, path=path, line=line, field="")
                g = groups.setdefault((sid, annotator), {"line": line, "labels": {}, "lines": {}})
                if dim in g["labels"]:
                    raise InputError(f"'{dim}' of sample '{sid}' by '{annotator}' given twice (first on line "
                                     f"{g['lines'][dim]})", path=path, line=line, field="dimension")
                g["labels"][dim], g["lines"][dim] = label, line
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", path=path, line=getattr(reader, "line_num", None)) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", path=path) from None
    out = []
    for (sid, annotator), g in groups.items():
        sample = samples[sid]
        missing = [d for d in sample.dimensions if d not in g["labels"]]
        if missing:
            raise InputError(f"sample '{sid}' by '{annotator}' lacks dimension(s) {', '.join(missing)} "
                             f"(task '{sample.task}')", path=path, line=g["line"], field="dimension")
        out.append(make_record(sample, annotator, {d: g["labels"][d] for d in sample.dimensions}))
    return out


def import_annotations(r, candidates_dir, import_path, target, annotator: str = "anonymous"):
    """Validate a JSONL (our format) or CSV (sample_id, dimension, best, worst[, annotator]) of labels and
    merge it into `target`. Any error leaves `target` untouched."""
    t0 = time.perf_counter()
    root, import_path, target = Path(candidates_dir), Path(import_path), Path(target)
    if not import_path.is_file():
        raise InputError("file not found", path=import_path, field="--import")
    annotator = check_annotator(annotator, field="--annotator")
    samples = load_samples(r, root)
    man = RunManifest("annotate", target.parent, r, inputs={"candidates": root / "candidates.jsonl",
                                                            "import": import_path})
    if import_path.suffix.lower() == ".csv":
        records = _import_csv(import_path, samples, annotator)
    else:
        records = _import_jsonl(import_path, samples, annotator)
    if not records:
        raise InputError("no labels in the file", path=import_path)
    kept, replaced = merge_and_write(target, records)
    man.count(records=len(records), kept=kept, replaced=replaced)
    man.set(mode="import", target=str(target))
    _write_run_json(man, target, t0)
    console.print(f"annotate: imported {len(records)} records ({replaced} replaced, {kept} kept) -> "
                  f"{escape(str(target))}", highlight=False)
    return target


# ----------------------------------------------------------------------------------------------
# The labelling page
# ----------------------------------------------------------------------------------------------
class AlreadyLabelled(Exception):
    pass


class StalePage(Exception):
    pass


class LabelState:
    """Samples, this annotator's progress, skips and undo. One lock covers check-then-append so a double
    submit can never write two records; `annotation_lock` keeps imports of other processes out meanwhile.

    Candidates are shown in `shown_order(seed, annotator, sample)`; the page submits its picks by shown
    position with the order it showed ({"sample_id", "order", "shown"}), the server maps them to candidate
    indices and records the order. Scripts may submit candidate indices directly ({"sample_id", "labels"}).
    """

    def __init__(self, samples: dict[str, Sample], target: Path, annotator: str, seed: int = 0):
        self.samples, self.target, self.annotator, self.seed = samples, target, annotator, seed
        self.order = list(samples)
        self.lock = threading.Lock()
        self.skips_path = target.with_name(target.stem + ".skips.jsonl")
        self._skips: dict[str, int] = {}  # sample id -> when it was skipped; skipped samples come last
        self._skip_clock = 0
        for r in self._read_skips():
            self._skip_clock += 1
            self._skips[r["sample_id"]] = self._skip_clock
        self._stamp = None
        self._mine: list[dict] = []  # this annotator's standing label records, in file order
        self._redo: str | None = None  # the sample an undo put back: shown next

    def _read_skips(self) -> list[dict]:
        if not self.skips_path.exists():
            return []
        recs = read_jsonl(self.skips_path, {"sample_id": (str, True), "annotator": (str, True)},
                          tolerate_torn_tail=True)
        return [r for r in recs if r["annotator"] == self.annotator and r["sample_id"] in self.samples]

    def shown(self, sample: Sample) -> list[int]:
        return shown_order(self.seed, self.annotator, sample.id, len(sample.candidates))

    def _refresh(self) -> list[dict]:
        # Re-read when the file changed: another server (same annotator) or an import may write too.
        try:
            st = self.target.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._mine = [r for r in standing_records(read_annotations(self.target))
                          if r.get("annotator") == self.annotator and r["sample_id"] in self.samples]
            self._stamp = stamp
        return self._mine

    def _labelled(self) -> set[str]:
        return {r["sample_id"] for r in self._refresh()}

    def last_submitted(self) -> str | None:
        mine = self._refresh()
        return mine[-1]["sample_id"] if mine else None

    def next_sample(self) -> Sample | None:
        done = self._labelled()
        if self._redo is not None and self._redo not in done:
            return self.samples[self._redo]
        todo = [(self._skips.get(sid, -1), i, sid) for i, sid in enumerate(self.order) if sid not in done]
        return self.samples[min(todo)[2]] if todo else None

    def progress(self) -> dict:
        done = self._labelled()
        return {"done": len(done), "total": len(self.order),
                "skipped": sum(1 for s in self._skips if s not in done)}

    def state(self) -> dict:
        with self.lock:
            s = self.next_sample()
            return {"annotator": self.annotator, "progress": self.progress(), "last": self.last_submitted(),
                    "sample": None if s is None else sample_view(s, self.shown(s))}

    def submit(self, payload) -> dict:
        if not isinstance(payload, dict):
            raise InputError("expected a JSON object {\"sample_id\", \"labels\"} or {\"sample_id\", \"order\", "
                             "\"shown\"}")
        extra = set(payload) - {"sample_id", "labels", "order", "shown"}
        if extra:
            raise InputError(f"unexpected field(s) {', '.join(sorted(map(str, extra)))}", field="body")
        if ("labels" in payload) == ("shown" in payload):
            raise InputError("give either labels (candidate indices) or shown + order (shown positions)",
                             field="labels")
        validate_record(payload, {"sample_id": (str, True), "labels": (dict, False), "shown": (dict, False),
                                  "order": (list, "shown" in payload)})
        sample = self.samples.get(payload["sample_id"])
        if sample is None:
            raise InputError(f"unknown sample id '{payload['sample_id']}'", field="sample_id")
        order = None
        if "shown" in payload:
            order = self.shown(sample)
            if payload["order"] != order:
                raise StalePage(f"sample '{sample.id}' was shown in another order than this server shows it: "
                                "reload the page")
            picks = check_labels(payload["shown"], sample)  # positions: the same range checks as indices
            labels = {d: v if v == NO_DIFFERENCE else {**v, "best": order[v["best"]], "worst": order[v["worst"]]}
                      for d, v in picks.items()}
        else:
            labels = check_labels(payload["labels"], sample)
        with self.lock, annotation_lock(self.target):
            if sample.id in self._labelled():
                raise AlreadyLabelled(f"sample '{sample.id}' is already labelled by '{self.annotator}'")
            rec = make_record(sample, self.annotator, labels, order=order)
            append_jsonl(self.target, rec)
            self._skips.pop(sample.id, None)
            if self._redo == sample.id:
                self._redo = None
            return rec

    def undo(self, payload) -> dict:
        """Withdraw the annotator's last submitted sample (appending a retraction); it is shown next."""
        if not isinstance(payload, dict) or not isinstance(payload.get("sample_id"), str):
            raise InputError("expected a JSON object {\"sample_id\"} naming the last submitted sample",
                             field="sample_id")
        with self.lock, annotation_lock(self.target):
            last = self.last_submitted()
            if last is None:
                raise AlreadyLabelled(f"nothing to undo: '{self.annotator}' has no label left")
            if payload["sample_id"] != last:
                raise AlreadyLabelled(f"the last submitted sample is '{last}', not '{payload['sample_id']}'")
            rec = retraction(self.samples[last], self.annotator)
            append_jsonl(self.target, rec)
            self._redo = last
            return rec

    def skip(self, payload) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("sample_id"), str):
            raise InputError("expected a JSON object {\"sample_id\"}", field="sample_id")
        if payload["sample_id"] not in self.samples:
            raise InputError(f"unknown sample id '{payload['sample_id']}'", field="sample_id")
        with self.lock:
            # Appended, so a restart still puts skipped samples last (in the order they were skipped).
            append_jsonl(self.skips_path, {"sample_id": payload["sample_id"], "annotator": self.annotator,
                                           "time": _now()})
            self._skip_clock += 1
            self._skips[payload["sample_id"]] = self._skip_clock
            if self._redo == payload["sample_id"]:
                self._redo = None


def _file_url(rel: str) -> str:
    return "/files/" + quote(rel)


def sample_view(s: Sample, order: list[int]) -> dict:
    """What the page shows: the candidates in `order`, by position. Their inference parameters are left
    out so they cannot bias."""
    return {
        "id": s.id, "task": s.task, "task_name": s.task_name, "user_prompt": s.user_prompt,
        "prompt": s.prompt, "width": s.width, "height": s.height,
        "source": _file_url(s.source), "mask": _file_url(s.mask), "order": order,
        "candidates": [{"position": k, "url": _file_url(s.candidates[i])} for k, i in enumerate(order)],
        "dimensions": [{"name": d, "definition": DIMENSION_DEFINITIONS.get(d, "")} for d in s.dimensions],
    }


_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "onereward-annotate"
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return self.server_version

    # -- responses -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str, field: str | None = None):
        self._json(status, {"error": message, **({"field": field} if field else {})})

    def _send_path(self, p: Path, cache: str):
        ctype = _STATIC_TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        self._send(200, p.read_bytes(), ctype, cache)

    # -- routing -------------------------------------------------------------------------------
    def do_GET(self):
        # An InputError here comes from the annotations file (edited by hand?), not from the request.
        self._guarded(self._get, input_error_status=500)

    def do_POST(self):
        self._guarded(self._post, input_error_status=400)

    do_HEAD = do_GET

    def _guarded(self, handler, input_error_status: int):
        if not self.server.host_allowed(self.headers.get("Host", "")):
            # DNS rebinding: another site's name pointed at 127.0.0.1 must not reach the labels.
            self.close_connection = True
            return self._error(403, "unexpected Host header: open the address `onereward annotate` printed")
        try:
            handler()
        except (AlreadyLabelled, StalePage) as e:
            self._error(409, str(e))
        except InputError as e:
            self._error(input_error_status, str(e), e.field)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away; nothing to answer
        except Exception as e:  # noqa: BLE001 - answer in JSON and keep serving
            console.print(f"[red]annotate: {escape(self.command)} {escape(self.path)} failed:[/] "
                          f"{e.__class__.__name__}: {escape(str(e))}", highlight=False)
            self.close_connection = True
            self._error(500, f"server error ({e.__class__.__name__}: {e})")

    def _get(self):
        path = urlsplit(self.path).path
        state: LabelState = self.server.state
        if path in ("/", "/index.html"):
            return self._send_path(STATIC_DIR / "annotate.html", "no-store")
        if path.startswith("/static/"):
            return self._serve_under(STATIC_DIR, path[len("/static/"):], allowed=None)
        if path.startswith("/files/"):
            return self._serve_under(self.server.root, path[len("/files/"):], allowed=self.server.allowed)
        if path == "/api/state":
            return self._json(200, state.state())
        return self._error(404, f"not found: {path}")

    def _serve_under(self, root: Path, raw: str, allowed: set[str] | None):
        rel = unquote(raw)
        p = _inside(root, rel)
        if p is None:
            return self._error(403, "refused: path must stay inside the served directory")
        if (allowed is not None and rel not in allowed) or not p.is_file():
            return self._error(404, f"not found: {rel}")
        return self._send_path(p, "no-cache")

    def _post(self):
        path = urlsplit(self.path).path
        state: LabelState = self.server.state
        payload = self._read_json()
        if path == "/api/submit":
            rec = state.submit(payload)
            return self._json(200, {"ok": True, "record": rec, "progress": state.progress()})
        if path == "/api/skip":
            state.skip(payload)
            return self._json(200, {"ok": True})
        if path == "/api/undo":
            rec = state.undo(payload)
            return self._json(200, {"ok": True, "record": rec, "progress": state.progress()})
        return self._error(404, f"not found: {path}")

    def _read_json(self):
        origin = self.headers.get("Origin")
        if origin and origin.lower() != f"http://{self.headers.get('Host', '')}".lower():
            self.close_connection = True
            raise InputError(f"cross-origin request from {origin} refused", field="Origin")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise InputError("a Content-Length header is required", field="Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise InputError(f"body of {length} bytes exceeds the {MAX_BODY_BYTES} byte limit", field="body")
        body = self.rfile.read(length)
        # A JSON content type forces a CORS preflight, so another site's page cannot post labels here.
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise InputError("Content-Type must be application/json", field="Content-Type")
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"malformed JSON ({getattr(e, 'msg', e.__class__.__name__)})", field="body") from None

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)


class AnnotationServer(ThreadingHTTPServer):
    daemon_threads = True
    # An annotator restarting at once must get the same port back.
    allow_reuse_address = True

    def __init__(self, address, state: LabelState, root: Path, verbose: bool = False):
        self.state, self.root, self.verbose = state, root.resolve(), verbose
        self.allowed = {rel for s in state.samples.values() for rel in (s.source, s.mask, *s.candidates)}
        super().__init__(address, _Handler)

    def host_allowed(self, host_header: str) -> bool:
        host, port = self.server_address[:2]
        if not _is_loopback(host):
            return True  # reachable under any LAN name; the user chose that with --host
        names = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"{host}:{port}", f"[{host}]:{port}"}
        return host_header.lower() in names

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(r, candidates_dir, target, annotator: str = "anonymous", host: str = "127.0.0.1",
                port: int = 8765, verbose: bool = False) -> AnnotationServer:
    """A ready (bound, not yet serving) labelling server; port 0 picks a free port."""
    annotator = check_annotator(annotator, field="--annotator")
    root, target = Path(candidates_dir), Path(target)
    samples = load_samples(r, root)
    state = LabelState(samples, target, annotator, seed=r.seed)
    state.progress()  # a malformed annotations file is an error now, not at the first request
    cls = AnnotationServer
    if ":" in host:
        cls = type("AnnotationServer6", (AnnotationServer,), {"address_family": socket.AF_INET6})
    try:
        return cls((host, port), state, root, verbose=verbose)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})", field="--port") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(r, candidates_dir, target, annotator: str = "anonymous", host: str = "127.0.0.1", port: int = 8765):
    """Serve the labelling page until Ctrl+C. Every submit is on disk before the page moves on."""
    srv = make_server(r, candidates_dir, target, annotator=annotator, host=host, port=port)
    p = srv.state.progress()
    who = escape(srv.state.annotator)
    console.print(f"annotate: {p['done']}/{p['total']} samples labelled by [bold]{who}[/]; "
                  f"labels are appended to {escape(str(target))}", highlight=False)
    if not _is_loopback(host):
        console.print(f"[yellow]warning:[/] listening on {escape(host)}: anyone who can reach it can read the "
                      "images and add labels")
    console.print(f"[bold green]open {srv.url}[/]   (Ctrl+C stops; nothing submitted is lost)", highlight=False)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        p = srv.state.progress()
        console.print(f"annotate: stopped at {p['done']}/{p['total']}")
    finally:
        srv.server_close()

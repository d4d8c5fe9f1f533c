"""`onereward export-pairs`: best/worst picks -> winner/loser pairs, split by sample (paper §4.2-4.3).

Each (sample, dimension, annotator) pick {"best": i, "worst": j} becomes one pair: winner = candidate
i, loser = candidate j. "no difference" yields no pair (the paper discards the dimension). When an
annotator labelled the same sample twice, the later record wins. With `pairs.agreement: agree` a
(sample, dimension) is kept only when at least `pairs.min_annotators` annotators labelled it and all of
them gave the same pick (one pair, annotators joined with ","); "no difference" counts as a label.

The train/test split is by sample, stratified by task and seeded by the recipe seed, so no sample's
images appear on both sides. A label's optional "margin" (the oracle's score gap) is kept on its pair;
`pairs.train_min_margin` > 0 then drops the training pairs below it (the test split is never filtered).

An undo record ({"retract": true}) withdraws the annotator's earlier label of that sample. Labels from
the page carry the order the candidates were shown in; the table then also reports position bias: how
often each shown position was picked best and worst (with no bias, each 1/N of the picks).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from .annotate import check_margin
from .artifacts import RunManifest, read_jsonl, write_jsonl
from .errors import InputError

ANNOTATIONS = "annotations.jsonl"
CANDIDATES = "candidates.jsonl"
NO_DIFFERENCE = "no difference"

ANNOTATION_SCHEMA = {"sample_id": ((str, int), True), "annotator": (str, True), "task": (str, True),
                     "labels": (dict, False), "order": (list, False), "retract": (bool, False)}
CANDIDATES_SCHEMA = {"id": ((str, int), True), "task": (str, True), "source": (str, True), "mask": (str, True),
                     "candidates": (list, True)}


def check_candidates(rec: dict, path: Path) -> dict:
    """A candidates.jsonl record: `candidates` a list of {"index": i, "path": "..."} numbered 0..n-1, and
    every image path relative and inside the candidates folder (the pairs point into it)."""
    from .annotate import _inside

    line = rec.get("_line")

    def inside(rel: str, field: str):
        if _inside(path.parent, rel) is None:
            raise InputError(f"path '{rel}' must be relative and stay inside {path.parent}", path=path, line=line,
                             field=field)

    for i, c in enumerate(rec["candidates"]):
        where = f"candidates[{i}]"
        if not isinstance(c, dict):
            raise InputError(f"expected an object with index and path, got {type(c).__name__} {c!r}", path=path,
                             line=line, field=where)
        if not isinstance(c.get("path"), str) or not c["path"]:
            raise InputError("missing or not a string", path=path, line=line, field=f"{where}.path")
        if c.get("index", i) != i or isinstance(c.get("index"), bool):
            raise InputError(f"expected {i} (candidates are numbered in order), got {c.get('index')!r}", path=path,
                             line=line, field=f"{where}.index")
        inside(c["path"], f"{where}.path")
    for name in ("source", "mask"):
        inside(rec[name], name)
    return rec


def resolve_inputs(annotations) -> tuple[Path, Path]:
    """(annotations.jsonl, candidates.jsonl) from either the annotations file or the candidates folder."""
    p = Path(annotations)
    if p.is_dir():
        p = p / ANNOTATIONS
    if not p.exists():
        raise InputError("annotations file not found (run `onereward annotate` first)", path=p)
    cands = p.parent / CANDIDATES
    if not cands.exists():
        raise InputError(f"no {CANDIDATES} beside the annotations (it must be the `generate` output folder)",
                         path=p.parent)
    return p, cands


def _check_label(value, dim: str, n: int, where, line):
    field = f"labels.{dim}"
    if value == NO_DIFFERENCE:
        return None
    if not isinstance(value, dict) or not {"best", "worst"} <= set(value) <= {"best", "worst", "margin"}:
        raise InputError(f'expected {{"best": i, "worst": j}} (and optionally "margin": m) or "{NO_DIFFERENCE}", '
                         f'got {value!r}', path=where, line=line, field=field)
    for k in ("best", "worst"):
        v = value[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"expected a candidate index, got {v!r}", path=where, line=line, field=f"{field}.{k}")
        if not 0 <= v < n:
            raise InputError(f"candidate index {v} out of range (sample has {n} candidates: 0..{n - 1})",
                             path=where, line=line, field=f"{field}.{k}")
    if value["best"] == value["worst"]:
        raise InputError(f"best and worst are the same candidate ({value['best']})", path=where, line=line,
                         field=field)
    margin = check_margin(value["margin"], path=where, line=line, field=f"{field}.margin") if "margin" in value \
        else None
    return Pick(value["best"], value["worst"], margin)


class Pick(NamedTuple):
    """One annotator's best/worst for a (sample, dimension); `margin` (optional) says how clearly."""
    best: int
    worst: int
    margin: float | None = None


def load_labels(recipe, ann_path: Path, samples: dict[str, dict], positions: list | None = None) -> dict:
    """{(sample_id, dimension): {annotator: (best, worst) | None}}, validated; later records win and an
    undo withdraws. `positions`, when given, receives (shown position of best, of worst, N) for every
    standing pick whose record says in which order the candidates were shown."""
    latest: dict[tuple[str, str], dict] = {}
    shown: dict[tuple[str, str], list[int]] = {}
    for rec in read_jsonl(ann_path, ANNOTATION_SCHEMA, tolerate_torn_tail=True):
        line, sid = rec["_line"], str(rec["sample_id"])
        if sid not in samples:
            raise InputError(f"unknown sample id '{sid}' (not in {CANDIDATES})", path=ann_path, line=line,
                             field="sample_id")
        s = samples[sid]
        if rec["task"] != s["task"]:
            raise InputError(f"task '{rec['task']}' but the sample's task is '{s['task']}'", path=ann_path,
                             line=line, field="task")
        if s["task"] not in recipe.tasks:
            raise InputError(f"task '{s['task']}' is not in the recipe", path=ann_path, line=line, field="task")
        dims = recipe.tasks[s["task"]].dimensions
        n = len(s["candidates"])
        if rec.get("retract") is True:
            latest.pop((sid, rec["annotator"]), None)
            shown.pop((sid, rec["annotator"]), None)
            continue
        if not isinstance(rec.get("labels"), dict):
            raise InputError("missing (a label record needs labels; an undo has \"retract\": true)", path=ann_path,
                             line=line, field="labels")
        order = rec.get("order")
        if order is not None and not (all(isinstance(i, int) and not isinstance(i, bool) for i in order)
                                      and sorted(order) == list(range(n))):
            raise InputError(f"expected a permutation of 0..{n - 1} (the shown order), got {order!r}", path=ann_path,
                             line=line, field="order")
        picks = {}
        for dim, value in rec["labels"].items():
            if dim not in dims:
                raise InputError(f"'{dim}' is not a dimension of task '{s['task']}' ({', '.join(dims)})",
                                 path=ann_path, line=line, field=f"labels.{dim}")
            picks[dim] = _check_label(value, dim, n, ann_path, line)
        latest[(sid, rec["annotator"])] = picks  # a newer record from the same annotator replaces the older
        shown.pop((sid, rec["annotator"]), None)
        if order is not None:
            shown[(sid, rec["annotator"])] = order
    if positions is not None:
        for key, order in shown.items():
            for pick in latest[key].values():
                if pick is not None:
                    positions.append((order.index(pick[0]), order.index(pick[1]), len(order)))
    out: dict[tuple[str, str], dict[str, tuple | None]] = {}
    for (sid, annotator), picks in latest.items():
        for dim, pick in picks.items():
            out.setdefault((sid, dim), {})[annotator] = pick
    return out


def make_pairs(recipe, labels: dict, samples: dict[str, dict], cand_dir: Path, pairs_dir: Path) -> list[dict]:
    mode, need = recipe.pairs.agreement, recipe.pairs.min_annotators
    rel = lambda p: os.path.relpath(cand_dir / p, pairs_dir)  # noqa: E731
    pairs = []
    for (sid, dim), by in sorted(labels.items()):
        s = samples[sid]
        if mode == "agree":
            picks = {None if p is None else (p.best, p.worst) for p in by.values()}
            if len(by) < need or len(picks) != 1 or None in picks:
                continue
            margins = [p.margin for p in by.values()]  # agreed: the least clear annotator's margin, if all gave one
            chosen = [(",".join(sorted(by)), Pick(*next(iter(picks)), None if None in margins else min(margins)))]
        else:
            chosen = [(a, p) for a, p in sorted(by.items()) if p is not None]
        for annotator, p in chosen:
            cands = s["candidates"]
            pairs.append({"sample_id": sid, "task": s["task"], "dimension": dim, "prompt": s.get("user_prompt") or "",
                          "winner": rel(cands[p.best]["path"]), "loser": rel(cands[p.worst]["path"]),
                          "source": rel(s["source"]), "mask": rel(s["mask"]), "annotator": annotator,
                          **({} if p.margin is None else {"margin": p.margin})})
    return pairs


def drop_unclear(train: list[dict], min_margin: float) -> tuple[list[dict], int]:
    """Training pairs whose label margin is below `min_margin` are dropped (pairs without a margin, e.g. a
    human's pick, are kept); the test split is never filtered, so held-out accuracy stays on every pair."""
    if min_margin <= 0:
        return train, 0
    kept = [p for p in train if p.get("margin") is None or p["margin"] >= min_margin]
    return kept, len(train) - len(kept)


def split_samples(sample_tasks: dict[str, str], test_fraction: float, seed: int) -> set[str]:
    """Test sample ids: a seeded shuffle per task, round(f * n) of each (at least 1 when f > 0, n >= 2)."""
    test = set()
    for task in sorted(set(sample_tasks.values())):
        ids = sorted(s for s, t in sample_tasks.items() if t == task)
        random.Random(f"{seed}:split:{task}").shuffle(ids)
        k = int(round(test_fraction * len(ids)))
        if test_fraction > 0 and k == 0 and len(ids) >= 2:
            k = 1
        test.update(ids[:k])
    return test


def run(recipe, annotations, out, test_fraction: float):
    from rich.console import Console
    from rich.table import Table

    if not 0 <= test_fraction < 1:
        raise InputError(f"must be in [0, 1), got {test_fraction}", field="--test-fraction")
    ann_path, cand_path = resolve_inputs(annotations)
    samples = {str(r["id"]): check_candidates(r, cand_path)
               for r in read_jsonl(cand_path, CANDIDATES_SCHEMA, tolerate_torn_tail=True)}
    positions: list[tuple[int, int, int]] = []
    labels = load_labels(recipe, ann_path, samples, positions)
    if not labels:  # an empty export would only fail later, in train-reward
        raise InputError("no labels (empty, or every label was retracted)", path=ann_path)
    out = Path(out)
    pairs_dir = out / "pairs"
    pairs = make_pairs(recipe, labels, samples, cand_path.parent.resolve(), pairs_dir.resolve())
    if not pairs:
        why = (f"no (sample, dimension) has {recipe.pairs.min_annotators}+ annotators who agree"
               if recipe.pairs.agreement == "agree" else "every label is \"no difference\"")
        raise InputError(f"no pairs: {why}", path=ann_path, field="pairs.agreement"
                         if recipe.pairs.agreement == "agree" else "labels")
    man = RunManifest("export-pairs", out, recipe, inputs={"annotations": ann_path, "candidates": cand_path})
    test_ids = split_samples({p["sample_id"]: p["task"] for p in pairs}, test_fraction, recipe.seed)
    train, dropped = drop_unclear([p for p in pairs if p["sample_id"] not in test_ids], recipe.pairs.train_min_margin)
    test = [p for p in pairs if p["sample_id"] in test_ids]
    if not train and dropped:
        raise InputError(f"every one of the {dropped} training pairs has a margin below "
                         f"{recipe.pairs.train_min_margin}", field="pairs.train_min_margin")
    write_jsonl(pairs_dir / "train.jsonl", train)
    write_jsonl(pairs_dir / "test.jsonl", test)

    counts: dict[tuple[str, str], list[int]] = {}
    for split, rows in ((0, train), (1, test)):
        for p in rows:
            counts.setdefault((p["task"], p["dimension"]), [0, 0])[split] += 1
    table = Table(title=f"pairs ({recipe.pairs.agreement})")
    for col in ("task", "dimension", "train", "test"):
        table.add_column(col, justify="right" if col in ("train", "test") else "left")
    for (task, dim), (a, b) in sorted(counts.items()):
        table.add_row(task, dim, str(a), str(b))
    table.add_row("[bold]total", "", f"[bold]{len(train)}", f"[bold]{len(test)}")
    console = Console(stderr=True)
    console.print(table)
    bias = position_bias(positions)
    if bias["picks"]:
        console.print(position_table(bias))
    else:
        console.print("position bias: no label records the order its candidates were shown in (imports, the "
                      "oracle); nothing to report", highlight=False)

    if dropped:
        console.print(f"export-pairs: dropped {dropped} training pairs with a margin below "
                      f"{recipe.pairs.train_min_margin} (pairs.train_min_margin); the test split is unfiltered",
                      highlight=False)
    man.count(pairs_train=len(train), pairs_test=len(test), train_dropped_below_margin=dropped,
              samples_labelled=len({s for s, _ in labels}),
              samples_train=len({p["sample_id"] for p in train}), samples_test=len(test_ids),
              per_task_dimension={f"{t}/{d}": {"train": a, "test": b} for (t, d), (a, b) in sorted(counts.items())})
    man.set(agreement=recipe.pairs.agreement, test_fraction=test_fraction,
            train_min_margin=recipe.pairs.train_min_margin, position_bias=bias)
    man.write()
    return pairs_dir


def position_bias(positions: list[tuple[int, int, int]]) -> dict:
    """How often each shown position was picked best and worst, from (best pos, worst pos, N) triples.
    `expected` is each position's share under no bias: the mean over picks of 1/N where it was shown."""
    n_max = max((n for *_, n in positions), default=0)
    best, worst, expected = [0] * n_max, [0] * n_max, [0.0] * n_max
    for b, w, n in positions:
        best[b] += 1
        worst[w] += 1
        for k in range(n):
            expected[k] += 1.0 / n
    total = len(positions)
    return {"picks": total, "best": best, "worst": worst,
            "expected_share": [e / total for e in expected] if total else []}


def position_table(bias: dict):
    from rich.table import Table

    t = Table(title=f"position bias ({bias['picks']} picks with a shown order)",
              caption="shown position = where the page put the candidate (1 = first); no bias: share ~ expected")
    for col in ("shown position", "best", "best %", "worst", "worst %", "expected %"):
        t.add_column(col, justify="right")
    n = bias["picks"]
    for k, (b, w, e) in enumerate(zip(bias["best"], bias["worst"], bias["expected_share"])):
        t.add_row(str(k + 1), str(b), f"{100 * b / n:.1f}", str(w), f"{100 * w / n:.1f}", f"{100 * e:.1f}")
    return t

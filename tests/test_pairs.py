"""`onereward export-pairs`: pairs from best/worst picks, agreement modes, the by-sample split,
validation, and the whole chain synth -> generate -> annotations -> export-pairs through the CLI."""
import json
from pathlib import Path

import pytest

from onereward_cli import pairs as P
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe

TASKS = ["fill", "extend", "extend_no_prompt", "removal"]


def _candidates(d: Path, n_samples=8, n_cand=3):
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n_samples):
        task = TASKS[i % 4]
        sid = f"s{i}"
        user = None if task in ("extend_no_prompt", "removal") else f"prompt {i}"
        recs.append({"id": sid, "task": task, "prompt": user or "fixed", "user_prompt": user,
                     "source": f"images/{sid}/source.png", "mask": f"images/{sid}/mask.png", "width": 32,
                     "height": 32,
                     "candidates": [{"index": k, "path": f"images/{sid}/cand_{k}.png", "seed": k,
                                     "params": {"steps": 2, "guidance": 1.0, "true_cfg": 1.0, "shift": 0.5,
                                                "negative_prompt": ""}} for k in range(n_cand)]})
    (d / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def _ann(sid, task, labels, annotator="alice"):
    return {"sample_id": sid, "annotator": annotator, "task": task, "labels": labels, "time": "2025-01-01T00:00:00"}


def _write(d: Path, rows):
    (d / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "annotations.jsonl"


def _read(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines()]


def _full_labels(task, best=0, worst=1):
    dims = load_recipe("tiny").tasks[task].dimensions
    return {d: {"best": best, "worst": worst} for d in dims}


def test_pairs_all_mode_paths_and_prompts(tmp_path):
    cand = tmp_path / "cands"
    recs = _candidates(cand)
    rows = [_ann(r["id"], r["task"], _full_labels(r["task"], 2, 0)) for r in recs]
    rows.append(_ann("s0", "fill", {"text alignment": {"best": 1, "worst": 2}, "consistency": "no difference"},
                     annotator="bob"))
    ann = _write(cand, rows)
    out = tmp_path / "data"
    P.run(load_recipe("tiny"), ann, out, test_fraction=0.25)
    train, test = _read(out / "pairs" / "train.jsonl"), _read(out / "pairs" / "test.jsonl")
    allp = train + test
    dims = {t: load_recipe("tiny").tasks[t].dimensions for t in TASKS}
    assert len(allp) == sum(len(dims[r["task"]]) for r in recs) + 1  # bob: one pick, one "no difference"
    for p in allp:
        assert set(p) == {"sample_id", "task", "dimension", "prompt", "winner", "loser", "source", "mask", "annotator"}
        base = out / "pairs"
        k = 2 if p["annotator"] == "alice" else 1
        assert (base / p["winner"]).resolve() == (cand / f"images/{p['sample_id']}/cand_{k}.png").resolve()
        assert (base / p["source"]).resolve() == (cand / f"images/{p['sample_id']}/source.png").resolve()
        assert p["dimension"] in dims[p["task"]]
        rec = next(r for r in recs if r["id"] == p["sample_id"])
        assert p["prompt"] == (rec["user_prompt"] or "")
    bob = [p for p in allp if p["annotator"] == "bob"]
    assert len(bob) == 1 and bob[0]["dimension"] == "text alignment" and bob[0]["loser"].endswith("cand_2.png")
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "export-pairs" and run["counts"]["pairs_train"] == len(train)


def test_split_is_by_sample_seeded_and_stratified(tmp_path):
    cand = tmp_path / "cands"
    recs = _candidates(cand, n_samples=40)
    ann = _write(cand, [_ann(r["id"], r["task"], _full_labels(r["task"])) for r in recs])
    r = load_recipe("tiny")
    P.run(r, ann, tmp_path / "a", test_fraction=0.3)
    P.run(r, cand, tmp_path / "b", test_fraction=0.3)  # the candidates folder works too
    tr, te = _read(tmp_path / "a/pairs/train.jsonl"), _read(tmp_path / "a/pairs/test.jsonl")
    assert {p["sample_id"] for p in tr}.isdisjoint({p["sample_id"] for p in te})
    assert _read(tmp_path / "b/pairs/test.jsonl") == te  # same seed, same split
    test_samples = {p["sample_id"] for p in te}
    assert len(test_samples) == 4 * 3  # round(0.3 * 10) per task
    assert {p["task"] for p in te} == set(TASKS)
    P.run(load_recipe("tiny", ["seed=5"]), ann, tmp_path / "c", test_fraction=0.3)
    assert {p["sample_id"] for p in _read(tmp_path / "c/pairs/test.jsonl")} != test_samples
    P.run(r, ann, tmp_path / "d", test_fraction=0.0)
    assert _read(tmp_path / "d/pairs/test.jsonl") == [] and len(_read(tmp_path / "d/pairs/train.jsonl")) == len(tr) + len(te)


def test_agree_mode(tmp_path):
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    rows = [
        _ann("s0", "fill", {"consistency": {"best": 0, "worst": 1}, "structure": {"best": 0, "worst": 1},
                            "aesthetics": {"best": 2, "worst": 1}}, "alice"),
        _ann("s0", "fill", {"consistency": {"best": 0, "worst": 1}, "structure": {"best": 0, "worst": 2},
                            "aesthetics": "no difference"}, "bob"),
        _ann("s3", "removal", {"removal quality": {"best": 1, "worst": 0}}, "alice"),  # only one annotator
    ]
    ann = _write(cand, rows)
    P.run(load_recipe("tiny", ["pairs.agreement=agree"]), ann, tmp_path / "a", test_fraction=0.0)
    got = {(p["sample_id"], p["dimension"]): p for p in _read(tmp_path / "a/pairs/train.jsonl")}
    assert set(got) == {("s0", "consistency"), ("s3", "removal quality")}
    assert got[("s0", "consistency")]["annotator"] == "alice,bob"
    P.run(load_recipe("tiny", ["pairs.agreement=agree", "pairs.min_annotators=2"]), ann, tmp_path / "b",
          test_fraction=0.0)
    assert [(p["sample_id"], p["dimension"]) for p in _read(tmp_path / "b/pairs/train.jsonl")] == [("s0", "consistency")]
    P.run(load_recipe("tiny"), ann, tmp_path / "c", test_fraction=0.0)
    assert len(_read(tmp_path / "c/pairs/train.jsonl")) == 3 + 2 + 1


def test_train_min_margin_drops_unclear_training_pairs_only(tmp_path):
    """pairs.train_min_margin: a training pair whose label margin is below it is dropped; a pair without a
    margin (a human's pick) and every test pair are kept, and each pair carries its label's margin.
    Guards the filter's direction, its train-only scope and the margin's way from label to pair."""
    cand = tmp_path / "cands"
    recs = _candidates(cand, n_samples=40)
    rows = []
    for i, r in enumerate(recs):
        labels = _full_labels(r["task"])
        if i % 3:  # two of three samples: the oracle's margin, alternating clear (0.3) and unclear (0.05)
            labels = {d: {**v, "margin": 0.3 if i % 2 else 0.05} for d, v in labels.items()}
        rows.append(_ann(r["id"], r["task"], labels))
    ann = _write(cand, rows)
    P.run(load_recipe("tiny"), ann, tmp_path / "all", test_fraction=0.25)
    P.run(load_recipe("tiny", ["pairs.train_min_margin=0.1"]), ann, tmp_path / "clear", test_fraction=0.25)
    tr_all, te_all = _read(tmp_path / "all/pairs/train.jsonl"), _read(tmp_path / "all/pairs/test.jsonl")
    tr, te = _read(tmp_path / "clear/pairs/train.jsonl"), _read(tmp_path / "clear/pairs/test.jsonl")
    assert te == te_all and any(p.get("margin") == 0.05 for p in te)  # the test split is not filtered
    assert {p.get("margin") for p in tr_all} == {None, 0.05, 0.3}
    assert tr == [p for p in tr_all if p.get("margin") != 0.05] and {p.get("margin") for p in tr} == {None, 0.3}
    run = json.loads((tmp_path / "clear/run.json").read_text())
    assert run["counts"]["train_dropped_below_margin"] == len(tr_all) - len(tr) > 0
    with pytest.raises(InputError, match="margin below") as e:  # nothing left to train on
        P.run(load_recipe("tiny", ["pairs.train_min_margin=0.5"]),
              _write(cand, [_ann("s1", "extend", {"consistency": {"best": 0, "worst": 1, "margin": 0.2}})]),
              tmp_path / "none", test_fraction=0.0)
    assert e.value.field == "pairs.train_min_margin" and not (tmp_path / "none").exists()


def test_agree_mode_keeps_the_least_clear_margin(tmp_path):
    """Two annotators who pick the same best/worst with different margins agree; the pair gets the smaller."""
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    ann = _write(cand, [_ann("s0", "fill", {"consistency": {"best": 0, "worst": 1, "margin": 0.4}}, "alice"),
                        _ann("s0", "fill", {"consistency": {"best": 0, "worst": 1, "margin": 0.2}}, "bob"),
                        _ann("s3", "removal", {"removal quality": {"best": 1, "worst": 0, "margin": 0.3}}, "alice"),
                        _ann("s3", "removal", {"removal quality": {"best": 1, "worst": 0}}, "bob")])
    P.run(load_recipe("tiny", ["pairs.agreement=agree"]), ann, tmp_path / "a", test_fraction=0.0)
    got = {p["sample_id"]: p.get("margin") for p in _read(tmp_path / "a/pairs/train.jsonl")}
    assert got == {"s0": 0.2, "s3": None}


def test_later_record_of_an_annotator_wins(tmp_path):
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    ann = _write(cand, [_ann("s3", "removal", {"removal quality": {"best": 0, "worst": 1}}),
                        _ann("s0", "fill", {"consistency": {"best": 0, "worst": 1}}),
                        _ann("s3", "removal", {"removal quality": "no difference"})])
    P.run(load_recipe("tiny"), ann, tmp_path / "o", test_fraction=0.0)
    assert [p["sample_id"] for p in _read(tmp_path / "o/pairs/train.jsonl")] == ["s0"]


@pytest.mark.parametrize("rows,match,field", [
    ([], "no labels", None),
    ([_ann("s3", "removal", {"removal quality": "no difference"})], "no pairs", "labels"),
])
def test_an_export_without_pairs_is_an_error(tmp_path, rows, match, field):
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    ann = _write(cand, rows)
    with pytest.raises(InputError, match=match) as e:
        P.run(load_recipe("tiny"), ann, tmp_path / "o", test_fraction=0.0)
    assert e.value.field == field and e.value.path == ann
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("row,match,field", [
    (_ann("s0", "fill", {"consistency": {"best": 1, "worst": 1}}), "same candidate", "labels.consistency"),
    (_ann("s0", "fill", {"consistency": {"best": 3, "worst": 1}}), "out of range", "labels.consistency.best"),
    (_ann("s0", "fill", {"consistency": {"best": 0, "worst": -1}}), "out of range", "labels.consistency.worst"),
    (_ann("s3", "removal", {"aesthetics": {"best": 0, "worst": 1}}), "not a dimension", "labels.aesthetics"),
    (_ann("s2", "extend_no_prompt", {"text alignment": {"best": 0, "worst": 1}}), "not a dimension",
     "labels.text alignment"),
    (_ann("nope", "fill", {"consistency": {"best": 0, "worst": 1}}), "unknown sample id", "sample_id"),
    (_ann("s0", "removal", {"removal quality": {"best": 0, "worst": 1}}), "sample's task", "task"),
    (_ann("s0", "fill", {"consistency": "same"}), "expected", "labels.consistency"),
    (_ann("s0", "fill", {"consistency": {"best": "0", "worst": 1}}), "candidate index", "labels.consistency.best"),
    (_ann("s0", "fill", {"consistency": {"best": 0, "worst": 1, "margin": -0.1}}), ">= 0", "labels.consistency.margin"),
    (_ann("s0", "fill", {"consistency": {"best": 0, "worst": 1, "margin": "big"}}), ">= 0",
     "labels.consistency.margin"),
    (_ann("s0", "fill", {"consistency": {"best": 0, "worst": 1, "why": "x"}}), "expected", "labels.consistency"),
])
def test_bad_annotations_name_file_line_field(tmp_path, row, match, field):
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    ann = _write(cand, [_ann("s1", "extend", {"consistency": {"best": 0, "worst": 1}}), row])
    out = tmp_path / "o"
    with pytest.raises(InputError, match=match) as e:
        P.run(load_recipe("tiny"), ann, out, test_fraction=0.2)
    assert e.value.line == 2 and e.value.field == field and f"annotations.jsonl:2: {field}" in str(e.value)
    assert not out.exists()


def test_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="annotations file not found"):
        P.run(load_recipe("tiny"), tmp_path, tmp_path / "o", test_fraction=0.2)
    (tmp_path / "annotations.jsonl").write_text("")
    with pytest.raises(InputError, match="candidates.jsonl"):
        P.run(load_recipe("tiny"), tmp_path / "annotations.jsonl", tmp_path / "o", test_fraction=0.2)
    with pytest.raises(InputError, match="test-fraction"):
        P.run(load_recipe("tiny"), tmp_path, tmp_path / "o", test_fraction=1.0)


# ----------------------------------------------------------------------------------------------
# The chain through the CLI
# ----------------------------------------------------------------------------------------------
def test_cli_synth_generate_annotate_by_hand_export(tmp_path, zoo):
    from typer.testing import CliRunner

    from onereward_cli.cli import app, main

    run = CliRunner().invoke
    sets = ["--set", "generate.steps=[2,2]", "--set", "synth.size=32"]
    r = run(app, ["synth", str(tmp_path / "pool"), "--n", "6", "--seed", "3", *sets])
    assert r.exit_code == 0, r.output
    r = run(app, ["generate", str(tmp_path / "pool" / "manifest.jsonl"), "--out", str(tmp_path / "cands"),
                  "--candidates", "2", *sets])
    assert r.exit_code == 0, r.output
    recs = _read(tmp_path / "cands" / "candidates.jsonl")
    assert len(recs) == 6 and all((tmp_path / "cands" / c["path"]).exists() for x in recs for c in x["candidates"])
    tasks = load_recipe("tiny").tasks
    rows = [_ann(x["id"], x["task"], {d: {"best": 1, "worst": 0} for d in tasks[x["task"]].dimensions}, a)
            for x in recs for a in ("alice", "bob")]
    _write(tmp_path / "cands", rows)
    r = run(app, ["export-pairs", str(tmp_path / "cands" / "annotations.jsonl"), "--out", str(tmp_path / "data"),
                  "--test-fraction", "0.34", *sets])
    assert r.exit_code == 0, r.output
    train, test = _read(tmp_path / "data/pairs/train.jsonl"), _read(tmp_path / "data/pairs/test.jsonl")
    assert len(train) + len(test) == 2 * sum(len(tasks[x["task"]].dimensions) for x in recs)
    assert test and train
    for p in train + test:
        assert (tmp_path / "data/pairs" / p["winner"]).exists() and (tmp_path / "data/pairs" / p["mask"]).exists()
    # Re-running generate redoes nothing; a bad label exits 2 with file:line: field.
    before = (tmp_path / "cands" / "candidates.jsonl").read_bytes()
    r = run(app, ["generate", str(tmp_path / "pool"), "--out", str(tmp_path / "cands"), "--candidates", "2", *sets])
    assert r.exit_code == 0 and "0 new, 6 skipped" in r.output
    assert (tmp_path / "cands" / "candidates.jsonl").read_bytes() == before
    rows[3]["labels"] = {"structure": {"best": 1, "worst": 1}} if "structure" in rows[3]["labels"] else \
        {"removal quality": {"best": 1, "worst": 1}}
    _write(tmp_path / "cands", rows)
    with pytest.raises(SystemExit) as e:
        main(["export-pairs", str(tmp_path / "cands"), "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()


def test_position_bias_counts_shown_positions(tmp_path, capsys):
    """Guards: picks are counted by the position the page showed them at (order.index(candidate)), not
    by candidate index; undone labels and labels without a shown order are left out; bad orders are errors."""
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    # s3 (removal, 1 dimension) shown as [2, 0, 1]: best = candidate 2 (position 1), worst = 1 (position 3).
    rows = [_ann("s3", "removal", {"removal quality": {"best": 2, "worst": 1}}) | {"order": [2, 0, 1]},
            # s1 (extend, 4 dims) shown as [1, 2, 0]: best 0 -> position 3, worst 1 -> position 1.
            _ann("s1", "extend", _full_labels("extend", 0, 1)) | {"order": [1, 2, 0]},
            # an import (no order) and an undone page label: neither counts.
            _ann("s0", "fill", _full_labels("fill", 0, 1), annotator="bob"),
            _ann("s2", "extend_no_prompt", _full_labels("extend_no_prompt", 0, 1)) | {"order": [0, 1, 2]},
            {"sample_id": "s2", "annotator": "alice", "task": "extend_no_prompt", "retract": True, "time": "t"}]
    out = tmp_path / "data"
    P.run(load_recipe("tiny"), _write(cand, rows), out, test_fraction=0.0)
    bias = json.loads((out / "run.json").read_text())["position_bias"]
    assert bias["picks"] == 5
    assert bias["best"] == [1, 0, 4] and bias["worst"] == [4, 0, 1]
    assert bias["expected_share"] == pytest.approx([1 / 3] * 3)
    assert "position bias (5 picks with a shown order)" in capsys.readouterr().err
    assert {p["sample_id"] for p in _read(out / "pairs" / "train.jsonl")} == {"s0", "s1", "s3"}  # s2 undone

    rows[0]["order"] = [0, 0, 1]
    with pytest.raises(InputError, match="permutation") as e:
        P.run(load_recipe("tiny"), _write(cand, rows), tmp_path / "bad", test_fraction=0.0)
    assert e.value.line == 1 and e.value.field == "order"


@pytest.mark.parametrize("entry,field", [
    ("images/s0/cand_0.png", "candidates[0]"),
    ({"index": 0}, "candidates[0].path"),
    ({"index": 2, "path": "images/s0/cand_0.png"}, "candidates[0].index"),
    ({"index": 0, "path": "../../etc/passwd"}, "candidates[0].path"),
    ({"index": 0, "path": "/etc/passwd"}, "candidates[0].path"),
])
def test_malformed_candidate_entries_name_line_and_field(tmp_path, entry, field):
    cand = tmp_path / "cands"
    _candidates(cand, n_samples=4)
    lines = (cand / "candidates.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["candidates"][0] = entry
    lines[1] = json.dumps(rec)
    (cand / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    ann = _write(cand, [_ann("s0", "fill", {"consistency": {"best": 0, "worst": 1}})])
    with pytest.raises(InputError) as e:
        P.run(load_recipe("tiny"), ann, tmp_path / "o", test_fraction=0.0)
    assert e.value.line == 2 and e.value.field == field and str(e.value).startswith(str(cand / "candidates.jsonl"))
    assert not (tmp_path / "o").exists()

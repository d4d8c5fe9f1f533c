"""annotate: oracle, import (JSONL + CSV), and the labelling server (endpoints, validation, path
traversal, kill + restart). The browser test is in test_annotate_browser.py."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onereward_cli import annotate
from onereward_cli.artifacts import read_jsonl, strip_meta
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe
from onereward_cli.synth import oracle_pick, oracle_scores

GRAY, BLUE = (120, 120, 120), (40, 80, 220)
ND = annotate.NO_DIFFERENCE


# ----------------------------------------------------------------------------------------------
# A hand-made candidates dir (no generate.py): s0 fill, s1 removal, s2 extend_no_prompt
# ----------------------------------------------------------------------------------------------
def _png(root: Path, rel: str, arr: np.ndarray) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(p)
    return rel


def make_candidates(root: Path, size: int = 32, n_fill: int = 3) -> Path:
    """Three samples with 3 candidates each (s0: `n_fill`), in the brief's candidates.jsonl format.

    s0 (fill, "a red square"): the masked square painted red (0), blue (1), green (2), then grey shades.
    s1 (removal): a blue square on grey; 0 removes it cleanly, 1 leaves it, 2 fills the hole with noise.
    s2 (extend_no_prompt): three identical candidates, so every dimension is "no difference".
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gray = np.full((size, size, 3), GRAY, np.uint8)
    a, b = size // 4, 3 * size // 4
    mask = np.zeros((size, size), np.uint8)
    mask[a:b, a:b] = 255

    def painted(base, color):
        out = base.copy()
        out[a:b, a:b] = color
        return out

    with_object = painted(gray, BLUE)
    noisy = gray.copy()
    noisy[a:b, a:b] = rng.integers(0, 256, (b - a, b - a, 3))
    ext_mask = np.zeros((size, size), np.uint8)
    ext_mask[:, 3 * size // 4:] = 255
    specs = [
        ("s0", "fill", "a red square", gray, mask,
         [painted(gray, (220, 40, 40)), painted(gray, BLUE), painted(gray, (40, 180, 70))]
         + [painted(gray, (20 * k, 20 * k, 20 * k)) for k in range(n_fill - 3)]),
        ("s1", "removal", None, with_object, mask, [gray, with_object, noisy]),
        ("s2", "extend_no_prompt", None, gray, ext_mask, [gray, gray, gray]),
    ]
    fixed = {"removal": "remove", "extend_no_prompt": "high-definition, perfect composition"}
    lines = []
    for sid, task, prompt, src, m, cands in specs:
        rec = {"id": sid, "task": task, "prompt": prompt or fixed[task], "user_prompt": prompt,
               "source": _png(root, f"images/{sid}/source.png", src),
               "mask": _png(root, f"images/{sid}/mask.png", m), "width": size, "height": size,
               "candidates": [{"index": i, "path": _png(root, f"images/{sid}/cand_{i}.png", c), "seed": i,
                               "params": {"steps": 2, "guidance": 30.0, "true_cfg": 1.0, "shift": 1.0,
                                          "negative_prompt": ""}}
                              for i, c in enumerate(cands)]}
        lines.append(json.dumps(rec))
    (root / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("tiny")


@pytest.fixture()
def cdir(tmp_path):
    return make_candidates(tmp_path / "cands")


GOOD = {
    "s0": {"text alignment": {"best": 0, "worst": 1}, "consistency": ND, "structure": {"best": 2, "worst": 0},
           "aesthetics": ND},
    "s1": {"removal quality": {"best": 0, "worst": 2}},
    "s2": {"consistency": ND, "structure": ND, "aesthetics": {"best": 1, "worst": 0}},
}


def _records(path) -> list[dict]:
    return [strip_meta(r) for r in read_jsonl(path)]


# ----------------------------------------------------------------------------------------------
# candidates.jsonl
# ----------------------------------------------------------------------------------------------
def test_load_samples_dims_from_recipe(recipe, cdir):
    samples = annotate.load_samples(recipe, cdir)
    assert list(samples) == ["s0", "s1", "s2"]
    assert samples["s0"].dimensions == recipe.tasks["fill"].dimensions
    assert samples["s1"].dimensions == ("removal quality",)
    assert samples["s2"].user_prompt is None and "text alignment" not in samples["s2"].dimensions


@pytest.mark.parametrize("edit, field", [
    (lambda r: r.update(source="../outside.png"), "source"),
    (lambda r: r.update(mask="/etc/passwd"), "mask"),
    (lambda r: r.update(task="paint"), "task"),
    (lambda r: r["candidates"][1].update(path="images/s0/nope.png"), "candidates[1].path"),
    (lambda r: r.update(candidates=r["candidates"][:1]), "candidates"),
])
def test_load_samples_rejects_bad_records(recipe, cdir, edit, field):
    path = cdir / "candidates.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    edit(recs[1])
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(InputError) as e:
        annotate.load_samples(recipe, cdir)
    assert f"candidates.jsonl:2: {field}:" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------
def test_oracle_labels_every_sample(recipe, cdir):
    target = cdir / "annotations.jsonl"
    human = {"sample_id": "s1", "annotator": "alice", "task": "removal",
             "labels": {"removal quality": {"best": 2, "worst": 1}}, "time": "t"}
    target.write_text(json.dumps(human) + "\n")
    annotate.annotate_with_oracle(recipe, cdir, target)
    recs = _records(target)
    assert recs[0] == human  # other annotators' work survives
    oracle = {r["sample_id"]: r for r in recs if r["annotator"] == "oracle"}
    assert set(oracle) == {"s0", "s1", "s2"}
    # red wins, first zero loses; the margin is the whole scale
    assert oracle["s0"]["labels"]["text alignment"] == {"best": 0, "worst": 1, "margin": 1.0}
    assert oracle["s1"]["labels"]["removal quality"]["best"] == 0  # the clean removal
    assert oracle["s2"]["labels"] == {d: ND for d in recipe.tasks["extend_no_prompt"].dimensions}
    # Wiring: the oracle saw this sample's images, its task's dimensions and the user prompt.
    s0 = cdir / "images/s0"
    scores = [oracle_scores(Image.open(s0 / "source.png"), Image.open(s0 / "mask.png"),
                            Image.open(s0 / f"cand_{i}.png"), recipe.tasks["fill"].dimensions, "a red square")
              for i in range(3)]
    want = {d: ND if p is None else {"best": p[0], "worst": p[1], "margin": round(scores[p[0]][d] - scores[p[1]][d], 6)}
            for d, p in oracle_pick(scores, recipe.tasks["fill"].dimensions).items()}
    assert oracle["s0"]["labels"] == want  # the margin is best's score minus worst's on that dimension
    assert list(oracle["s0"]["labels"]) == list(recipe.tasks["fill"].dimensions)
    run = json.loads((cdir / "annotations.run.json").read_text())
    assert run["stage"] == "annotate" and run["counts"]["samples"] == 3
    # Re-running replaces the oracle's records instead of duplicating them.
    annotate.annotate_with_oracle(recipe, cdir, target)
    assert len(_records(target)) == 4


def test_oracle_via_cli(cdir, capsys):
    from onereward_cli import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["annotate", str(cdir), "--oracle"])
    assert e.value.code == 0
    assert len(_records(cdir / "annotations.jsonl")) == 3


def test_oracle_bad_image_names_line_and_field(recipe, cdir):
    (cdir / "images/s1/cand_2.png").write_bytes(b"not a png")
    target = cdir / "annotations.jsonl"
    with pytest.raises(InputError) as e:
        annotate.annotate_with_oracle(recipe, cdir, target)
    assert "candidates.jsonl:2: candidates[2].path:" in str(e.value)
    assert not target.exists()


# ----------------------------------------------------------------------------------------------
# Import: JSONL
# ----------------------------------------------------------------------------------------------
def _jsonl(path: Path, recs) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_import_jsonl(recipe, cdir, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [
        {"sample_id": sid, "annotator": "bob", "task": recipe_task, "labels": GOOD[sid], "time": "2025-01-01"}
        for sid, recipe_task in (("s0", "fill"), ("s1", "removal"))
    ] + [{"sample_id": "s2", "labels": GOOD["s2"]}])  # no annotator: --annotator applies
    target = cdir / "annotations.jsonl"
    annotate.import_annotations(recipe, cdir, src, target, annotator="carol")
    recs = {(r["sample_id"], r["annotator"]): r for r in _records(target)}
    assert set(recs) == {("s0", "bob"), ("s1", "bob"), ("s2", "carol")}
    assert recs[("s0", "bob")]["labels"] == GOOD["s0"] and recs[("s0", "bob")]["time"] == "2025-01-01"
    assert recs[("s2", "carol")]["task"] == "extend_no_prompt" and recs[("s2", "carol")]["time"]
    # Importing again is idempotent: (sample, annotator) records are replaced, not duplicated.
    annotate.import_annotations(recipe, cdir, src, target, annotator="carol")
    assert len(_records(target)) == 3


BAD_JSONL = [
    ({"sample_id": "s0", "labels": {**GOOD["s0"], "consistency": {"best": 1, "worst": 1}}},
     "labels.consistency", "same candidate"),
    ({"sample_id": "s0", "labels": {**GOOD["s0"], "structure": {"best": 3, "worst": 0}}},
     "labels.structure.best", "out of range"),
    ({"sample_id": "s1", "labels": {**GOOD["s1"], "structure": ND}}, "labels.structure", "not a dimension"),
    ({"sample_id": "s9", "labels": GOOD["s1"]}, "sample_id", "unknown sample id"),
    ({"sample_id": "s2", "labels": {"consistency": ND}}, "labels", "missing dimension"),
    ({"sample_id": "s1", "labels": {"removal quality": {"best": "1", "worst": 0}}},
     "labels.removal quality.best", "integer"),
    ({"sample_id": "s1", "task": "fill", "labels": GOOD["s1"]}, "task", "removal"),
    ({"sample_id": "s1", "labels": {"removal quality": "same"}}, "labels.removal quality", "no difference"),
    ('{"sample_id": "s1", "labels": ', None, "malformed JSON"),
    ({"sample_id": "s1"}, "labels", "missing"),
]


@pytest.mark.parametrize("bad, field, words", BAD_JSONL)
def test_import_jsonl_errors(recipe, cdir, tmp_path, bad, field, words):
    src = _jsonl(tmp_path / "in.jsonl", [{"sample_id": "s0", "annotator": "first", "labels": GOOD["s0"]}, bad])
    target = cdir / "annotations.jsonl"
    target.write_text('{"sample_id": "s0", "annotator": "x", "labels": {}}\n')
    before = target.read_bytes()
    with pytest.raises(InputError) as e:
        annotate.import_annotations(recipe, cdir, src, target)
    msg = str(e.value)
    assert msg.startswith(f"{src}:2: " + (f"{field}: " if field else "")), msg
    assert words in msg
    assert target.read_bytes() == before  # nothing half-written


def test_import_jsonl_duplicate(recipe, cdir, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"sample_id": "s1", "annotator": "a", "labels": GOOD["s1"]}] * 2)
    with pytest.raises(InputError, match=r"in\.jsonl:2: sample_id: .*twice.*line 1"):
        annotate.import_annotations(recipe, cdir, src, cdir / "annotations.jsonl")


# ----------------------------------------------------------------------------------------------
# Import: CSV
# ----------------------------------------------------------------------------------------------
def test_import_csv(recipe, cdir, tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text(
        "sample_id,dimension,best,worst,annotator\n"
        "s0,Text Alignment,0,1,dan\n"
        "s0,consistency,,,dan\n"
        "s0,structure,2,0,dan\n"
        "s0,aesthetics,no difference,No Difference,dan\n"
        "s1,removal quality,0,2,\n"
        "s2,consistency,,,erin\n"
        "s2,structure,no difference,no difference,erin\n"
        "s2,aesthetics,1,0,erin\n", encoding="utf-8")
    target = cdir / "annotations.jsonl"
    annotate.import_annotations(recipe, cdir, src, target, annotator="fallback")
    recs = {(r["sample_id"], r["annotator"]): r for r in _records(target)}
    assert set(recs) == {("s0", "dan"), ("s1", "fallback"), ("s2", "erin")}
    for (sid, _), r in recs.items():
        assert r["labels"] == GOOD[sid] and list(r["labels"]) == list(GOOD[sid])


@pytest.mark.parametrize("row, line, field, words", [
    ("s1,removal quality,1,1", 2, "worst", "same candidate"),
    ("s1,removal quality,0,5", 2, "worst", "out of range"),
    ("s1,structure,0,1", 2, "dimension", "not a dimension"),
    ("s7,removal quality,0,1", 2, "sample_id", "unknown sample id"),
    ("s1,removal quality,0,", 2, "worst", "both"),
    ("s1,removal quality,first,1", 2, "best", "candidate index"),
    ("s1,removal quality,0,1,extra", 2, None, "malformed line"),
    ("s1,removal quality,0", 2, None, "malformed line"),
    ("s2,consistency,0,1", 2, "dimension", "lacks dimension(s) structure, aesthetics"),
    ("s1,removal quality,0,1\ns1,removal quality,1,0", 3, "dimension", "twice (first on line 2)"),
])
def test_import_csv_errors(recipe, cdir, tmp_path, row, line, field, words):
    src = tmp_path / "labels.csv"
    src.write_text("sample_id,dimension,best,worst\n" + row + "\n")
    target = cdir / "annotations.jsonl"
    with pytest.raises(InputError) as e:
        annotate.import_annotations(recipe, cdir, src, target)
    msg = str(e.value)
    assert msg.startswith(f"{src}:{line}: " + (f"{field}: " if field else "")), msg
    assert words in msg
    assert not target.exists()


def test_import_csv_header_and_cli_exit_code(cdir, tmp_path, capsys):
    from onereward_cli import cli

    src = tmp_path / "labels.csv"
    src.write_text("sample,dimension,best,worst\ns1,removal quality,0,1\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["annotate", str(cdir), "--import", str(src)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}:1: header: missing column(s) sample_id" in " ".join(err.split())
    assert not (cdir / "annotations.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def server(recipe, cdir):
    target = cdir / "annotations.jsonl"
    srv = annotate.make_server(recipe, cdir, target, annotator="alice", port=0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv, target
    srv.shutdown()
    srv.server_close()


def _req(srv, method, path, body=None, headers=None):
    """Raw request (no client-side path normalisation); returns (status, headers, bytes)."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=hdrs)
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, dict(res.getheaders()), data


def _state(srv):
    status, _, data = _req(srv, "GET", "/api/state")
    assert status == 200
    return json.loads(data)


def test_server_binds_loopback_and_serves_page(server):
    srv, _ = server
    assert srv.server_address[0] == "127.0.0.1"
    status, h, page = _req(srv, "GET", "/")
    assert status == 200 and h["Content-Type"].startswith("text/html")
    assert b'src="/static/annotate.js"' in page and b"http" not in page.split(b"<body>")[0].replace(b"http-equiv", b"")
    assert "default-src 'none'" in h["Content-Security-Policy"]
    for name, ctype in (("annotate.js", "text/javascript"), ("annotate.css", "text/css")):
        status, h, body = _req(srv, "GET", f"/static/{name}")
        assert status == 200 and h["Content-Type"].startswith(ctype) and len(body) > 1000
        assert b"https://" not in body  # nothing from a CDN
    assert _req(srv, "GET", "/nope")[0] == 404


def test_state_and_files(server, cdir):
    srv, _ = server
    st = _state(srv)
    assert st["annotator"] == "alice"
    assert st["progress"] == {"done": 0, "total": 3, "skipped": 0}
    s = st["sample"]
    assert (s["id"], s["task"], s["user_prompt"]) == ("s0", "fill", "a red square")
    assert [d["name"] for d in s["dimensions"]] == ["text alignment", "consistency", "structure", "aesthetics"]
    assert all(d["definition"] for d in s["dimensions"])
    assert "params" not in s["candidates"][0] and "seed" not in s["candidates"][0]  # blind judging
    # Candidates come in this annotator's shuffled order; position 1 shows candidate order[1].
    assert s["order"] == annotate.shown_order(0, "alice", "s0", 3) and sorted(s["order"]) == [0, 1, 2]
    status, h, png = _req(srv, "GET", s["candidates"][1]["url"])
    assert status == 200 and h["Content-Type"] == "image/png"
    assert png == (cdir / f"images/s0/cand_{s['order'][1]}.png").read_bytes()
    assert _req(srv, "GET", s["mask"])[0] == 200


def test_submit_appends_and_advances(server):
    srv, target = server
    status, _, data = _req(srv, "POST", "/api/submit", {"sample_id": "s0", "labels": GOOD["s0"]})
    assert status == 200, data
    recs = _records(target)
    assert len(recs) == 1
    assert recs[0]["sample_id"] == "s0" and recs[0]["annotator"] == "alice" and recs[0]["task"] == "fill"
    assert recs[0]["labels"] == GOOD["s0"] and recs[0]["time"]
    st = _state(srv)
    assert st["progress"]["done"] == 1 and st["sample"]["id"] == "s1"
    # A second submit of the same sample (double Enter) is refused, not written twice.
    status, _, data = _req(srv, "POST", "/api/submit", {"sample_id": "s0", "labels": GOOD["s0"]})
    assert status == 409 and "already labelled" in json.loads(data)["error"]
    assert len(_records(target)) == 1


BAD_SUBMISSIONS = [
    ({"sample_id": "s1", "labels": {"removal quality": {"best": 1, "worst": 1}}}, "same candidate"),
    ({"sample_id": "s1", "labels": {"removal quality": {"best": 0, "worst": 3}}}, "out of range"),
    ({"sample_id": "s1", "labels": {"removal quality": {"best": -1, "worst": 0}}}, "out of range"),
    ({"sample_id": "s1", "labels": {"removal quality": {"best": True, "worst": 0}}}, "integer"),
    ({"sample_id": "s1", "labels": {"removal quality": ND, "structure": ND}}, "not a dimension of task 'removal'"),
    ({"sample_id": "s0", "labels": {"text alignment": ND}}, "missing dimension(s) consistency"),
    ({"sample_id": "zzz", "labels": GOOD["s1"]}, "unknown sample id"),
    ({"sample_id": "s1", "labels": GOOD["s1"], "annotator": "mallory"}, "unexpected field(s) annotator"),
    ({"labels": GOOD["s1"]}, "sample_id: missing"),
    ({"sample_id": "s1", "labels": ["no difference"]}, "labels: expected dict"),
    (["s1"], "expected a JSON object"),
    ('{"sample_id": "s1", ', "malformed JSON"),
    ("\xff\xfe", "malformed JSON"),
    ("[" * 60000, "malformed JSON"),  # nesting deep enough to blow the decoder's recursion limit
]


@pytest.mark.parametrize("body, words", BAD_SUBMISSIONS)
def test_submit_validation(server, body, words):
    srv, target = server
    status, h, data = _req(srv, "POST", "/api/submit", body)
    assert status == 400 and h["Content-Type"].startswith("application/json")
    assert words in json.loads(data)["error"]
    assert not target.exists()


def test_submit_transport_checks(server):
    srv, target = server
    ok = json.dumps({"sample_id": "s1", "labels": GOOD["s1"]})
    # A plain-text POST (what a cross-site form can send) is refused.
    status, _, data = _req(srv, "POST", "/api/submit", ok, {"Content-Type": "text/plain"})
    assert status == 400 and "application/json" in json.loads(data)["error"]
    status, _, data = _req(srv, "POST", "/api/submit", ok, {"Origin": "http://evil.example"})
    assert status == 400 and "cross-origin" in json.loads(data)["error"]
    # A rebound DNS name (evil.example -> 127.0.0.1) gets nothing, not even the state.
    host, port = srv.server_address[:2]
    for method, body in (("GET", None), ("POST", ok)):
        status, _, data = _req(srv, method, "/api/state" if body is None else "/api/submit", body,
                               {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
        assert status == 403 and "Host" in json.loads(data)["error"]
    # Too large: refused from the header alone, the body is never read.
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/api/submit")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 400 and "limit" in json.loads(res.read())["error"]
    conn.close()
    assert not target.exists()
    # The same origin is fine.
    status, _, _ = _req(srv, "POST", "/api/submit", ok, {"Origin": f"http://{host}:{port}"})
    assert status == 200


def test_skip_moves_sample_to_the_end(server):
    srv, target = server
    assert _req(srv, "POST", "/api/skip", {"sample_id": "s0"})[0] == 200
    st = _state(srv)
    assert st["sample"]["id"] == "s1" and st["progress"]["skipped"] == 1
    assert _req(srv, "POST", "/api/skip", {"sample_id": "s1"})[0] == 200
    assert _state(srv)["sample"]["id"] == "s2"
    assert _req(srv, "POST", "/api/submit", {"sample_id": "s2", "labels": GOOD["s2"]})[0] == 200
    assert _state(srv)["sample"]["id"] == "s0"  # skipped ones come back, oldest skip first
    assert _req(srv, "POST", "/api/skip", {"sample_id": "nope"})[0] == 400
    assert [r["sample_id"] for r in _records(target)] == ["s2"]  # skips are not recorded


def test_shown_order_is_seeded_per_annotator_and_sample():
    """Guards: the order is a permutation, stable across restarts (same seed), and not the same for
    every annotator or every sample (so a position on screen is not tied to a candidate index)."""
    a = [annotate.shown_order(0, "alice", f"s{i}", 4) for i in range(8)]
    assert a == [annotate.shown_order(0, "alice", f"s{i}", 4) for i in range(8)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in a) and len({tuple(o) for o in a}) > 1
    assert a != [annotate.shown_order(0, "bob", f"s{i}", 4) for i in range(8)]
    assert a != [annotate.shown_order(1, "alice", f"s{i}", 4) for i in range(8)]


def test_page_picks_by_position_are_mapped_back_to_candidates(server):
    """Guards the mapping: the page sends shown positions with the order it showed; the record holds
    candidate indices (order[position]) and the order; another order is refused (stale page)."""
    srv, target = server
    s = _state(srv)["sample"]
    order = s["order"]
    shown = {"text alignment": {"best": 0, "worst": 2}, "consistency": ND, "structure": {"best": 1, "worst": 0},
             "aesthetics": ND}
    wrong = [order[1], order[0], order[2]]
    status, _, data = _req(srv, "POST", "/api/submit", {"sample_id": "s0", "order": wrong, "shown": shown})
    assert status == 409 and "reload" in json.loads(data)["error"]
    status, _, data = _req(srv, "POST", "/api/submit", {"sample_id": "s0", "order": order, "shown": shown,
                                                        "labels": GOOD["s0"]})
    assert status == 400 and "either labels" in json.loads(data)["error"]
    assert _req(srv, "POST", "/api/submit", {"sample_id": "s0", "order": order, "shown": shown})[0] == 200
    rec = _records(target)[0]
    assert rec["order"] == order
    assert rec["labels"] == {"text alignment": {"best": order[0], "worst": order[2]}, "consistency": ND,
                             "structure": {"best": order[1], "worst": order[0]}, "aesthetics": ND}


def test_more_than_nine_candidates(recipe, tmp_path):
    cdir = make_candidates(tmp_path / "many", n_fill=12)
    srv = annotate.make_server(recipe, cdir, cdir / "annotations.jsonl", annotator="alice", port=0)
    try:
        s = srv.state.state()["sample"]
        assert len(s["candidates"]) == 12 and sorted(s["order"]) == list(range(12))
        shown = {d: {"best": 11, "worst": 9} for d in recipe.tasks["fill"].dimensions}
        rec = srv.state.submit({"sample_id": "s0", "order": s["order"], "shown": shown})
        assert rec["labels"]["structure"] == {"best": s["order"][11], "worst": s["order"][9]}
    finally:
        srv.server_close()


def test_undo_appends_a_retraction_and_shows_the_sample_again(server, recipe, cdir, tmp_path):
    """Guards: undo never rewrites the file (earlier bytes unchanged, one line appended), withdraws only
    the last submitted sample, puts it back on screen, and export-pairs no longer uses the withdrawn label."""
    from onereward_cli import pairs

    srv, target = server
    for sid in ("s0", "s1"):
        assert _req(srv, "POST", "/api/submit", {"sample_id": sid, "labels": GOOD[sid]})[0] == 200
    before = target.read_bytes()
    assert _state(srv)["last"] == "s1"
    status, _, data = _req(srv, "POST", "/api/undo", {"sample_id": "s0"})  # not the last one: refused
    assert status == 409 and "'s1'" in json.loads(data)["error"]
    assert _req(srv, "POST", "/api/undo", {"sample_id": "s1"})[0] == 200
    after = target.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    assert _records(target)[-1] | {"time": ""} == {"sample_id": "s1", "annotator": "alice", "task": "removal",
                                                   "retract": True, "time": ""}
    st = _state(srv)
    assert st["sample"]["id"] == "s1" and st["progress"]["done"] == 1 and st["last"] == "s0"
    pairs.run(recipe, target, tmp_path / "data", test_fraction=0.0)
    assert {p["sample_id"] for p in _records(tmp_path / "data" / "pairs" / "train.jsonl")} == {"s0"}
    relabel = {"removal quality": {"best": 2, "worst": 0}}
    assert _req(srv, "POST", "/api/submit", {"sample_id": "s1", "labels": relabel})[0] == 200
    pairs.run(recipe, target, tmp_path / "data2", test_fraction=0.0)
    got = [p for p in _records(tmp_path / "data2" / "pairs" / "train.jsonl") if p["sample_id"] == "s1"]
    assert [(Path(p["winner"]).name, Path(p["loser"]).name) for p in got] == [("cand_2.png", "cand_0.png")]


def test_skips_are_remembered_across_restarts(recipe, cdir):
    target = cdir / "annotations.jsonl"
    srv = annotate.make_server(recipe, cdir, target, annotator="alice", port=0)
    srv.state.skip({"sample_id": "s0"})
    srv.state.skip({"sample_id": "s1"})
    srv.server_close()
    srv = annotate.make_server(recipe, cdir, target, annotator="alice", port=0)
    try:
        st = srv.state.state()
        assert st["sample"]["id"] == "s2" and st["progress"]["skipped"] == 2
        srv.state.submit({"sample_id": "s2", "labels": GOOD["s2"]})
        assert srv.state.state()["sample"]["id"] == "s0"  # oldest skip first, as before the restart
    finally:
        srv.server_close()
    bob = annotate.make_server(recipe, cdir, target, annotator="bob", port=0)
    try:
        assert bob.state.state()["sample"]["id"] == "s0"  # skips are per annotator
    finally:
        bob.server_close()


def test_import_waits_for_the_page_and_loses_none_of_its_labels(server, recipe, cdir, tmp_path, monkeypatch):
    """Guards the lock between an import (read, merge, rename) and the page's appends: a label submitted
    while the import is between its read and its rename is kept, not overwritten."""
    srv, target = server
    assert _req(srv, "POST", "/api/submit", {"sample_id": "s0", "labels": GOOD["s0"]})[0] == 200
    src = tmp_path / "bob.jsonl"
    src.write_text(json.dumps({"sample_id": "s2", "annotator": "bob", "labels": GOOD["s2"]}) + "\n")
    inside, release = threading.Event(), threading.Event()
    real = annotate.write_jsonl

    def slow_write(path, records):
        inside.set()          # the import has read the file and is about to replace it
        release.wait(5)
        return real(path, records)

    monkeypatch.setattr(annotate, "write_jsonl", slow_write)
    t = threading.Thread(target=annotate.import_annotations, args=(recipe, cdir, src, target))
    t.start()
    assert inside.wait(10)
    result = {}
    page = threading.Thread(target=lambda: result.update(
        r=_req(srv, "POST", "/api/submit", {"sample_id": "s1", "labels": GOOD["s1"]})))
    page.start()
    time.sleep(0.3)           # the page's submit now waits for the lock (or, unlocked, lands and is lost)
    release.set()
    t.join(10)
    page.join(10)
    assert result["r"][0] == 200
    assert sorted((r["sample_id"], r["annotator"]) for r in _records(target)) == [
        ("s0", "alice"), ("s1", "alice"), ("s2", "bob")]


def test_corrupt_annotations_file_is_reported_not_fatal(server):
    srv, target = server
    target.write_text('garbage\n{"sample_id": "s0", "annotator": "alice", "labels": {}}\n')
    status, _, data = _req(srv, "GET", "/api/state")
    assert status == 500 and f"{target}:1: malformed JSON" in json.loads(data)["error"]
    target.write_text("")
    assert _state(srv)["sample"]["id"] == "s0"  # and the server kept running


def test_finished_state(server):
    srv, _ = server
    for sid in ("s0", "s1", "s2"):
        assert _req(srv, "POST", "/api/submit", {"sample_id": sid, "labels": GOOD[sid]})[0] == 200
    st = _state(srv)
    assert st["sample"] is None and st["progress"]["done"] == 3


@pytest.mark.parametrize("path", [
    "/files/../candidates.jsonl",
    "/files/images/../../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2E%2E%2Fsecret.txt",
    "/files/images/s0/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "/files/..%5csecret.txt",
    "/files//etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/images/s0/escape.png",
    "/static/../annotate.py",
    "/static/%2e%2e/annotate.py",
    "/static/%2e%2e%2f%2e%2e%2fsecret.txt",
])
def test_path_traversal_refused(server, cdir, path):
    srv, _ = server
    (cdir.parent / "secret.txt").write_text("TOP SECRET")
    (cdir / "images/s0/escape.png").symlink_to(cdir.parent / "secret.txt")
    status, _, body = _req(srv, "GET", path)
    assert status == 403, (path, status)
    assert b"TOP SECRET" not in body and b"def make_server" not in body and b"root:" not in body
    assert "error" in json.loads(body)


def test_only_referenced_images_are_served(server, cdir):
    srv, _ = server
    (cdir / "notes.txt").write_text("private")
    assert _req(srv, "GET", "/files/notes.txt")[0] == 404
    assert _req(srv, "GET", "/files/candidates.jsonl")[0] == 404
    assert _req(srv, "GET", "/files/images/s1/cand_2.png")[0] == 200


def test_make_server_errors(recipe, cdir, tmp_path):
    with pytest.raises(InputError, match="no candidates.jsonl"):
        annotate.make_server(recipe, tmp_path, tmp_path / "a.jsonl", port=0)
    with pytest.raises(InputError, match="annotator"):
        annotate.make_server(recipe, cdir, cdir / "a.jsonl", annotator=" ", port=0)
    bad = cdir / "a.jsonl"
    bad.write_text('{"sample_id": "s0", "labels": {}}\nnot json\n{"sample_id": "s1", "labels": {}}\n')
    with pytest.raises(InputError, match=r"a\.jsonl:2: malformed JSON"):
        annotate.make_server(recipe, cdir, bad, port=0)
    srv = annotate.make_server(recipe, cdir, cdir / "b.jsonl", port=0)
    try:
        with pytest.raises(InputError, match="cannot listen"):
            annotate.make_server(recipe, cdir, cdir / "b.jsonl", port=srv.server_address[1])
    finally:
        srv.server_close()


# ----------------------------------------------------------------------------------------------
# Kill -9 and restart: the real CLI in a subprocess
# ----------------------------------------------------------------------------------------------
def _start_cli(cdir, annotator):
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "onereward_cli.cli", "annotate", str(cdir), "--port", "0",
                             "--annotator", annotator], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=env, text=True)
    found: list[str] = []
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+)", line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not found and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not found:
        proc.kill()
        pytest.fail("server did not start: " + "".join(lines))
    return proc, found[0]


def _http(url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_kill_and_restart_resumes(cdir):
    target = cdir / "annotations.jsonl"
    proc, url = _start_cli(cdir, "alice")
    try:
        assert _http(url + "/api/submit", {"sample_id": "s0", "labels": GOOD["s0"]})[0] == 200
    finally:
        proc.kill()  # SIGKILL: no chance to flush anything
        proc.wait()
    # A write cut short by a crash leaves a torn tail; the restart must drop it, not build on it.
    with open(target, "ab") as f:
        f.write(b'{"sample_id": "s1", "annotator": "alice", "la')
    proc, url = _start_cli(cdir, "alice")
    try:
        status, st = _http(url + "/api/state")
        assert st["progress"]["done"] == 1 and st["sample"]["id"] == "s1"
        assert _http(url + "/api/submit", {"sample_id": "s1", "labels": GOOD["s1"]})[0] == 200
    finally:
        proc.kill()
        proc.wait()
    assert [(r["sample_id"], r["annotator"]) for r in _records(target)] == [("s0", "alice"), ("s1", "alice")]
    # Another annotator labels the same set from the start.
    srv = annotate.make_server(load_recipe("tiny"), cdir, target, annotator="bob", port=0)
    try:
        assert srv.state.state()["sample"]["id"] == "s0"
        assert srv.state.progress()["done"] == 0
    finally:
        srv.server_close()

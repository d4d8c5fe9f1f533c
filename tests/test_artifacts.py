"""Files stages exchange: JSONL with validation, atomic writes, safetensors, images, run.json."""
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli import artifacts as A
from onereward_cli.errors import InputError

SCHEMA = {"id": (str, True), "width": (int, True), "score": (float, False), "tags": (list, False)}


def leftovers(d):
    """Temp files an atomic write might leave behind."""
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# --- JSONL ----------------------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path):
    recs = [{"id": "a", "width": 3, "score": 0.5, "tags": ["x"]}, {"id": "b", "width": 4, "score": 1},
            {"id": "ü-ñ", "width": 5, "nested": {"k": [1, 2]}}]
    p = tmp_path / "sub" / "r.jsonl"
    A.write_jsonl(p, recs)
    back = A.read_jsonl(p, SCHEMA)
    assert [A.strip_meta(r) for r in back] == recs
    assert [r["_line"] for r in back] == [1, 2, 3]
    assert leftovers(p.parent) == []


def test_jsonl_numpy_and_paths_serialise(tmp_path):
    p = tmp_path / "r.jsonl"
    A.write_jsonl(p, [{"id": "a", "width": 2, "arr": np.arange(3), "path": tmp_path / "x.png", "t": (1, 2)}])
    rec = A.read_jsonl(p)[0]
    assert rec["arr"] == [0, 1, 2] and rec["path"] == str(tmp_path / "x.png") and rec["t"] == [1, 2]


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a", "width": 1}\n\n{"id": "b", "width": 2}\n')
    assert [r["_line"] for r in A.read_jsonl(p, SCHEMA)] == [1, 3]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a", "width": 1}\n{"id": "b", "width": 2}\n{"id": "c", "width": \n{"id": "d", "width": 4}\n')
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, SCHEMA)
    assert str(exc.value).startswith(f"{p}:3: ")
    assert "malformed JSON" in str(exc.value)
    assert exc.value.line == 3


def test_non_object_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a", "width": 1}\n[1, 2]\n')
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p)
    assert str(exc.value).startswith(f"{p}:2: ")


def test_schema_missing_field(tmp_path):
    p = tmp_path / "r.jsonl"
    A.write_jsonl(p, [{"id": "a", "width": 1}, {"id": "b"}])
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, SCHEMA)
    assert str(exc.value) == f"{p}:2: width: missing"
    assert exc.value.field == "width"


@pytest.mark.parametrize("bad, field", [
    ({"id": 3, "width": 1}, "id"),
    ({"id": "a", "width": "1"}, "width"),
    ({"id": "a", "width": True}, "width"),  # a bool is not an int here
    ({"id": "a", "width": 1.5}, "width"),
    ({"id": "a", "width": 1, "score": "high"}, "score"),
    ({"id": "a", "width": 1, "tags": "x"}, "tags"),
])
def test_schema_wrong_type_names_the_field(tmp_path, bad, field):
    p = tmp_path / "r.jsonl"
    A.write_jsonl(p, [bad])
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, SCHEMA)
    assert str(exc.value).startswith(f"{p}:1: {field}: expected")
    assert exc.value.field == field


def test_optional_field_may_be_null(tmp_path):
    p = tmp_path / "r.jsonl"
    A.write_jsonl(p, [{"id": "a", "width": 1, "score": None}])
    assert A.read_jsonl(p, SCHEMA)[0]["score"] is None


def test_check_callback_gets_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    A.write_jsonl(p, [{"id": "a", "width": 1}, {"id": "a", "width": 2}])
    seen = set()

    def unique(rec, line):
        if rec["id"] in seen:
            raise InputError(f"duplicate id {rec['id']!r}", path=p, line=line, field="id")
        seen.add(rec["id"])

    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, SCHEMA, check=unique)
    assert str(exc.value).startswith(f"{p}:2: id: duplicate")


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as exc:
        A.read_jsonl(tmp_path / "nope.jsonl")
    assert "not found" in str(exc.value)


def test_torn_tail_only_when_asked(tmp_path):
    p = tmp_path / "a.jsonl"
    A.append_jsonl(p, {"id": "a", "width": 1})
    A.append_jsonl(p, {"id": "b", "width": 2, "labels": {"x": 1}})
    with open(p, "ab") as f:  # a kill in the middle of an append: no newline, ends inside an object
        f.write(b'{"id": "c", "labels": {"x": 1}')
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p)
    assert f"{p}:3: " in str(exc.value)
    recs = A.read_jsonl(p, tolerate_torn_tail=True)
    assert [r["id"] for r in recs] == ["a", "b"]


def test_bad_line_in_the_middle_is_never_tolerated(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, tolerate_torn_tail=True)
    assert exc.value.line == 2


def test_complete_last_line_with_bad_json_is_not_a_torn_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "a"}\n{"id": }\n')  # it has its newline: written whole, so it is corrupt
    with pytest.raises(InputError) as exc:
        A.read_jsonl(p, tolerate_torn_tail=True)
    assert exc.value.line == 2


def test_append_after_a_torn_tail_keeps_the_file_readable(tmp_path):
    p = tmp_path / "a.jsonl"
    A.append_jsonl(p, {"id": "a"})
    with open(p, "ab") as f:
        f.write(b'{"id": "tor')
    A.append_jsonl(p, {"id": "b"})
    assert [r["id"] for r in A.read_jsonl(p)] == ["a", "b"]
    # a complete record written by hand without its newline is kept
    h = tmp_path / "h.jsonl"
    h.write_text('{"id": "x"}\n{"id": "y"}')
    A.append_jsonl(h, {"id": "z"})
    assert [r["id"] for r in A.read_jsonl(h)] == ["x", "y", "z"]
    # a file holding nothing but a torn line
    q = tmp_path / "b.jsonl"
    q.write_bytes(b'{"id": "x", "y"')
    A.append_jsonl(q, {"id": "c"})
    assert [r["id"] for r in A.read_jsonl(q)] == ["c"]


# --- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_failure_leaves_old_target_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    A.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with A.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "partial')
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_creates_no_target(tmp_path):
    target = tmp_path / "new" / "out.jsonl"

    def records():
        yield {"id": "a"}
        raise RuntimeError("generator died half way")

    with pytest.raises(RuntimeError):
        A.write_jsonl(target, records())
    assert not target.exists()
    assert not target.parent.exists() or leftovers(target.parent) == []


def test_atomic_write_on_keyboard_interrupt(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with A.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not target.exists() and leftovers(tmp_path) == []


def test_written_files_follow_the_umask(tmp_path):
    p = tmp_path / "r.json"
    A.write_json(p, {})
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode == 0o666 & ~A._UMASK


# --- tensors ------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    t = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "h": torch.randn(2).to(torch.bfloat16),
         "view": torch.randn(4, 4).t()}  # non-contiguous
    p = tmp_path / "t.safetensors"
    A.save_tensors(p, t, metadata={"step": "3"})
    back = A.load_tensors(p)
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"step": "3"}
    assert leftovers(tmp_path) == []


def test_load_tensors_rejects_a_pickle(tmp_path):
    p = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(2)}, p)
    with pytest.raises(InputError) as exc:
        A.load_tensors(p)
    assert str(p) in str(exc.value) and "safetensors" in str(exc.value)


def test_load_tensors_rejects_truncated_and_missing(tmp_path):
    p = tmp_path / "t.safetensors"
    A.save_tensors(p, {"w": torch.randn(64)})
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(InputError):
        A.load_tensors(p)
    with pytest.raises(InputError) as exc:
        A.load_tensors(tmp_path / "missing.safetensors")
    assert "not found" in str(exc.value)


# --- images -------------------------------------------------------------------------------------
def test_png_round_trip(tmp_path):
    arr = (np.random.RandomState(0).rand(12, 10, 3) * 255).astype(np.uint8)
    A.save_png(tmp_path / "a.png", arr)
    A.save_png(tmp_path / "m.png", Image.fromarray(np.full((12, 10), 255, np.uint8), "L"))
    assert np.array_equal(np.asarray(A.open_image(tmp_path / "a.png")), arr)
    assert A.open_image(tmp_path / "m.png", mode="L").mode == "L"
    assert leftovers(tmp_path) == []


def test_open_image_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError) as exc:
        A.open_image(tmp_path / "none.png", where="cands.jsonl", line=7, field="source")
    assert str(exc.value).startswith("cands.jsonl:7: source: image not found")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError) as exc:
        A.open_image(bad)
    assert "cannot decode" in str(exc.value)
    # a truncated PNG: the header reads, the pixels do not
    good = tmp_path / "good.png"
    A.save_png(good, (np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError):
        A.open_image(trunc)


# --- run.json -----------------------------------------------------------------------------------
def test_run_manifest(tmp_path):
    from onereward_cli.recipe import load_recipe

    r = load_recipe("tiny")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"a": 1}\n')
    man = A.RunManifest("synth", tmp_path / "out", r, inputs={"pool": inp, "missing": tmp_path / "x"})
    with man.timed("render"):
        pass
    with man.timed("render"):
        pass
    man.count(images=3, skipped=0)
    man.set(note="hello")
    path = man.write()
    assert path == tmp_path / "out" / "run.json"
    d = json.loads(path.read_text())
    assert d["stage"] == "synth" and d["seed"] == r.seed and d["note"] == "hello"
    assert d["recipe"] == r.to_dict() and d["recipe_source"].endswith("tiny.yaml")
    for pkg in ("python", "torch", "diffusers", "transformers"):
        assert pkg in d["versions"]
    assert d["counts"] == {"images": 3, "skipped": 0}
    assert set(d["timings_s"]) == {"render", "total"}
    assert d["timings_s"]["total"] >= d["timings_s"]["render"] >= 0
    assert d["inputs"]["pool"]["bytes"] == inp.stat().st_size and len(d["inputs"]["pool"]["sha256"]) == 64
    assert d["inputs"]["missing"]["exists"] is False
    assert "started" in d and "finished" in d and "command" in d


def test_torn_tail_repair_beyond_one_read_chunk(tmp_path):
    p = tmp_path / "big.jsonl"
    A.write_jsonl(p, [{"id": str(i), "pad": "x" * 100} for i in range(1000)])  # ~120 KB
    with open(p, "ab") as f:
        f.write(b'{"id": "torn", "pad": "' + b"y" * 70000)  # a torn line longer than one chunk
    A.append_jsonl(p, {"id": "last"})
    ids = [r["id"] for r in A.read_jsonl(p)]
    assert len(ids) == 1001 and ids[-1] == "last" and "torn" not in ids

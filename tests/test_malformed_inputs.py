"""Every stage, fed malformed input through the real CLI: exit code 2, one `error: <file>[:line]: <field>:`
line (no traceback), and the --out folder absent or unchanged. Each case fails at validation, before
any model is loaded, so the whole table runs in seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onereward_cli import cli

NON_UTF8 = b'{"id": "a", "prompt": "caf\xe9"}\n'
FILL_DIMS = ("text alignment", "consistency", "structure")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def png(path: Path, size=(32, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def mask(path: Path, size=(32, 32)) -> Path:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[8:20, 8:20] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)
    return path


def truncated(path: Path) -> Path:
    png(path)
    path.write_bytes(path.read_bytes()[:60])
    return path


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def triplets(d: Path, **change) -> Path:
    """A one-line triplet JSONL (fill) with its images; `change` edits the record."""
    png(d / "src.png")
    mask(d / "m.png")
    rec = {"id": "t0", "source": "src.png", "mask": "m.png", "prompt": "a red circle", "task": "fill"}
    rec.update(change)
    return jsonl(d / "triplets.jsonl", [rec])


def candidates_dir(d: Path, entries=None) -> Path:
    """A `generate`-style folder: one fill sample with two candidates."""
    for name in ("source", "cand_0", "cand_1"):
        png(d / "images" / "s0" / f"{name}.png")
    mask(d / "images" / "s0" / "mask.png")
    cands = entries if entries is not None else [
        {"index": k, "path": f"images/s0/cand_{k}.png", "seed": k,
         "params": {"steps": 2, "guidance": 1.0, "true_cfg": 1.0, "shift": 0.5, "negative_prompt": ""}}
        for k in range(2)]
    jsonl(d / "candidates.jsonl", [{"id": "s0", "task": "fill", "prompt": "a red circle", "user_prompt": "a red circle",
                                    "source": "images/s0/source.png", "mask": "images/s0/mask.png", "width": 32,
                                    "height": 32, "candidates": cands}])
    return d


def pairs_dir(d: Path, **change) -> Path:
    png(d / "img" / "w.png")
    png(d / "img" / "l.png")
    rec = {"sample_id": "s0", "task": "fill", "dimension": "aesthetics", "prompt": "a red circle",
           "winner": "img/w.png", "loser": "img/l.png", "source": "", "mask": "", "annotator": "t"}
    rec.update(change)
    return jsonl(d / "train.jsonl", [rec]).parent


def label(**labels):
    return {"sample_id": "s0", "annotator": "a", "task": "fill", "labels": labels or
            {"aesthetics": {"best": 0, "worst": 1}}}


# ----------------------------------------------------------------------------------------------
# The table: id -> builder(tmp) returning (argv, out, [strings the error line must name])
# ----------------------------------------------------------------------------------------------
def _file(t: Path) -> Path:
    (t / "afile").write_text("x")
    return t / "afile"


def _dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


CASES = {
    # tiny-models
    "tiny-models: OUT is a file": lambda t: (["tiny-models", str(_file(t))], _file(t), ["afile", "OUT"]),
    "tiny-models: a file above OUT": lambda t: (["tiny-models", "--random", str(_file(t) / "zoo")], t / "afile",
                                                ["afile", "OUT"]),
    "tiny-models: --seed not a number": lambda t: (["tiny-models", "--random", str(t / "z"), "--seed", "x"],
                                                   t / "z", ["--seed"]),
    # recipe values (--set, recipe files), checked by every stage before it reads anything
    "recipe: rl.lr=.inf": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set", "rl.lr=.inf"],
                                     t / "o", ["--set rl.lr", "finite"]),
    "recipe: rl.lr=.nan": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set", "rl.lr=.nan"],
                                     t / "o", ["--set rl.lr", "finite"]),
    "recipe: rl.lr=0": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set", "rl.lr=0"],
                                  t / "o", ["--set rl.lr", "positive"]),
    "recipe: rl.lora_rank=0": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set", "rl.lora_rank=0"],
                                         t / "o", ["--set rl.lora_rank"]),
    "recipe: reward.lora_rank=0": lambda t: (["train-reward", str(t / "in"), "--out", str(t / "o"), "--set",
                                              "reward.lora_rank=0"], t / "o", ["--set reward.lora_rank"]),
    "recipe: rl.max_nonfinite=0": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set",
                                              "rl.max_nonfinite=0"], t / "o", ["--set rl.max_nonfinite"]),
    "recipe: eval.guidance=-.inf": lambda t: (["eval", "-b", str(t / "in"), "--out", str(t / "o"), "--set",
                                               "eval.guidance=-.inf"], t / "o", ["--set eval.guidance"]),
    "recipe: rl.steps=abc": lambda t: (["rl", str(t / "in"), "--out", str(t / "o"), "--set", "rl.steps=abc"],
                                       t / "o", ["--set rl.steps", "integer"]),
    "recipe: seed=-1": lambda t: (["synth", str(t / "o"), "--set", "seed=-1"], t / "o", ["--set seed"]),
    "recipe: file is not UTF-8": lambda t: (
        ["synth", str(t / "o"), "-r", str(_bytes(t / "r.yaml", b"seed: \xff\xfe\n"))], t / "o", ["r.yaml"]),
    "recipe: invalid YAML": lambda t: (
        ["synth", str(t / "o"), "-r", str(_bytes(t / "r.yaml", b"seed: 1\nrl: [\n"))], t / "o", ["r.yaml"]),
    "recipe: a folder": lambda t: (["synth", str(t / "o"), "-r", str(_dir(t / "r.yaml"))], t / "o", ["r.yaml"]),
    # usage errors are one line too
    "usage: curate --select abc": lambda t: (["curate", str(t), "--out", str(t / "o"), "--select", "abc"],
                                             t / "o", ["--select"]),
    "usage: missing argument": lambda t: (["curate", "--out", str(t / "o")], t / "o", ["curate", "Missing"]),
    "usage: unknown option": lambda t: (["synth", str(t / "o"), "--bogus"], t / "o", ["--bogus"]),
    # curate
    "curate: --select 0": lambda t: (["curate", str(_pool(t)), "--out", str(t / "o"), "--select", "0"],
                                     t / "o", ["--select"]),
    "curate: manifest not UTF-8": lambda t: (["curate", str(_bytes(t / "m.jsonl", NON_UTF8)), "--out",
                                              str(t / "o")], t / "o", ["m.jsonl:1"]),
    "curate: manifest path not a string": lambda t: (["curate", str(jsonl(t / "m.jsonl", [{"path": 5}])), "--out",
                                                      str(t / "o")], t / "o", ["m.jsonl:1", "path"]),
    "curate: empty pool folder": lambda t: (["curate", str(_dir(t / "pool")), "--out", str(t / "o")], t / "o",
                                            ["pool", "empty pool"]),
    "curate: --out is a file": lambda t: (["curate", str(_pool(t)), "--out", str(_file(t))], _file(t),
                                          ["afile", "--out"]),
    # generate
    "generate: truncated source": lambda t: (_gen(t, source=str(truncated(t / "bad.png"))), t / "o",
                                             ["triplets.jsonl:1", "source"]),
    "generate: source is a folder": lambda t: (_gen(t, source=str(_dir(t / "dir.png"))), t / "o",
                                               ["triplets.jsonl:1", "source"]),
    "generate: mask of another size": lambda t: (_gen(t, mask=str(mask(t / "m2.png", (16, 24)))), t / "o",
                                                 ["triplets.jsonl:1", "mask"]),
    "generate: mask not an image": lambda t: (_gen(t, mask=str(_bytes(t / "m3.png", b"not a png"))), t / "o",
                                              ["triplets.jsonl:1", "mask"]),
    "generate: prompt is a number": lambda t: (_gen(t, prompt=5), t / "o", ["triplets.jsonl:1", "prompt"]),
    "generate: unknown task": lambda t: (_gen(t, task="paint"), t / "o", ["triplets.jsonl:1", "task"]),
    "generate: input not UTF-8": lambda t: (["generate", str(_bytes(t / "x.jsonl", NON_UTF8)), "--out",
                                             str(t / "o")], t / "o", ["x.jsonl:1"]),
    "generate: a line is not an object": lambda t: (["generate", str(jsonl(t / "x.jsonl", ["[1, 2]"])), "--out",
                                                     str(t / "o")], t / "o", ["x.jsonl:1"]),
    "generate: --limit -1": lambda t: (_gen(t) + ["--limit", "-1"], t / "o", ["--limit"]),
    "generate: --candidates 1": lambda t: (_gen(t) + ["--candidates", "1"], t / "o", ["--candidates"]),
    # annotate --import
    "annotate: import not UTF-8": lambda t: (_ann(t, _bytes(t / "labels.jsonl", NON_UTF8)), None,
                                             ["labels.jsonl:1"]),
    "annotate: import labels of the wrong type": lambda t: (
        _ann(t, jsonl(t / "labels.jsonl", [{"sample_id": "s0", "labels": "best"}])), None,
        ["labels.jsonl:1", "labels"]),
    "annotate: import is a folder": lambda t: (_ann(t, _dir(t / "labels.jsonl")), None, ["labels.jsonl"]),
    "annotate: import index out of range": lambda t: (
        _ann(t, jsonl(t / "labels.jsonl", [label(**{d: {"best": 0, "worst": 1} for d in FILL_DIMS},
                                                 aesthetics={"best": 0, "worst": 7})])), None,
        ["labels.jsonl:1", "labels.aesthetics.worst"]),
    "annotate: candidate path escapes the folder": lambda t: (
        _ann(t, jsonl(t / "labels.jsonl", [label()]), entries=[{"index": 0, "path": "../../x.png"},
                                                               {"index": 1, "path": "images/s0/cand_1.png"}]),
        None, ["candidates.jsonl:1", "candidates[0].path"]),
    "annotate: --port out of range": lambda t: (["annotate", str(candidates_dir(t / "cands")), "--port", "70000"],
                                                None, ["--port"]),
    # export-pairs
    "export-pairs: candidates are strings": lambda t: (
        _pairs(t, [label()], entries=["images/s0/cand_0.png", "images/s0/cand_1.png"]), t / "o",
        ["candidates.jsonl:1", "candidates[0]"]),
    "export-pairs: candidate path escapes": lambda t: (
        _pairs(t, [label()], entries=[{"index": 0, "path": "/etc/passwd"},
                                      {"index": 1, "path": "images/s0/cand_1.png"}]),
        t / "o", ["candidates.jsonl:1", "candidates[0].path"]),
    "export-pairs: empty annotations": lambda t: (_pairs(t, []), t / "o", ["annotations.jsonl", "no labels"]),
    "export-pairs: only 'no difference'": lambda t: (_pairs(t, [label(aesthetics="no difference")]), t / "o",
                                                     ["annotations.jsonl", "labels", "no pairs"]),
    "export-pairs: annotations not UTF-8": lambda t: (_pairs(t, None, raw=NON_UTF8), t / "o",
                                                      ["annotations.jsonl:1"]),
    "export-pairs: labels of the wrong type": lambda t: (_pairs(t, [{**label(), "labels": [1]}]), t / "o",
                                                         ["annotations.jsonl:1", "labels"]),
    "export-pairs: --test-fraction 1": lambda t: (_pairs(t, [label()]) + ["--test-fraction", "1"], t / "o",
                                                  ["--test-fraction"]),
    # train-reward
    "train-reward: empty train.jsonl": lambda t: (_tr(_empty_pairs(t)), t / "o", ["train.jsonl", "no training"]),
    "train-reward: train.jsonl not UTF-8": lambda t: (_tr(_bytes(t / "p" / "train.jsonl", NON_UTF8).parent), t / "o",
                                                      ["train.jsonl:1"]),
    "train-reward: truncated winner": lambda t: (_tr(_truncated_winner(t)), t / "o", ["train.jsonl:1", "winner"]),
    "train-reward: winner is a number": lambda t: (_tr(pairs_dir(t / "p", winner=3)), t / "o",
                                                   ["train.jsonl:1", "winner"]),
    "train-reward: prompt is a list": lambda t: (_tr(pairs_dir(t / "p", prompt=["a"])), t / "o",
                                                 ["train.jsonl:1", "prompt"]),
    "train-reward: winner is a folder": lambda t: (_tr(pairs_dir(t / "p", winner=str(_dir(t / "d")))),
                                                                     t / "o", ["train.jsonl:1", "winner"]),
    "train-reward: unknown dimension": lambda t: (_tr(pairs_dir(t / "p", dimension="taste")), t / "o",
                                                  ["train.jsonl:1", "dimension"]),
    "train-reward: no train.jsonl": lambda t: (_tr(_dir(t / "p")), t / "o", ["train.jsonl"]),
    "train-reward: train.jsonl is a folder": lambda t: (_tr(_dir(t / "p" / "train.jsonl").parent), t / "o",
                                                        ["train.jsonl"]),
    # rl
    "rl: mask of another size": lambda t: (_rl(t, triplets(t / "c", mask=str(mask(t / "m2.png", (16, 24))))), t / "o",
                                           ["triplets.jsonl:1", "mask"]),
    "rl: truncated source": lambda t: (_rl(t, triplets(t / "c", source=str(truncated(t / "bad.png")))), t / "o",
                                       ["triplets.jsonl:1", "source"]),
    "rl: prompt is a number": lambda t: (_rl(t, triplets(t / "c", prompt=7)), t / "o", ["triplets.jsonl:1", "prompt"]),
    "rl: data folder without conditions": lambda t: (_rl(t, _dir(t / "c")), t / "o", ["c", "candidates.jsonl"]),
    "rl: empty conditions": lambda t: (_rl(t, _bytes(t / "c.jsonl", b"")), t / "o", ["c.jsonl", "no conditions"]),
    "rl: --resume without a checkpoint": lambda t: (_rl(t, triplets(t / "c")) + ["--resume", "--out", str(_dir(t / "o"))],
                                                    t / "o",
                                                    ["o", "no checkpoint"]),
    # eval
    "eval: benchmark not UTF-8": lambda t: (_ev(t, _bytes(t / "b.jsonl", NON_UTF8)), t / "o", ["b.jsonl:1"]),
    "eval: benchmark prompt is a number": lambda t: (_ev(t, triplets(t / "b", prompt=7)), t / "o",
                                                     ["triplets.jsonl:1", "prompt"]),
    "eval: benchmark mask of another size": lambda t: (
        _ev(t, triplets(t / "b", mask=str(mask(t / "m2.png", (16, 24))))), t / "o", ["triplets.jsonl:1", "mask"]),
    "eval: policy is not a policy": lambda t: (_ev(t, triplets(t / "b"), "--policy", str(_dir(t / "notpol"))),
                                               t / "o", ["notpol", "not a FluxFillPipeline"]),
    "eval: policy with a broken model_index.json": lambda t: (
        _ev(t, triplets(t / "b"), "--policy", str(_bytes(t / "pol" / "model_index.json", b"{").parent)), t / "o",
        ["model_index.json", "JSON"]),
    "eval: rl policy file not UTF-8": lambda t: (
        _ev(t, triplets(t / "b"), "--policy", str(_bytes(t / "pol" / "onereward_policy.json", b"\xff\xfe").parent)),
        t / "o", ["onereward_policy.json"]),
    "eval: transformer config.json not UTF-8": lambda t: (
        _ev(t, triplets(t / "b"), "--policy", str(_bytes(t / "pol" / "config.json", b"\xff{").parent)), t / "o",
        ["pol", "not a FluxFillPipeline"]),
    "eval: policy missing its components": lambda t: (
        _ev(t, triplets(t / "b"), "--policy", str(_bytes(t / "pol" / "model_index.json", b"{}").parent)), t / "o",
        ["model_index.json", "transformer"]),
    "eval: unreadable LoRA": lambda t: (
        _ev(t, triplets(t / "b"), "--policy", str(_bytes(t / "pol" / "pytorch_lora_weights.safetensors",
                                                          b"junk").parent)), t / "o",
        ["pytorch_lora_weights.safetensors", "safetensors"]),
    "eval: empty reward-model folder": lambda t: (
        _ev(t, triplets(t / "b"), "--compare", "zoo-random:flux-fill", "--reward-model", str(_dir(t / "rm"))),
        t / "o", ["rm", "--reward-model", "empty"]),
    "eval: empty metric folder": lambda t: (
        _ev(t, triplets(t / "b"), "--set", f"eval.metrics.pickscore={_dir(t / 'ps')}"), t / "o",
        ["ps", "eval.metrics.pickscore", "empty"]),
    "eval: --human not UTF-8": lambda t: (
        _ev(t, triplets(t / "b"), "--human", str(_bytes(t / "h.csv", b"sample,model,dimension,value\n\xff,a,b,1\n"))),
        t / "o", ["h.csv:2", "not UTF-8"]),
    "eval: --human with a NUL byte": lambda t: (
        _ev(t, triplets(t / "b"), "--human", str(_bytes(t / "h.csv", b"sample,model,dimension,value\nt0,a\x00,b,1\n"))),
        t / "o", ["h.csv:2"]),
    "eval: --human missing a column": lambda t: (
        _ev(t, triplets(t / "b"), "--human", str(_bytes(t / "h.csv", b"sample,model,value\nt0,a,1\n"))),
        t / "o", ["h.csv"]),
    "eval: --human is a folder": lambda t: (_ev(t, triplets(t / "b"), "--human", str(_dir(t / "h.jsonl"))),
                                            t / "o", ["h.jsonl"]),
    "synth: --n 0": lambda t: (["synth", str(t / "o"), "--n", "0"], t / "o", ["--n"]),
    "eval: --out is a file": lambda t: (_ev(t, triplets(t / "b"))[:-2] + ["--out", str(_file(t))], _file(t),
                                        ["afile", "--out"]),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pool(t: Path) -> Path:
    png(t / "pool" / "a.png")
    return t / "pool"


def _gen(t: Path, **change) -> list[str]:
    return ["generate", str(triplets(t / "in", **change)), "--out", str(t / "o")]


def _ann(t: Path, import_file: Path, entries=None) -> list[str]:
    d = candidates_dir(t / "cands", entries)
    return ["annotate", str(d), "--import", str(import_file), "--annotator", "a"]


def _pairs(t: Path, rows, entries=None, raw: bytes | None = None) -> list[str]:
    d = candidates_dir(t / "cands", entries)
    if raw is not None:
        _bytes(d / "annotations.jsonl", raw)
    else:
        jsonl(d / "annotations.jsonl", rows)
    return ["export-pairs", str(d / "annotations.jsonl"), "--out", str(t / "o")]


def _empty_pairs(t: Path) -> Path:
    _bytes(t / "p" / "train.jsonl", b"")
    return t / "p"


def _truncated_winner(t: Path) -> Path:
    d = pairs_dir(t / "p")
    truncated(d / "img" / "w.png")
    return d


def _tr(d: Path) -> list[str]:
    return ["train-reward", str(d), "--out", str(d.parent / "o")]


def _rl(t: Path, conds: Path) -> list[str]:
    return ["rl", str(conds), "--out", str(t / "o")]


def _ev(t: Path, bench: Path, *extra) -> list[str]:
    argv = ["eval", "--benchmark", str(bench), *extra]
    if "--policy" not in extra:
        argv += ["--policy", "zoo:flux-fill"]
    return argv + ["--out", str(t / "o")]


def _snapshot(p: Path | None):
    if p is None or not p.exists():
        return None
    if p.is_file():
        return p.read_bytes()
    return {str(f.relative_to(p)): (f.read_bytes() if f.is_file() else None) for f in sorted(p.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_one_error_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch, zoo):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    argv, out, names = CASES[case](tmp_path)
    if case.startswith("annotate"):  # annotate writes one file: CANDIDATES_DIR/annotations.jsonl
        out = tmp_path / "cands" / "annotations.jsonl"
    before = _snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    got = capsys.readouterr()
    lines = [x for x in (got.out + got.err).splitlines() if x.strip()]
    assert e.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert _snapshot(out) == before, "the output changed"


def test_odd_image_modes_are_accepted_not_errors(tmp_path, zoo):
    """The other side of the table: CMYK, palette, 16-bit, 1-bit and grey+alpha images (and masks) are
    converted, not rejected, and a 1x1 source is scaled up."""
    from onereward_cli import generate as G
    from onereward_cli.recipe import load_recipe

    rng = np.random.default_rng(0)
    a = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 8:20] = 255
    Image.fromarray(a).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    Image.fromarray((rng.random((32, 32)) * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(a).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(a[:1, :1]).save(tmp_path / "tiny.png")
    Image.fromarray(m.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    Image.fromarray(m).convert("1").save(tmp_path / "m1.png")
    Image.fromarray(m).save(tmp_path / "m.png")
    rows = [("cmyk.jpg", "m16.png"), ("p.png", "m1.png"), ("i16.png", "m.png"), ("la.png", "m.png"),
            ("tiny.png", None)]
    f = jsonl(tmp_path / "odd.jsonl", [{"id": f"t{i}", "source": s, "prompt": "a cat", "task": "fill",
                                       **({"mask": k} if k else {})} for i, (s, k) in enumerate(rows)])
    r = load_recipe("tiny")
    samples = G.plan(r, f, 2)
    assert len(samples) == len(rows)
    for s in samples:
        src, msk = G.build_condition(r, s)
        assert src.mode == "RGB" and msk.shape == (src.size[1], src.size[0]) and msk.max() == 255

"""`onereward eval` end to end on the tiny zoo (CLI, two policies, metrics, GSB, Table 3, report), the
benchmark readers and their errors, and the report writer."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli.errors import InputError

TASKS = ("fill", "extend", "extend_no_prompt", "removal")


def _cli(argv) -> int:
    from onereward_cli.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _write_bench(synth_pool: Path, d: Path) -> Path:
    """Four triplets (one per task) from the synthetic pool; paths relative to the JSONL."""
    from onereward_cli.tasks import extend_canvas, removal_mask

    d.mkdir(parents=True, exist_ok=True)
    recs = [json.loads(x) for x in (synth_pool / "manifest.jsonl").read_text().splitlines() if x.strip()]
    rows = []
    for i, (rec, task) in enumerate(zip(recs, TASKS)):
        src = Image.open(synth_pool / rec["path"]).convert("RGB")
        prompt = {"fill": "a red circle", "extend": "a blue star"}.get(task)
        if task == "fill":
            m = np.zeros((src.height, src.width), np.uint8)
            m[16:40, 20:48] = 255
        elif task.startswith("extend"):
            src, mm = extend_canvas(src, 1.5, "right")
            m = np.asarray(mm)
        else:
            m = removal_mask(src.size, boxes=[rec["objects"][0]["box"]], dilate=2)
        src.save(d / f"{i}_src.png")
        Image.fromarray(m).save(d / f"{i}_mask.png")
        row = {"id": f"s{i}", "source": f"{i}_src.png", "mask": f"{i}_mask.png", "task": task}
        if prompt:
            row["prompt"] = prompt
        rows.append(row)
    (d / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "bench.jsonl"


@pytest.fixture(scope="module")
def bench(synth_pool, tmp_path_factory):
    return _write_bench(synth_pool, tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def trained_policy(zoo, tmp_path_factory):
    """An `rl`-style full-transformer policy folder: the zoo transformer with perturbed weights, trained
    (so it says) at 3 steps and guidance 12: eval runs it that way, the base at the recipe's 4 and 30."""
    from diffusers import FluxTransformer2DModel

    d = tmp_path_factory.mktemp("run") / "policy"
    tr = FluxTransformer2DModel.from_pretrained(Path(zoo) / "flux-fill", subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tr.save_pretrained(d)
    (d / "onereward_policy.json").write_text(json.dumps({"base": "zoo:flux-fill", "kind": "transformer",
                                                         "inference": {"steps": 3, "guidance": 12.0}}))
    return d


def test_policy_labels():
    from onereward_cli.evaluate import make_policies, policy_label

    assert policy_label("zoo:flux-fill") == "zoo-flux-fill"
    assert policy_label("runs/static/policy") == "static-policy"
    assert policy_label("black-forest-labs/FLUX.1-Fill-dev") == "FLUX.1-Fill-dev"
    assert [p.label for p in make_policies(["zoo:flux-fill", "zoo:flux-fill"])] == ["zoo-flux-fill", "zoo-flux-fill-2"]


def test_eval_cli_two_policies_end_to_end(zoo, bench, trained_policy, tmp_path, capsys):
    out = tmp_path / "eval"
    p_label = f"{trained_policy.parent.name}-policy"
    human = tmp_path / "ratings.csv"
    human.write_text("sample,model,dimension,value\n"
                     f"s0,{p_label},usability,yes\ns0,zoo:flux-fill,usability,no\n"
                     f"s0,{p_label},aesthetics,4\ns0,zoo:flux-fill,aesthetics,4\n"
                     f"s3,{p_label},removal quality,1\ns3,zoo:flux-fill,removal quality,0\n"
                     "s3,Photoshop,removal quality,1\n")
    # A checkpoint that exists but fails to load is recorded; the other metrics go on (an absent or empty
    # one is a bad input: tests/test_malformed_inputs.py).
    broken = tmp_path / "no-such-imagereward"
    broken.mkdir()
    (broken / "ImageReward.pt").write_bytes(b"not a checkpoint")
    argv = ["eval", "--policy", str(trained_policy), "--compare", "zoo:flux-fill", "--benchmark", str(bench),
            "--out", str(out), "--human", str(human),
            "--set", f"eval.metrics.hpsv2={Path(zoo) / 'open-clip'}",
            "--set", f"eval.metrics.imagereward={broken}"]
    assert _cli(argv) == 0, capsys.readouterr().err
    err = " ".join(capsys.readouterr().err.split())
    assert "metric imagereward failed" in err and "no-such-imagereward" in err

    # Edits: same seed per sample for both policies, one PNG per (policy, sample).
    edits = [json.loads(x) for x in (out / "edits.jsonl").read_text().splitlines()]
    assert len(edits) == 8
    seeds = {(e["policy"], e["id"]): e["seed"] for e in edits}
    for i in range(4):
        assert seeds[(p_label, f"s{i}")] == seeds[("zoo-flux-fill", f"s{i}")] == 1234 + i
        assert (out / "images" / p_label / f"s{i}.png").is_file()
    # Each policy ran with its own settings: P with those in its onereward_policy.json, the base with eval.*.
    params = {e["policy"]: e["params"] for e in edits}
    assert (params[p_label]["steps"], params[p_label]["guidance"]) == (3, 12.0)
    assert (params["zoo-flux-fill"]["steps"], params["zoo-flux-fill"]["guidance"]) == (4, 30.0)
    a = np.asarray(Image.open(out / "images" / p_label / "s0.png"))
    b = np.asarray(Image.open(out / "images" / "zoo-flux-fill" / "s0.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)  # the perturbed policy edits differently

    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["oracle"]["status"] == "ok" and m["metrics"]["hpsv2"]["status"] == "ok"
    assert m["metrics"]["imagereward"]["status"] == "error" and "no-such-imagereward" in m["metrics"]["imagereward"]["note"]
    assert m["metrics"]["pickscore"]["status"] == "skipped"
    for pol in (p_label, "zoo-flux-fill"):
        assert m["summary"]["fill"][pol]["hpsv2"]["n"] == 1
        assert "hpsv2" not in m["summary"]["removal"][pol]  # text-image metrics skip removal
        assert 0.0 <= m["summary"]["removal"][pol]["oracle:removal quality"]["mean"] <= 1.0
    comps = m["gsb"]["comparisons"]
    reward_comp, human_comp = f"{p_label} vs zoo-flux-fill (reward)", f"{p_label} vs zoo-flux-fill (human)"
    assert set(comps) == {reward_comp, human_comp}
    assert comps[reward_comp]["fill"]["all"]["n"] == 4  # four dimensions of the fill sample
    assert sum(comps[reward_comp][t]["all"]["n"] for t in TASKS) == 4 + 4 + 3 + 1
    judged = [j for j in m["gsb"]["judgements"] if j["comparison"] == reward_comp]
    assert all(0.0 <= j["p_pq"] <= 1.0 and 0.0 <= j["p_qp"] <= 1.0 for j in judged)
    assert comps[human_comp]["fill"]["usability"]["good"] == 1 and comps[human_comp]["fill"]["aesthetics"]["same"] == 1
    assert comps[human_comp]["removal"]["all"]["good"] == 1
    t3 = m["human"]["table3"]
    assert t3["fill"][p_label]["usability"]["value"] == 100.0 and t3["fill"]["zoo-flux-fill"]["usability"]["value"] == 0.0
    assert t3["removal"]["Photoshop"]["removal quality"]["value"] == 100.0

    md = (out / "report.md").read_text()
    assert f"| {p_label} | {trained_policy} | P | 3 | 12 | 1 | – | 64² | own (onereward_policy.json); recipe eval.*: " \
           "true_cfg, negative_prompt, resolution |" in md
    for heading in ("## Setup", "## Automatic metrics", "## Good-Same-Bad (Fig. 7)", "## Human evaluation (Table 3)",
                    "## Edits"):
        assert heading in md
    assert "Image Fill · HPSv2" in md and "Object Removal · Oracle (mean)" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + 4 * (2 + 2)  # two plots + 4 grids x (source, mask, P, Q)
    assert not re.search(r'src="(?!data:)', page)  # self-contained
    assert "Usability Rate(%)" in page and "Removal Quality(%)" in page
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "eval" and run["counts"]["edits_generated"] == 8
    assert (out / "gsb.png").is_file() and (out / "metrics.png").is_file()

    # A re-run reuses every edit whose policy files, seed and parameters are unchanged (the metric and
    # GSB settings are not generation parameters); the oracle gives the same numbers on them.
    assert _cli(argv[:-4] + ["--set", "eval.gsb=false"]) == 0
    run2 = json.loads((out / "run.json").read_text())
    assert run2["counts"]["edits_generated"] == 0 and run2["counts"]["edits_reused"] == 8
    assert run2["counts"]["scores_reused"] > 0  # metric scores of unchanged edits come from scores.jsonl
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["summary"]["fill"][p_label]["oracle"] == m["summary"]["fill"][p_label]["oracle"]
    assert m2["gsb"]["note"] == "disabled (eval.gsb=false)" and set(m2["gsb"]["comparisons"]) == {human_comp}


def _live_images() -> int:
    import gc

    return sum(1 for o in gc.get_objects() if isinstance(o, Image.Image))


def test_eval_keeps_edits_on_disk_and_resumes_after_a_kill(zoo, bench, trained_policy, tmp_path, monkeypatch):
    """Guards: a run killed mid-generation keeps the edits it wrote and the next run generates only the
    rest, giving the same edits as an uninterrupted run; while metrics score, no more than a batch of
    images is alive (edits are read from disk, not held for every sample x policy)."""
    from onereward_cli import rollout, synth

    real = rollout.full_rollout
    calls = {"n": 0, "kill_at": 3}

    def rollout_then_kill(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt  # what Ctrl+C or a SIGINT'd job does mid-run
        return real(*a, **k)

    monkeypatch.setattr(rollout, "full_rollout", rollout_then_kill)
    out = tmp_path / "eval"
    argv = ["eval", "--policy", "zoo:flux-fill", "--compare", str(trained_policy), "--benchmark", str(bench),
            "--out", str(out), "--set", "eval.batch_size=1", "--set", "eval.gsb=false"]
    assert _cli(argv) == 130
    assert len((out / "edits.jsonl").read_text().splitlines()) == 2

    live = []
    real_oracle = synth.oracle_scores
    monkeypatch.setattr(synth, "oracle_scores", lambda *a, **k: (live.append(_live_images()), real_oracle(*a, **k))[1])
    calls.update(n=0, kill_at=-1)
    assert _cli(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert calls["n"] == 6 and run["counts"]["edits_generated"] == 6 and run["counts"]["edits_reused"] == 2
    assert len(live) == 8 and max(live) <= 4, live  # 8 edits + 4 sources would be >= 12

    fresh = tmp_path / "fresh"
    assert _cli([*argv[:8], str(fresh), *argv[9:]]) == 0
    for e in (out / "images").rglob("*.png"):
        assert np.array_equal(np.asarray(Image.open(e)), np.asarray(Image.open(fresh / e.relative_to(out)))), e


def _bad_bench(bench: Path, tmp_path: Path, mutate) -> Path:
    rows = [json.loads(x) for x in bench.read_text().splitlines()]
    for r in rows:
        for k in ("source", "mask"):
            r[k] = str(bench.parent / r[k])
    mutate(rows, tmp_path)
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("case, match", [
    ("missing_source", r"bad.jsonl:2: source: image not found: .*nope.png"),
    ("missing_mask", r"bad.jsonl:2: mask: sample 's1': mask not found"),
    ("aspect", r"bad.jsonl:1: mask: mask is 64x32 but the image is 64x64 \(different aspect ratio\)"),
    ("empty_mask", r"bad.jsonl:1: mask: mask is empty"),
    ("no_prompt", r"bad.jsonl:1: prompt: sample 's0': task fill needs a prompt"),
    ("bad_task", r"bad.jsonl:3: task: task 'outpaint' is not in the recipe"),
])
def test_bad_benchmark_rows_exit_2_naming_the_row(zoo, bench, tmp_path, capsys, case, match):
    def mutate(rows, d):
        if case == "missing_source":
            rows[1]["source"] = str(d / "nope.png")
        elif case == "missing_mask":
            rows[1]["mask"] = str(d / "nope_mask.png")
        elif case == "aspect":
            Image.new("L", (64, 32), 255).save(d / "wide.png")
            rows[0]["mask"] = str(d / "wide.png")
        elif case == "empty_mask":
            Image.new("L", (64, 64), 0).save(d / "black.png")
            rows[0]["mask"] = str(d / "black.png")
        elif case == "no_prompt":
            rows[0].pop("prompt")
        elif case == "bad_task":
            rows[2]["task"] = "outpaint"

    f = _bad_bench(bench, tmp_path, mutate)
    out = tmp_path / "out"
    assert _cli(["eval", "--policy", "zoo:flux-fill", "--benchmark", str(f), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(match, err), err
    assert not out.exists()  # nothing half-written


def test_bad_policy_and_human_file_fail_before_generation(zoo, bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["eval", "--policy", str(tmp_path / "missing" / "policy"), "--benchmark", str(bench),
                 "--out", str(out)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    h = tmp_path / "h.csv"
    h.write_text("sample,model,dimension,value\ns0,x,aesthetics,9\n")
    assert _cli(["eval", "--policy", "zoo:flux-fill", "--benchmark", str(bench), "--out", str(out),
                 "--human", str(h)]) == 2
    assert re.search(r"h.csv:2: value: 'aesthetics' is rated on the 1-5 scale", " ".join(capsys.readouterr().err.split()))
    assert not out.exists()


def test_generate_folder_benchmark(zoo, tiny_recipe, tmp_path):
    from onereward_cli.evaluate import Policy, load_benchmark

    d = tmp_path / "gen"
    recs = []
    for sid, task, user in (("a", "fill", "a red circle"), ("b", "removal", None)):
        (d / "images" / sid).mkdir(parents=True)
        Image.new("RGB", (96, 64), (10, 200, 30)).save(d / "images" / sid / "source.png")
        m = np.zeros((64, 96), np.uint8)
        m[10:30, 20:50] = 255
        Image.fromarray(m).save(d / "images" / sid / "mask.png")
        recs.append({"id": sid, "task": task, "prompt": user or "remove", "user_prompt": user,
                     "source": f"images/{sid}/source.png", "mask": f"images/{sid}/mask.png", "width": 96,
                     "height": 64, "candidates": []})
    (d / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    samples = load_benchmark(d, tiny_recipe)
    pol = Policy("base", "zoo:flux-fill")
    assert [(s.id, s.task, s.user_prompt, pol.prompt(tiny_recipe, s)) for s in samples] == [
        ("a", "fill", "a red circle", "a red circle"), ("b", "removal", None, "remove")]
    assert Policy("release", "x", prompts={"removal": "erase"}).prompt(tiny_recipe, samples[1]) == "erase"
    src, mask = samples[0].condition(tiny_recipe.eval.resolution)
    w, h = src.size
    assert w % 16 == 0 and h % 16 == 0 and w > h and mask.shape == (h, w)
    assert set(np.unique(mask)) == {0, 255}
    with pytest.raises(InputError, match="candidates.jsonl"):
        load_benchmark(tmp_path, tiny_recipe)


def test_write_report_renders_every_section_kind(tmp_path):
    from onereward_cli.report import Figure, Grid, Section, Table, pyplot, save_figure, write_report

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "plots" / "curve.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    t = Table("Table 2", ["Policy", "PickScore", "ReMOVE"], [["base", 21.23456, None], ["ours|x", 22.0, float("nan")]],
              groups=[("", 1), ("Image Fill", 1), ("Object Removal", 1)], caption="raw")
    s = Section("Metrics", text="Some `code` and **bold**.\n\nSecond paragraph <b>escaped</b>.", tables=[t],
                figures=[Figure(png, "a curve")], grids=[Grid("Fill", ["source", "P"], [("s0", [tmp_path / "a.png", None])])],
                notes=["a note"])
    md, page = write_report(tmp_path, "Title", [s], subtitle="sub")
    text = md.read_text()
    assert "| Policy | Image Fill · PickScore | Object Removal · ReMOVE |" in text
    assert "| base | 21.2346 | – |" in text and "ours\\|x" in text
    assert "![a curve](plots/curve.png)" in text and "![](a.png)" in text and "- a note" in text
    h = page.read_text()
    assert h.count("data:image/png;base64,") == 2 and '<th colspan="1">Image Fill</th>' in h
    assert "<code>code</code>" in h and "<b>bold</b>" in h and "&lt;b&gt;escaped&lt;/b&gt;" in h
    assert "<td>–</td>" in h and "<style>" in h and "<link" not in h

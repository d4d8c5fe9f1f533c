"""`onereward generate`: planning (tasks, prompts, masks, parameters), validation, output format,
reproducibility of a candidate from its record, resume, and the rank split."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli import generate as G
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe
from onereward_cli.tasks import TASK_KEYS


def _recipe(*sets):
    return load_recipe("tiny", ["generate.steps=[2,3]", "generate.batch_size=4", *sets])


def _manifest(pool):
    return [json.loads(x) for x in (pool / "manifest.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Planning (no model)
# ----------------------------------------------------------------------------------------------
def test_plan_synth_pool_tasks_prompts_and_masks(synth_pool):
    r = load_recipe("tiny")
    samples = G.plan(r, synth_pool / "manifest.jsonl", 4)
    man = {m["id"]: m for m in _manifest(synth_pool)}
    assert [s.id for s in samples] == list(man)
    assert {s.task for s in samples} <= set(TASK_KEYS) and len({s.task for s in samples}) >= 2
    for s in samples:
        m = man[s.id]
        tcfg = r.tasks[s.task]
        if s.task == "fill":
            assert re.fullmatch(r"a \w+ \w+", s.user_prompt) and s.prompt == s.user_prompt
        elif s.task == "extend":
            assert s.user_prompt == m["caption"] == s.prompt
        else:
            assert s.user_prompt is None and s.prompt == tcfg.fixed_prompt
        src, mask = G.build_condition(r, s)
        assert mask.shape == (src.size[1], src.size[0]) and src.size[0] % 16 == 0 and src.size[1] % 16 == 0
        cover = (mask > 0).mean()
        assert 0 < cover < 1
        if s.task == "removal":
            # The mask is one object's box, dilated by the recipe margin.
            hits = []
            for o in m["objects"]:
                x0, y0, x1, y1 = o["box"]
                hits.append((mask[y0:y1, x0:x1] > 0).all())
            assert any(hits)
        assert len(s.candidates) == 4
        for c in s.candidates:
            p = c["params"]
            assert 2 <= p["steps"] <= 4 and 1.0 <= p["guidance"] <= 30.0 and p["true_cfg"] == 1.0
            assert 0.5 <= p["shift"] <= 1.15 and p["negative_prompt"] in ("", "blurry")
            assert isinstance(c["seed"], int)


def test_plan_is_deterministic_per_sample_id(synth_pool):
    r = load_recipe("tiny", ["generate.true_cfg=[1.0,4.0]"])
    a = G.plan(r, synth_pool / "manifest.jsonl", 3)
    b = G.plan(r, synth_pool / "manifest.jsonl", 3, limit=5)
    assert [(s.id, s.task, s.prompt, s.candidates) for s in a[:5]] == [(s.id, s.task, s.prompt, s.candidates) for s in b]
    assert any(c["params"]["true_cfg"] > 1 for s in a for c in s.candidates)
    for s in a[:3]:
        m1, m2 = G.build_condition(r, s)[1], G.build_condition(r, s)[1]
        assert (m1 == m2).all()
    other = G.plan(load_recipe("tiny", ["seed=1"]), synth_pool / "manifest.jsonl", 3)
    assert [s.candidates for s in other] != [s.candidates for s in a]


def test_task_mix_follows_recipe(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(200):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(d / f"im{i:03d}.png")
    r = load_recipe("tiny", ["tasks.fill.probability=0.5", "tasks.extend.probability=0",
                             "tasks.extend_no_prompt.probability=0.5", "tasks.removal.probability=0"])
    tasks = [s.task for s in G.plan(r, d, 2)]
    assert set(tasks) == {"fill", "extend_no_prompt"}
    assert 60 < tasks.count("fill") < 140


def test_folder_of_images_with_sidecar_caption(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (48, 32), "red").save(d / "a.png")
    Image.new("RGB", (32, 32), "blue").save(d / "sub" / "b c.jpg")
    (d / "sub" / "b c.txt").write_text("a blue wall\n")
    r = load_recipe("tiny", ["tasks.fill.probability=0", "tasks.extend.probability=1",
                             "tasks.extend_no_prompt.probability=0", "tasks.removal.probability=0"])
    s = {x.id: x for x in G.plan(r, d, 2)}
    assert set(s) == {"a", "sub__b_c"}
    assert s["sub__b_c"].prompt == "a blue wall"
    assert re.fullmatch(r"a \w+ \w+", s["a"].prompt)  # no caption: a shape prompt


def _triplets(tmp_path, rows, size=(32, 32)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "green").save(tmp_path / "src.png")
    f = tmp_path / "triplets.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _mask(path, size, box=None, value=255):
    a = np.zeros((size[1], size[0]), np.uint8)
    if box is None:
        a[:] = value
    else:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = value
    Image.fromarray(a).save(path)
    return path.name


def test_triplets_with_user_masks(tmp_path):
    m1 = _mask(tmp_path / "m1.png", (32, 32), (8, 8, 24, 24))
    m2 = _mask(tmp_path / "m2.png", (16, 16), (4, 4, 8, 8))  # same aspect, other size: resized, warned
    f = _triplets(tmp_path, [
        {"id": "t1", "source": "src.png", "mask": m1, "prompt": "a red circle", "task": "fill"},
        {"id": "t2", "source": "src.png", "mask": m2, "prompt": "", "task": "removal"},
        {"id": "t3", "source": "src.png", "prompt": "   "},  # no prompt, no task: a prompt-free task
    ])
    warnings = []
    r = load_recipe("tiny", ["generate.resolution=32"])
    s = {x.id: x for x in G.plan(r, f, 2, warn=warnings.append)}
    assert len(warnings) == 1 and "resized" in warnings[0] and "triplets.jsonl:2" in warnings[0]
    assert s["t1"].task == "fill" and s["t1"].prompt == "a red circle"
    src, mask = G.build_condition(r, s["t1"])
    assert (mask[8:24, 8:24] == 255).all() and (mask > 0).sum() == 16 * 16
    _, mask = G.build_condition(r, s["t2"])
    d = r.generate.masks.removal_dilate
    assert (mask > 0).sum() == (8 + 2 * d) ** 2  # user mask resized x2 then dilated
    assert s["t3"].task in ("extend_no_prompt", "removal") and s["t3"].user_prompt is None


@pytest.mark.parametrize("row,mask,match,field", [
    ({"task": "fill", "prompt": ""}, ((32, 32), (0, 0, 8, 8)), "non-empty prompt", "prompt"),
    ({"task": "extend"}, ((32, 32), (0, 0, 8, 8)), "non-empty prompt", "prompt"),
    ({"task": "inpaint", "prompt": "x"}, ((32, 32), (0, 0, 8, 8)), "unknown task", "task"),
    ({"task": "fill", "prompt": "x"}, ((32, 32), (0, 0, 0, 0)), "empty", "mask"),
    ({"task": "removal"}, ((32, 32), None), "all white", "mask"),
    ({"task": "fill", "prompt": "x"}, ((64, 32), (0, 0, 8, 8)), "aspect ratio", "mask"),
    ({"task": "fill", "prompt": "x", "id": "../escape"}, ((32, 32), (0, 0, 8, 8)), "names a folder", "id"),
])
def test_bad_triplets_are_input_errors_and_nothing_is_written(tmp_path, row, mask, match, field):
    size, box = mask
    name = _mask(tmp_path / "m.png", size, box)
    good = {"id": "ok", "source": "src.png", "mask": name, "prompt": "a cat", "task": "fill"}
    if box == (0, 0, 0, 0) or box is None or size != (32, 32):
        good["mask"] = _mask(tmp_path / "good.png", (32, 32), (0, 0, 8, 8))
    bad = {"id": "bad", "source": "src.png", "mask": name, **row}
    f = _triplets(tmp_path, [good, bad])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as e:
        G.run(_recipe(), f, out, candidates=2)
    assert e.value.line == 2 and e.value.field == field and str(f) in str(e.value)
    assert not out.exists()


def test_duplicate_ids_and_missing_files(tmp_path):
    name = _mask(tmp_path / "m.png", (32, 32), (0, 0, 8, 8))
    row = {"id": "same", "source": "src.png", "mask": name, "prompt": "x", "task": "fill"}
    f = _triplets(tmp_path, [row, row])
    with pytest.raises(InputError, match="duplicate sample id") as e:
        G.run(_recipe(), f, tmp_path / "out", candidates=2)
    assert e.value.line == 2 and e.value.field == "id"
    f = _triplets(tmp_path, [{**row, "source": "missing.png"}])
    with pytest.raises(InputError, match="not found") as e:
        G.run(_recipe(), f, tmp_path / "out", candidates=2)
    assert e.value.field == "source" and e.value.line == 1
    with pytest.raises(InputError, match="at least 2"):
        G.run(_recipe(), f, tmp_path / "out", candidates=1)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Generation (tiny zoo)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(synth_pool, tmp_path_factory, zoo):
    out = tmp_path_factory.mktemp("gen") / "cands"
    r = _recipe("generate.true_cfg=[1.0,3.0]")
    G.run(r, synth_pool / "manifest.jsonl", out, candidates=3, limit=5)
    return r, out


def test_output_format(generated, synth_pool):
    r, out = generated
    recs = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert [x["id"] for x in recs] == [m["id"] for m in _manifest(synth_pool)][:5]
    for rec in recs:
        assert set(rec) == {"id", "task", "prompt", "user_prompt", "source", "mask", "width", "height", "candidates"}
        assert rec["source"] == f"images/{rec['id']}/source.png" and rec["mask"] == f"images/{rec['id']}/mask.png"
        src, mask = Image.open(out / rec["source"]), Image.open(out / rec["mask"])
        assert src.mode == "RGB" and mask.mode == "L" and src.size == mask.size == (rec["width"], rec["height"])
        assert set(np.unique(np.asarray(mask))) == {0, 255}
        assert [c["index"] for c in rec["candidates"]] == [0, 1, 2]
        for c in rec["candidates"]:
            assert c["path"] == f"images/{rec['id']}/cand_{c['index']}.png"
            assert Image.open(out / c["path"]).size == src.size
            assert set(c["params"]) == {"steps", "guidance", "true_cfg", "shift", "negative_prompt"}
        pixels = [np.asarray(Image.open(out / c["path"])) for c in rec["candidates"]]
        assert not (pixels[0] == pixels[1]).all()  # different seeds, different candidates
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "generate" and run["counts"]["samples"] == 5 and run["counts"]["generated_samples"] == 5


def test_a_candidate_is_reproducible_from_its_record(generated):
    """Regenerate candidates alone with rollout.full_rollout and the recorded seed and parameters."""
    from onereward_cli import rollout as R
    from onereward_cli.models.flux_fill import load_fill_pipeline

    r, out = generated
    pipe = load_fill_pipeline(r.models.policy)
    recs = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    checked_cfg = False
    for rec in recs[:3]:
        src = torch.from_numpy(np.asarray(Image.open(out / rec["source"]), np.float32) / 255).permute(2, 0, 1)[None]
        mask = torch.from_numpy(np.asarray(Image.open(out / rec["mask"]), np.float32) / 255)[None, None]
        for c in rec["candidates"][:2]:
            p = c["params"]
            emb = R.encode_prompts(pipe, [rec["prompt"]], r.generate.max_sequence_length)
            neg = R.encode_prompts(pipe, [p["negative_prompt"]], r.generate.max_sequence_length)
            img = R.full_rollout(pipe, src, mask, emb, p["steps"], p["guidance"],
                                 torch.Generator().manual_seed(c["seed"]), true_cfg=p["true_cfg"], neg_embeds=neg,
                                 mu=p["shift"])
            want = np.asarray(Image.open(out / c["path"]), np.int16)
            got = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
            assert np.abs(got - want).max() <= 1
            checked_cfg |= p["true_cfg"] > 1
    assert checked_cfg


def test_rerun_generates_nothing(generated, monkeypatch):
    r, out = generated
    before = (out / "candidates.jsonl").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    # What a kill in the middle of atomic writes leaves behind: cleaned by the next run.
    first = next((out / "images").iterdir())
    stale = [first / ".source.png.k3j_9xab.png", out / ".candidates.jsonl.ab12cd34.jsonl", out / ".tmpq1w2e3r4"]
    for p in stale:
        p.write_bytes(b"half")
    monkeypatch.setattr(G, "generate_batch", lambda *a, **k: pytest.fail("nothing should be generated"))
    monkeypatch.setattr("onereward_cli.models.flux_fill.load_fill_pipeline",
                        lambda *a, **k: pytest.fail("no model needed"))
    G.run(r, _pool_of(out), out, candidates=3, limit=5)
    assert (out / "candidates.jsonl").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    assert not [p for p in stale if p.exists()]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_samples"] == 5 and run["counts"]["generated_samples"] == 0
    with pytest.raises(InputError, match="candidates"):
        G.run(r, _pool_of(out), out, candidates=4, limit=5)


def _pool_of(out):
    return json.loads((out / "run.json").read_text())["inputs"]["input"]["path"]


def test_interrupted_run_generates_only_missing_samples(generated, tmp_path, monkeypatch):
    import shutil

    r, full = generated
    out = tmp_path / "cands"
    shutil.copytree(full, out)
    lines = (out / "candidates.jsonl").read_text().splitlines(keepends=True)
    # Two samples finished, the third was being appended when the process died.
    (out / "candidates.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    seen = []
    real = G.generate_batch

    def counting(pipe, jobs, *a, **k):
        seen.extend((j["sample"].id, j["cand"]["index"]) for j in jobs)
        return real(pipe, jobs, *a, **k)

    monkeypatch.setattr(G, "generate_batch", counting)
    finished = {p: p.stat().st_mtime_ns for x in lines[:2] for p in (out / "images" / json.loads(x)["id"]).iterdir()}
    G.run(r, _pool_of(out), out, candidates=3, limit=5)
    ids = [json.loads(x)["id"] for x in lines]
    # The five samples form one chunk: it is generated again whole, so its batches are those of the
    # uninterrupted run, but only the three unfinished samples are written.
    assert sorted({s for s, _ in seen}) == sorted(ids) and len(seen) == 5 * 3
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    now = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert [x["id"] for x in now] == ids
    # The regenerated samples are exactly those of the uninterrupted run (same batches, same numerics).
    for rec in now[2:]:
        for c in rec["candidates"]:
            a = np.asarray(Image.open(out / c["path"]), np.int16)
            b = np.asarray(Image.open(full / c["path"]), np.int16)
            assert (a == b).all()


class _FakeState:
    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_ranks_split_samples_and_rank0_merges(synth_pool, tmp_path, monkeypatch, zoo):
    r = _recipe()
    out = tmp_path / "cands"
    seen = {}
    real = G.generate_batch

    def counting(pipe, jobs, *a, **k):
        seen.setdefault(rank_now[0], set()).update(j["sample"].id for j in jobs)
        return real(pipe, jobs, *a, **k)

    monkeypatch.setattr(G, "generate_batch", counting)
    rank_now = [1]
    monkeypatch.setattr(G, "_dist_state", lambda r: _FakeState(1, 2))
    G.run(r, synth_pool / "manifest.jsonl", out, candidates=2, limit=5)
    assert (out / "candidates.part-1.jsonl").exists() and not (out / "candidates.jsonl").exists()
    assert not (out / "run.json").exists()  # rank 0 writes it
    rank_now[0] = 0
    monkeypatch.setattr(G, "_dist_state", lambda r: _FakeState(0, 2))
    G.run(r, synth_pool / "manifest.jsonl", out, candidates=2, limit=5)
    ids = [m["id"] for m in _manifest(synth_pool)][:5]
    assert seen[1] == set(ids[1::2]) and seen[0] == set(ids[0::2])
    recs = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert [x["id"] for x in recs] == ids  # merged in input order
    assert not list(out.glob("candidates.part-*.jsonl")) and (out / "run.json").exists()


# ----------------------------------------------------------------------------------------------
# A policy's own inference settings
# ----------------------------------------------------------------------------------------------
def test_policy_own_settings_replace_the_ranges_unless_overridden(synth_pool, zoo, tmp_path):
    """Guards: a policy with settings of its own (here an rl-style folder) draws its candidates at those
    values and with its fixed prompts, generate.override forces a range back, and run.json says which."""
    import shutil

    pol = tmp_path / "policy"
    shutil.copytree(zoo / "flux-fill" / "transformer", pol)
    (pol / "onereward_policy.json").write_text(json.dumps({
        "base": "zoo:flux-fill", "kind": "transformer", "prompts": {"removal": "erase it"},
        "inference": {"steps": 2, "guidance": 7.0, "true_cfg": 2.0, "negative_prompt": "blurry", "resolution": 32}}))
    r, sources = G.policy_recipe(_recipe(f"models.policy={pol}"))
    assert sources == {"steps": "policy", "guidance": "policy", "true_cfg": "policy", "negative_prompts": "policy",
                       "resolution": "policy"}
    samples = G.plan(r, synth_pool / "manifest.jsonl", 3)
    params = [c["params"] for s in samples for c in s.candidates]
    assert all((p["steps"], p["guidance"], p["true_cfg"], p["negative_prompt"]) == (2, 7.0, 2.0, "blurry")
               for p in params)
    assert {s.prompt for s in samples if s.task == "removal"} == {"erase it"}
    assert G.build_condition(r, samples[0])[0].size == (32, 32)

    r2, sources = G.policy_recipe(_recipe(f"models.policy={pol}", "generate.override.guidance=[1.0,30.0]"))
    assert sources["guidance"] == "override" and sources["steps"] == "policy"
    guid = [c["params"]["guidance"] for s in G.plan(r2, synth_pool / "manifest.jsonl", 3) for c in s.candidates]
    assert len(set(guid)) > 1 and all(1.0 <= g <= 30.0 for g in guid)
    # A base pipeline carries nothing: the recipe's ranges, as before.
    assert set(G.policy_recipe(_recipe())[1].values()) == {"recipe"}

    out = tmp_path / "cands"
    G.run(_recipe(f"models.policy={pol}"), synth_pool / "manifest.jsonl", out, candidates=2, limit=1)
    rec = json.loads((out / "candidates.jsonl").read_text())
    assert {c["params"]["guidance"] for c in rec["candidates"]} == {7.0} and (rec["width"], rec["height"]) == (32, 32)
    assert json.loads((out / "run.json").read_text())["inference"]["from"]["guidance"] == "policy"


# ----------------------------------------------------------------------------------------------
# Removal masks for pools without boxes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_sam import build_tiny_sam

    return build_tiny_sam(tmp_path_factory.mktemp("sam"))


def _boxless_pool(synth_pool, d, n=3):
    """Synth images as a plain folder: no manifest, so no object boxes."""
    d.mkdir(parents=True)
    for m in _manifest(synth_pool)[:n]:
        Image.open(synth_pool / m["path"]).save(d / f"{m['id']}.png")
    return d


REMOVAL_ONLY = ["tasks.fill.probability=0", "tasks.extend.probability=0", "tasks.extend_no_prompt.probability=0",
                "tasks.removal.probability=1"]
# The random tiny SAM's proposals have no real quality: accept any IoU/stability, a small prompt grid.
SAM_SETS = ["generate.masks.segment_min_iou=0", "generate.masks.segment_min_stability=0",
            "generate.masks.segment_points_per_side=4"]


def test_segmenter_proposes_removal_masks(synth_pool, zoo, tiny_sam, tmp_path, monkeypatch):
    """Guards: without boxes, each removal mask is the segmenter's proposal chosen by the area bounds
    (seeded), dilated as box masks are; picks are cached, so a re-run loads no segmenter."""
    from onereward_cli.models.segmenter import load_segmenter, propose_masks
    from onereward_cli.tasks import choose_object_mask, fit_size, removal_mask

    pool = _boxless_pool(synth_pool, tmp_path / "imgs")
    # The random SAM's proposals are stripes: a 1 px dilation keeps some context around them.
    r = _recipe(*REMOVAL_ONLY, *SAM_SETS, f"models.segmenter={tiny_sam}", "generate.masks.segment_max_area=0.9",
                "generate.masks.removal_dilate=1")
    out = tmp_path / "cands"
    G.run(r, pool, out, candidates=2)
    recs = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and {x["task"] for x in recs} == {"removal"}
    gen, mc = load_segmenter(str(tiny_sam)), r.generate.masks
    for rec in recs:
        src = Image.open(pool / f"{rec['id']}.png").convert("RGB")
        size = fit_size(*src.size, r.generate.resolution)
        pick = choose_object_mask(propose_masks(gen, src.resize(size, Image.BICUBIC), mc),
                                  G._rng(r.seed, rec["id"], "segment"), mc.segment_min_area, mc.segment_max_area)
        assert pick is not None and mc.segment_min_area <= (pick > 0).mean() <= mc.segment_max_area
        assert np.array_equal(np.asarray(Image.open(out / "segments" / f"{rec['id']}.png")), pick)
        want = removal_mask(size, user_mask=pick, dilate=mc.removal_dilate)
        assert np.array_equal(np.asarray(Image.open(out / rec["mask"])), want) and (want > pick).any()
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["segmented_objects"] == 3 and run["counts"]["skipped_no_object"] == 0

    # Two more images: only they are segmented (the cached picks of the first three are reused).
    for m in _manifest(synth_pool)[3:5]:
        Image.open(synth_pool / m["path"]).save(pool / f"{m['id']}.png")
    seen = []
    real = propose_masks
    monkeypatch.setattr("onereward_cli.models.segmenter.propose_masks",
                        lambda g, im, mc: (seen.append(im.size), real(g, im, mc))[1])
    G.run(r, pool, out, candidates=2)
    assert len(seen) == 2 and len((out / "candidates.jsonl").read_text().splitlines()) == 5


def test_removal_without_an_object_is_skipped_and_counted(synth_pool, zoo, tiny_sam, tmp_path, monkeypatch):
    """Guards: no random rectangle for removal, with or without a segmenter; the skip is counted in
    run.json and remembered (no second segmentation); a user mask wins and needs no segmenter."""
    pool = _boxless_pool(synth_pool, tmp_path / "imgs")
    out = tmp_path / "none"
    G.run(_recipe(*REMOVAL_ONLY), pool, out, candidates=2)  # no segmenter configured
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_no_object"] == 3 and run["counts"]["generated_samples"] == 0
    assert not (out / "candidates.jsonl").exists() or not (out / "candidates.jsonl").read_text().strip()

    r = _recipe(*REMOVAL_ONLY, *SAM_SETS, f"models.segmenter={tiny_sam}", "generate.masks.segment_min_area=0.0",
                "generate.masks.segment_max_area=0.0001")  # nothing is that small: no acceptable object
    out = tmp_path / "tiny-bounds"
    G.run(r, pool, out, candidates=2)
    segs = [json.loads(x) for x in (out / "segments.jsonl").read_text().splitlines()]
    assert len(segs) == 3 and all(s["mask"] is None and s["proposals"] >= 1 for s in segs)
    monkeypatch.setattr("onereward_cli.models.segmenter.load_segmenter",
                        lambda *a, **k: pytest.fail("picks are cached; no segmenter needed"))
    G.run(r, pool, out, candidates=2)
    assert json.loads((out / "run.json").read_text())["counts"]["skipped_no_object"] == 3

    _mask(tmp_path / "m.png", (32, 32), (8, 8, 16, 16))
    f = _triplets(tmp_path / "trip", [{"id": "u", "source": "src.png", "mask": "../m.png", "task": "removal"}])
    G.run(_recipe(f"models.segmenter={tmp_path / 'no-such-sam'}"), f, tmp_path / "user", candidates=2)
    rec = json.loads((tmp_path / "user" / "candidates.jsonl").read_text())
    mask = np.asarray(Image.open(tmp_path / "user" / rec["mask"]))
    d = load_recipe("tiny").generate.masks.removal_dilate
    assert rec["id"] == "u" and (mask > 0).sum() == (2 * 8 + 2 * d) ** 2  # the user's box, x2 (32 -> 64 px), dilated

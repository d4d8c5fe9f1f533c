"""`onereward curate`: pool listing, honest rejects, sharded resumable embeddings, dedup, flat and
hierarchical K-means selection on both backends, multi-rank sharding, and the open_clip loader."""
import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onereward_cli import cli, curate
from onereward_cli.artifacts import load_tensors, read_jsonl
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe
from onereward_cli.synth import make_image

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="the faiss extra is not installed (pip install .[faiss])")


def recipe(**curate_keys):
    return load_recipe("tiny", [f"curate.{k}={v}" for k, v in curate_keys.items()])


def records(path):
    return [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(path)]


def run_json(out):
    return json.loads((Path(out) / "run.json").read_text())


@pytest.fixture(scope="module")
def bad_pool(synth_pool, tmp_path_factory):
    """16 synth images + an identical copy, a JPEG re-encode, a nested new image, and five unusable
    files (zero-byte, truncated PNG, text named .jpg, too small, ...) + a non-image file."""
    d = tmp_path_factory.mktemp("badpool")
    shutil.copytree(synth_pool / "images", d / "images")
    shutil.copy(d / "images/000001.png", d / "images/dup_copy.png")
    Image.open(d / "images/000003.png").convert("RGB").save(d / "images/reencoded.jpg", quality=95)
    img, *_ = make_image(random.Random(99), 64, 2)
    (d / "nested").mkdir()
    img.save(d / "nested/extra.png")
    (d / "images/zero.png").write_bytes(b"")
    (d / "images/trunc.png").write_bytes((d / "images/000002.png").read_bytes()[:300])
    (d / "images/text.jpg").write_text("this is not a jpeg\n")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(d / "images/small.png")
    (d / "notes.txt").write_text("not part of the pool\n")
    return d


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------
def test_flat_folder_rejects_duplicates_and_writes_every_output(bad_pool, tmp_path):
    out = tmp_path / "cur"
    # 19 usable, 17 distinct: a target below the distinct count must not pick both copies
    curate.run(recipe(mode="flat"), bad_pool, out, select=16)
    cur = records(out / "curated.jsonl")
    rej = {r["id"]: r for r in records(out / "rejected.jsonl")}
    assert {i: r["reason"] for i, r in rej.items() if "duplicate_of" not in r} == {
        "images/zero.png": "zero-byte", "images/trunc.png": "truncated", "images/text.jpg": "not an image",
        "images/small.png": "too small"}
    assert rej["images/dup_copy.png"]["reason"] == "duplicate of images/000001.png"
    assert rej["images/dup_copy.png"]["similarity"] == 1.0
    assert rej["images/reencoded.jpg"]["reason"] == "duplicate of images/000003.png"
    assert len(rej) == 6
    ids = [r["id"] for r in cur]
    assert len(ids) == len(set(ids)) == 16
    assert "nested/extra.png" in ids  # recursive listing
    assert not {"images/dup_copy.png", "images/reencoded.jpg"} & set(ids)
    for r in cur:
        assert set(r) == {"id", "path", "cluster", "distance", "rank"}
        assert Path(r["path"]).is_absolute() and Path(r["path"]).exists()
    _check_geometry(out, cur)
    man = run_json(out)
    assert man["counts"]["listed"] == 23 and man["counts"]["embedded"] == 19
    assert man["counts"]["distinct"] == 17 and man["counts"]["ignored_files"] == 1
    assert man["counts"]["rejected_by_reason"] == {"duplicate": 2, "not an image": 1, "too small": 1,
                                                   "truncated": 1, "zero-byte": 1}
    index = json.loads((out / "embeddings/index.json").read_text())
    assert index["complete"] and index["n_inputs"] == 23 and index["dim"] == 32
    assert len(read_jsonl(out / "embeddings/inputs.jsonl")) == 23


def _check_geometry(out, cur):
    """cluster indexes centroids.safetensors; distance is 1 - cos(embedding, its centroid); rank 0
    is the member nearest the centroid."""
    cent = load_tensors(out / "centroids.safetensors")["centroids"].numpy()
    emb = curate.load_embeddings(out / "embeddings", json.loads((out / "embeddings/index.json").read_text())
                                 ["fingerprint"], len(list((out / "embeddings").glob("shard-*"))))
    inputs = [r["id"] for r in read_jsonl(out / "embeddings/inputs.jsonl")]
    row_of = {inputs[p]: i for i, p in enumerate(emb.positions)}
    for r in cur:
        x = emb.x[row_of[r["id"]]]
        assert 0 <= r["cluster"] < len(cent)
        assert r["distance"] == pytest.approx(1 - float(x @ cent[r["cluster"]]), abs=1e-5)
        assert r["rank"] >= 0
    assert sum(r["rank"] == 0 for r in cur) >= len(cur) - 2


def test_hierarchical_manifest_passes_fields_through(synth_pool, tmp_path):
    out = tmp_path / "cur"
    r = recipe(mode="hierarchical", coarse_clusters=2, leaf_quota=2)  # three levels on 16 images
    curate.run(r, synth_pool / "manifest.jsonl", out, select=9)
    cur = records(out / "curated.jsonl")
    manifest = {m["id"]: m for m in read_jsonl(synth_pool / "manifest.jsonl")}
    assert len({c["id"] for c in cur}) == 9
    for c in cur:
        m = manifest[c["id"]]
        assert c["caption"] == m["caption"] and c["objects"] == m["objects"]
        assert c["path"] == str((synth_pool / m["path"]).resolve())
        assert c["coarse_cluster"] in (0, 1)
    t = load_tensors(out / "centroids.safetensors")
    assert tuple(t["coarse_centroids"].shape) == (2, 32)
    _check_geometry(out, cur)
    # each coarse cluster gets a share proportional to its size, at least one
    assert {c["coarse_cluster"] for c in cur} == {0, 1}


@pytest.fixture(scope="module")
def reference(synth_pool, tmp_path_factory):
    """An uninterrupted single-process run (4 shards, decoding in a worker process)."""
    out = tmp_path_factory.mktemp("ref")
    curate.run(recipe(shard_size=4, num_workers=1, mode="hierarchical"), synth_pool, out, select=7)
    return out


def test_resume_after_interruption_gives_the_same_selection(synth_pool, reference, tmp_path, monkeypatch):
    out = tmp_path / "cur"
    r = recipe(shard_size=4, mode="hierarchical")

    def killed(shard):
        raise KeyboardInterrupt(f"killed after shard {shard}")

    monkeypatch.setattr(curate, "_after_shard_written", killed)
    with pytest.raises(KeyboardInterrupt):
        curate.run(r, synth_pool, out, select=7)
    assert sorted(p.name for p in (out / "embeddings").glob("shard-*")) == ["shard-000000.safetensors"]
    assert not (out / "curated.jsonl").exists()
    # what a SIGKILL in the middle of atomic writes leaves: cleaned by the next run
    stale = [out / "embeddings" / ".tmpa1b2c3d4", out / "embeddings" / ".index.json.x9y8z7w6.json",
             out / ".curated.jsonl.abcdefgh.jsonl"]
    for p in stale:
        p.write_bytes(b"half")
    monkeypatch.setattr(curate, "_after_shard_written", None)
    curate.run(r, synth_pool, out, select=7)
    assert (out / "curated.jsonl").read_bytes() == (reference / "curated.jsonl").read_bytes()
    assert not [p for p in stale if p.exists()]
    emb = run_json(out)["embedding"]
    assert (emb["shards_reused"], emb["shards_computed"]) == (1, 3)
    # a lost last shard: only it is recomputed
    (out / "embeddings/shard-000003.safetensors").unlink()
    curate.run(r, synth_pool, out, select=7)
    assert (out / "curated.jsonl").read_bytes() == (reference / "curated.jsonl").read_bytes()
    emb = run_json(out)["embedding"]
    assert (emb["shards_reused"], emb["shards_computed"]) == (3, 1)


def test_two_ranks_split_the_shards_and_match_one_process(synth_pool, reference, tmp_path, monkeypatch):
    out = tmp_path / "cur"
    r = recipe(shard_size=4, mode="hierarchical", rank_timeout_s=30)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert curate.run(r, synth_pool, out, select=7) is None  # rank 1 embeds shards 1 and 3, then leaves
    assert sorted(p.name for p in (out / "embeddings").glob("shard-*")) == [
        "shard-000001.safetensors", "shard-000003.safetensors"]
    monkeypatch.setenv("RANK", "0")
    curate.run(r, synth_pool, out, select=7)
    assert (out / "curated.jsonl").read_bytes() == (reference / "curated.jsonl").read_bytes()
    assert run_json(out)["embedding"]["shards_computed"] == 2


def test_changed_pool_invalidates_old_shards(synth_pool, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in sorted((synth_pool / "images").glob("*.png"))[:8]:
        shutil.copy(p, pool / p.name)
    out = tmp_path / "cur"
    r = recipe(shard_size=4)
    curate.run(r, pool, out, select=4)
    shutil.copy(sorted((synth_pool / "images").glob("*.png"))[8], pool / "zz_new.png")
    curate.run(r, pool, out, select=4)
    emb = run_json(out)["embedding"]
    assert (emb["shards_reused"], emb["shards_computed"], emb["shards"]) == (0, 3, 3)


@needs_faiss
def test_backends_share_a_format_and_runs_are_deterministic(bad_pool, tmp_path):
    out = tmp_path / "cur"
    formats, outputs, computed = {}, {}, []
    for mode in ("flat", "hierarchical"):
        for backend in ("faiss", "sklearn"):
            curate.run(recipe(mode=mode, backend=backend), bad_pool, out, select=10)
            cur = records(out / "curated.jsonl")
            assert len({c["id"] for c in cur}) == 10
            formats[mode, backend] = {(k, type(v).__name__) for c in cur for k, v in c.items()}
            outputs[mode, backend] = (out / "curated.jsonl").read_bytes()
            assert run_json(out)["backend"] == backend
            computed.append(run_json(out)["embedding"]["shards_computed"])
        assert formats[mode, "faiss"] == formats[mode, "sklearn"]
    assert computed == [1, 0, 0, 0]  # later runs reuse the embeddings
    for backend in ("faiss", "sklearn"):  # same seed, same selection
        curate.run(recipe(mode="hierarchical", backend=backend), bad_pool, out, select=10)
        assert (out / "curated.jsonl").read_bytes() == outputs["hierarchical", backend]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_select_larger_than_pool_exits_2_before_any_work(synth_pool, tmp_path, capsys):
    out = tmp_path / "cur"
    code, err = run_main(["curate", str(synth_pool / "manifest.jsonl"), "--out", str(out), "--select", "17"],
                         capsys)
    assert code == 2 and "--select" in err and "16" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "embeddings").exists()


def test_select_larger_than_usable_fails_before_clustering(synth_pool, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in sorted((synth_pool / "images").glob("*.png"))[:3]:
        shutil.copy(p, pool / p.name)
    (pool / "zz_zero.png").write_bytes(b"")
    (pool / "zz_text.png").write_text("text")
    out = tmp_path / "cur"
    with pytest.raises(InputError, match="usable pool: 3 of 5"):
        curate.run(recipe(), pool, out, select=4)
    assert not (out / "curated.jsonl").exists() and not (out / "centroids.safetensors").exists()
    assert {r["reason"] for r in records(out / "rejected.jsonl")} == {"zero-byte", "not an image"}


def test_empty_pools_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty pool"):
        curate.run(recipe(), tmp_path / "empty", tmp_path / "o1", select=1)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts/readme.txt").write_text("x")
    with pytest.raises(InputError, match="1 files without an image extension"):
        curate.run(recipe(), tmp_path / "texts", tmp_path / "o2", select=1)
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(InputError, match="empty pool"):
        curate.run(recipe(), tmp_path / "m.jsonl", tmp_path / "o3", select=1)


def test_manifest_problems(synth_pool, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.png"}\n{"id": "x"}\n')
    with pytest.raises(InputError, match=r"m.jsonl:2: path: missing"):
        curate.list_pool(m)
    m.write_text('{"id": "a", "path": "a.png"}\n{"id": "a", "path": "b.png"}\n')
    with pytest.raises(InputError, match=r":2: id: duplicate id 'a'"):
        curate.list_pool(m)
    img = str((synth_pool / "images/000000.png").resolve())
    m.write_text(json.dumps({"path": img}) + "\n" + json.dumps({"id": 7, "path": "gone.png"}) + "\n")
    pool = curate.list_pool(m)
    assert pool.ids == [img, "7"] and pool.paths == [img, str(tmp_path / "gone.png")]
    with pytest.raises(InputError, match="must be an image folder or a .jsonl"):
        curate.list_pool(synth_pool / "images/000000.png")


def test_check_image_reasons(synth_pool, tmp_path):
    png = (synth_pool / "images/000000.png").read_bytes()
    cases = {"zero.png": b"", "trunc.png": png[:200], "head.png": png[:6], "text.jpg": b"hello",
             "corrupt.png": png[:120] + b"\x00" * 200 + png[320:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    Image.new("RGB", (40, 12)).save(tmp_path / "thin.png")
    reason = {n: curate.check_image(str(tmp_path / n), 16)[1] for n in list(cases) + ["thin.png", "gone.png"]}
    assert reason == {"zero.png": "zero-byte", "trunc.png": "truncated", "head.png": "corrupt",
                      "text.jpg": "not an image", "corrupt.png": "corrupt", "thin.png": "too small",
                      "gone.png": "missing"}
    im, why, _ = curate.check_image(str(synth_pool / "images/000000.png"), 16)
    assert why is None and im.mode == "RGB"


# ----------------------------------------------------------------------------------------------
# Selection internals (numpy only, no model)
# ----------------------------------------------------------------------------------------------
def blobs(n=600, d=24, k=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    sizes = rng.integers(10, 90, k)
    sizes = (sizes / sizes.sum() * n).astype(int)
    x = np.concatenate([c + 0.25 * rng.standard_normal((s, d)) for c, s in zip(centers, sizes)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mean_gap(x, rows):
    return float((1 - (x @ x[rows].T).max(1)).mean())


@pytest.mark.parametrize("backend", [pytest.param("faiss", marks=needs_faiss), "sklearn"])
@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_selection_beats_random_and_is_exact_size(mode, backend):
    x = blobs()
    res = curate.select_subset(x.copy(), np.arange(len(x)), 24, mode=mode, backend=backend, seed=0, iters=20,
                               leaf_quota=4)
    rows = res.distinct[res.selection.arrays()[0]]
    assert len(rows) == len(set(rows.tolist())) == 24
    rng = np.random.default_rng(1)
    random_gaps = [mean_gap(x, rng.choice(len(x), 24, replace=False)) for _ in range(20)]
    assert mean_gap(x, rows) < min(random_gaps)


@needs_faiss
def test_duplicates_identical_and_near():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x[10] = x[3]  # identical pixels: same hash
    x[20] = x[5] + 1e-3  # near duplicate
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = np.arange(50)
    hashes[10] = hashes[3]
    dup_of, sim = curate.find_duplicates(x, hashes, 0.999, np.zeros(50, dtype=np.int64))
    assert dup_of[10] == 3 and sim[10] == 1.0
    assert dup_of[20] == 5 and sim[20] > 0.999
    assert (dup_of >= 0).sum() == 2
    # a target above the distinct count re-admits duplicates instead of failing
    res = curate.select_subset(x.copy(), hashes, 49, mode="flat", backend="faiss", seed=0, iters=5)
    assert res.readmitted == 1 and len(res.selection.arrays()[0]) == 49


def test_allocate_is_proportional_with_one_each():
    q = curate.allocate(np.array([1000, 10, 0, 90, 1]), 100)
    assert q.sum() == 100 and q[2] == 0 and q[1] >= 1 and q[4] == 1
    assert q[0] > 8 * q[3] / 2 and q[0] <= 1000
    assert list(curate.allocate(np.array([3, 3, 3]), 9)) == [3, 3, 3]
    assert list(curate.allocate(np.array([5, 1]), 2)) == [1, 1]


def test_compact_rows_in_place():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    keep = np.array([0, 3, 4, 9])
    expect = x[keep].copy()
    assert np.array_equal(curate.compact_rows(x, keep, block=3), expect)


# ----------------------------------------------------------------------------------------------
# open_clip loader
# ----------------------------------------------------------------------------------------------
def test_load_clip_zoo_folder_and_registered_name_with_safetensors(zoo, tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from onereward_cli.models.clip import encode_images, load_clip

    m1, pre, tok = load_clip("zoo:open-clip")
    m2, _, _ = load_clip(str(Path(zoo) / "open-clip"))
    px = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        e1 = encode_images(m1, px)
        assert torch.allclose(e1, encode_images(m2, px))
        assert torch.allclose(e1.norm(dim=-1), torch.ones(2))
    assert tok(["a red circle"]).shape[0] == 1
    # a named architecture + a pretrained .safetensors file goes through create_model_and_transforms
    cfg = json.loads((Path(zoo) / "open-clip/open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "onereward-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "onereward-test-tiny.json")
    save_file({k: v.contiguous() for k, v in m1.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m3, _, _ = load_clip("onereward-test-tiny", str(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.allclose(e1, encode_images(m3, px), atol=1e-6)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="only .safetensors"):
        load_clip("onereward-test-tiny", str(tmp_path / "w.bin"))
    with pytest.raises(InputError, match="unknown open_clip model"):
        load_clip("No-Such-Model")


@needs_faiss
def test_dedup_cells_split_dense_regions(monkeypatch):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((1, 16)) + 0.05 * rng.standard_normal((3000, 16))
    x = np.concatenate([dense, rng.standard_normal((1000, 16))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    real_kmeans = curate.kmeans

    def lopsided_first_partition(xs, k, **kw):  # one centroid for the whole dense region
        if len(xs) == len(x):
            return np.concatenate([x[:1], x[3000:3000 + k - 1]])
        return real_kmeans(xs, k, **kw)

    monkeypatch.setattr(curate, "kmeans", lopsided_first_partition)
    cells = curate.dedup_cells(x, seed=0, backend="faiss")
    assert np.bincount(cells).max() <= 4 * np.ceil(np.sqrt(len(x)))

"""`onereward curate`: CLIP image embeddings + K-means -> a diverse, representative subset (paper §5.1).

Pipeline (each step's output is a file, so a killed run resumes):
  1. list     POOL is an image folder (recursive) or a JSONL manifest ("path", optional "id",
              "caption", "objects"). A target larger than the listing fails here, before any work.
  2. embed    open_clip image embeddings, L2-normalised, written in shards of `curate.shard_size`
              inputs (embeddings/shard-NNNNNN.safetensors, each atomic and stamped with a fingerprint
              of pool listing + model + preprocessing). Finished shards are never recomputed; a changed
              pool or model invalidates them. Unusable files (zero-byte, not an image, truncated,
              corrupt, unreadable, missing, too small) are recorded with a reason and skipped.
              Under `accelerate launch`/torchrun, shard i belongs to rank i % WORLD_SIZE; rank 0 waits
              for every shard on the shared output folder, then does steps 3-5 alone.
  3. dedup    identical pixels (hash) and near-duplicates (cosine >= curate.dedup_threshold, found
              inside the cells of a cheap coarse partition) keep only their first occurrence.
  4. select   flat: K-means with k = target, the member nearest each centroid (the paper's reading).
              hierarchical: K-means tree; quotas per cluster proportional to its size (>= 1 each),
              recursing until a cluster's quota is <= curate.leaf_quota, then flat selection inside it.
  5. write    curated.jsonl, rejected.jsonl, centroids.safetensors, run.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import RunManifest, read_jsonl, remove_stale_temps, save_tensors, write_json, write_jsonl
from .errors import InputError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PASSTHROUGH = ("caption", "objects")
SHARD_FORMAT = "1"
# Signatures of formats PIL reads: a file that starts like an image but cannot be parsed is damaged.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")

# Test hook: called after each shard file is written (tests raise from it to simulate a kill).
_after_shard_written = None


# ----------------------------------------------------------------------------------------------
# 1. The pool listing
# ----------------------------------------------------------------------------------------------
@dataclass
class Pool:
    ids: list[str]
    paths: list[str]  # absolute
    extras: dict[int, dict] = field(default_factory=dict)  # position -> passthrough fields
    ignored: list[str] = field(default_factory=list)  # folder files without an image extension
    source: str = ""

    def __len__(self):
        return len(self.ids)


def list_pool(pool, exclude=None) -> Pool:
    """Folder (sorted recursive walk, hidden entries skipped) or JSONL manifest -> Pool."""
    pool = Path(pool)
    if not pool.exists():
        raise InputError("pool not found", path=pool)
    if pool.is_dir():
        return _list_folder(pool, Path(exclude).resolve() if exclude else None)
    if pool.suffix.lower() != ".jsonl":
        raise InputError("POOL must be an image folder or a .jsonl manifest", path=pool)
    return _list_manifest(pool)


def _list_folder(root: Path, exclude: Path | None) -> Pool:
    ids, paths, ignored = [], [], []
    root = root.resolve()
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and Path(d, x).resolve() != exclude)
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(d, name)
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() in IMAGE_EXTS:
                ids.append(rel)
                paths.append(str(p))
            else:
                ignored.append(rel)
    return Pool(ids, paths, ignored=ignored, source=str(root))


def _list_manifest(path: Path) -> Pool:
    schema = {"path": (str, True), "id": ((str, int), False), "caption": (str, False), "objects": (list, False)}
    recs = read_jsonl(path, schema)
    base = path.resolve().parent
    ids, paths, extras, seen = [], [], {}, {}
    for i, rec in enumerate(recs):
        if not rec["path"].strip():
            raise InputError("empty path", path=path, line=rec["_line"], field="path")
        rid = str(rec.get("id") if rec.get("id") is not None else rec["path"])
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} (first on line {seen[rid]})", path=path, line=rec["_line"],
                             field="id")
        seen[rid] = rec["_line"]
        p = Path(rec["path"])
        ids.append(rid)
        paths.append(str(p if p.is_absolute() else base / p))
        extra = {k: rec[k] for k in PASSTHROUGH if rec.get(k) is not None}
        if extra:
            extras[i] = extra
    return Pool(ids, paths, extras, source=str(path.resolve()))


def listing_hash(pool: Pool) -> str:
    h = hashlib.sha256()
    for i, p in zip(pool.ids, pool.paths):
        h.update(f"{i}\t{p}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# 2a. Decoding with honest reasons
# ----------------------------------------------------------------------------------------------
def check_image(path: str, min_size: int, draft: int | None = None):
    """Open and fully decode one file. Returns (RGB image, None, "") or (None, reason, detail)."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None, "missing", "file not found"
    except OSError as e:
        return None, "unreadable", f"{e.__class__.__name__}: {e}"
    if size == 0:
        return None, "zero-byte", ""
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        reason = _unidentified_reason(path)
        return None, reason, ("starts like an image but its header cannot be parsed (cut short or damaged)"
                              if reason == "corrupt" else "PIL cannot identify the format")
    except Image.DecompressionBombError as e:
        return None, "too large", str(e)
    except OSError as e:
        return None, "unreadable", f"{e.__class__.__name__}: {e}"
    with im:
        w, h = im.size
        if min(w, h) < min_size:
            return None, "too small", f"{w}x{h} < curate.min_size {min_size}"
        try:
            if draft:  # JPEG: decode at a reduced scale that still covers the model's input size
                im.draft("RGB", (draft, draft))
            im.load()
            rgb = im.convert("RGB")
        except Image.DecompressionBombError as e:
            return None, "too large", str(e)
        except (OSError, EOFError, SyntaxError, ValueError) as e:
            msg = str(e)
            reason = "truncated" if ("truncated" in msg or isinstance(e, EOFError)) else "corrupt"
            return None, reason, f"{e.__class__.__name__}: {msg}"
    return rgb, None, ""


def _unidentified_reason(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return "unreadable"
    return "corrupt" if head.startswith(_MAGIC) else "not an image"


def pixel_hash(im) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{im.size}".encode())
    h.update(im.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


class _DecodeSet:
    """torch Dataset over pool positions: decoding (the slow part) runs in DataLoader workers."""

    def __init__(self, paths, preprocess, min_size, draft):
        self.paths, self.preprocess, self.min_size, self.draft = paths, preprocess, min_size, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, pos):
        im, reason, detail = check_image(self.paths[pos], self.min_size, self.draft)
        if im is None:
            return pos, None, 0, reason, detail
        try:
            return pos, self.preprocess(im), pixel_hash(im), None, ""
        except Exception as e:  # noqa: BLE001 - a file PIL decodes but the transform rejects
            return pos, None, 0, "corrupt", f"preprocess failed: {e.__class__.__name__}: {e}"


def _collate(items):
    import torch

    ok = [x for x in items if x[1] is not None]
    return {
        "positions": [x[0] for x in ok],
        "pixels": torch.stack([x[1] for x in ok]) if ok else None,
        "hashes": [x[2] for x in ok],
        "rejects": [[x[0], x[3], x[4]] for x in items if x[1] is None],
        "last": max(x[0] for x in items),
    }


# ----------------------------------------------------------------------------------------------
# 2b. Embedding shards
# ----------------------------------------------------------------------------------------------
def shard_path(emb_dir: Path, i: int) -> Path:
    return emb_dir / f"shard-{i:06d}.safetensors"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def read_shard_meta(path: Path) -> dict | None:
    """The shard's metadata, or None when the file is absent or unreadable (then it is recomputed)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a damaged shard is just work to redo
        return None


def shard_is_done(path: Path, fingerprint: str, start: int, stop: int) -> bool:
    m = read_shard_meta(path)
    return bool(m) and m.get("fingerprint") == fingerprint and m.get("start") == str(start) \
        and m.get("stop") == str(stop)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables accelerate launch / torchrun set. No process
    group is needed: ranks share work through shard files only."""
    rank = int(os.environ.get("RANK", os.environ.get("PROCESS_ID", 0)) or 0)
    world = int(os.environ.get("WORLD_SIZE", 1) or 1)
    local = int(os.environ.get("LOCAL_RANK", 0) or 0)
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}", field="RANK")
    return rank, world, local


def pick_device(r, local_rank: int) -> str:
    import torch

    if r.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"  # more ranks than GPUs share them
    return "cpu" if r.device == "auto" else r.device


def embed_fingerprint(r, pool: Pool, preprocess) -> str:
    from .models.clip import clip_identity

    doc = {"format": SHARD_FORMAT, "listing": listing_hash(pool), "n": len(pool),
           "clip": clip_identity(r.models.clip, r.models.clip_pretrained), "preprocess": repr(preprocess),
           "min_size": r.curate.min_size, "shard_size": r.curate.shard_size, "dtype": r.dtype}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def embed_pool(r, pool: Pool, emb_dir: Path, *, rank: int = 0, world: int = 1, device: str = "cpu",
               console=None) -> dict:
    """Write every shard this rank owns that is not already done. Returns stats for run.json."""
    import torch

    from .models.clip import encode_images, image_size, load_clip

    c = r.curate
    model, preprocess, _ = load_clip(r.models.clip, r.models.clip_pretrained, device=device)
    fp = embed_fingerprint(r, pool, preprocess)
    ranges = shard_ranges(len(pool), c.shard_size)
    mine = [i for i in range(len(ranges)) if i % world == rank]
    todo = [i for i in mine if not shard_is_done(shard_path(emb_dir, i), fp, *ranges[i])]
    if rank == 0:  # shards of a larger, older pool
        for p in emb_dir.glob("shard-*.safetensors"):
            if int(p.stem.split("-")[1]) >= len(ranges):
                p.unlink(missing_ok=True)
    if world == 1:  # temp files of a write that was killed (other ranks may be writing theirs now)
        for p in emb_dir.glob(".shard-*"):
            p.unlink(missing_ok=True)
    stats = {"fingerprint": fp, "shards": len(ranges), "shards_reused": len(mine) - len(todo),
             "shards_computed": 0, "images_embedded": 0, "embed_seconds": 0.0}
    with torch.inference_mode():
        dim = int(encode_images(model, torch.zeros(1, 3, image_size(preprocess), image_size(preprocess),
                                                   device=device)).shape[-1])
    stats["dim"] = dim
    if not todo:
        return stats
    batches = [list(range(s, min(s + c.batch_size, ranges[i][1])))
               for i in todo for s in range(ranges[i][0], ranges[i][1], c.batch_size)]
    dataset = _DecodeSet(pool.paths, preprocess, c.min_size, image_size(preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,
                                         num_workers=c.num_workers, pin_memory=device.startswith("cuda"))
    autocast = device.startswith("cuda") and r.dtype != "float32"
    amp_dtype = torch.bfloat16 if r.dtype == "bfloat16" else torch.float16
    acc = {}
    n_images = sum(ranges[i][1] - ranges[i][0] for i in todo)
    t0 = time.perf_counter()
    with _progress(console) as prog, torch.inference_mode():
        task = prog.add_task(f"embed (rank {rank}/{world})" if world > 1 else "embed", total=n_images)
        for b in loader:
            shard = b["last"] // c.shard_size
            a = acc.setdefault(shard, {"emb": [], "pos": [], "hash": [], "rejects": []})
            if b["pixels"] is not None:
                with torch.autocast("cuda", dtype=amp_dtype, enabled=autocast):
                    a["emb"].append(encode_images(model, b["pixels"].to(device, non_blocking=True)).cpu())
                a["pos"] += b["positions"]
                a["hash"] += b["hashes"]
            a["rejects"] += b["rejects"]
            prog.advance(task, len(b["positions"]) + len(b["rejects"]))
            if b["last"] == ranges[shard][1] - 1:
                _write_shard(emb_dir, shard, ranges[shard], fp, acc.pop(shard), dim)
                stats["shards_computed"] += 1
                if _after_shard_written is not None:
                    _after_shard_written(shard)
    stats["images_embedded"] = n_images
    stats["embed_seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def _write_shard(emb_dir, i, rng, fp, a, dim):
    import torch

    emb = torch.cat(a["emb"]) if a["emb"] else torch.zeros(0, dim)
    meta = {"fingerprint": fp, "start": str(rng[0]), "stop": str(rng[1]), "count": str(len(a["pos"])),
            "rejects": json.dumps(a["rejects"]), "format": SHARD_FORMAT}
    save_tensors(shard_path(emb_dir, i), {"embeddings": emb.float().contiguous(),
                                          "positions": torch.tensor(a["pos"], dtype=torch.int64),
                                          "pixel_hash": torch.tensor(a["hash"], dtype=torch.int64)}, meta)


def wait_for_shards(emb_dir: Path, fp: str, ranges, timeout_s: float, console=None):
    """Rank 0's barrier: every shard on the shared folder, written under this fingerprint. It is
    file-based, so it spans nodes and never hits a collective timeout while other ranks embed; it
    gives up only when no new shard appeared for `timeout_s` (a rank died without the launcher
    stopping the job)."""
    pending = set(range(len(ranges)))
    last_progress = time.monotonic()
    with _progress(console) as prog:
        task = prog.add_task("waiting for other ranks' shards", total=len(ranges))
        while True:
            done = {i for i in pending if shard_is_done(shard_path(emb_dir, i), fp, *ranges[i])}
            if done:
                pending -= done
                last_progress = time.monotonic()
                prog.update(task, completed=len(ranges) - len(pending))
            if not pending:
                return
            if time.monotonic() - last_progress > timeout_s:
                missing = ", ".join(shard_path(emb_dir, i).name for i in sorted(pending)[:5])
                raise InputError(f"no new shard for {timeout_s:.0f} s; missing {len(pending)} ({missing}...). "
                                 "Re-run (single process is fine): finished shards are kept.",
                                 path=emb_dir, field="curate.rank_timeout_s")
            time.sleep(1.0)


@dataclass
class Embeddings:
    x: np.ndarray  # [n_ok, d] float32, rows in pool order
    positions: np.ndarray  # [n_ok] pool position of each row
    hashes: np.ndarray  # [n_ok] pixel hash
    rejects: list  # [pos, reason, detail]


def load_embeddings(emb_dir: Path, fp: str, n_shards: int) -> Embeddings:
    """Concatenate the shards into one preallocated array (no second copy at pool scale)."""
    from safetensors import safe_open

    metas = []
    for i in range(n_shards):
        m = read_shard_meta(shard_path(emb_dir, i))
        if m is None or m.get("fingerprint") != fp:
            raise InputError("shard missing or from another run", path=shard_path(emb_dir, i))
        metas.append(m)
    n = sum(int(m["count"]) for m in metas)
    dim = None
    x = positions = hashes = None
    rejects, row = [], 0
    for i, m in enumerate(metas):
        with safe_open(str(shard_path(emb_dir, i)), "np") as f:
            if dim is None:
                dim = f.get_slice("embeddings").get_shape()[1]
                x = np.empty((n, dim), dtype=np.float32)
                positions, hashes = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
            k = int(m["count"])
            if k:
                x[row:row + k] = f.get_tensor("embeddings")
                positions[row:row + k] = f.get_tensor("positions")
                hashes[row:row + k] = f.get_tensor("pixel_hash")
        rejects += json.loads(m["rejects"])
        row += k
    return Embeddings(x, positions, hashes, rejects)


def write_index(emb_dir: Path, fp: str, r, pool: Pool, ranges, dim: int):
    shards = []
    for i, (s, e) in enumerate(ranges):
        m = read_shard_meta(shard_path(emb_dir, i)) or {}
        done = m.get("fingerprint") == fp
        shards.append({"file": shard_path(emb_dir, i).name, "start": s, "stop": e,
                       "first_id": pool.ids[s], "last_id": pool.ids[e - 1], "done": done,
                       "embedded": int(m["count"]) if done else None,
                       "rejected": len(json.loads(m["rejects"])) if done else None})
    write_json(emb_dir / "index.json", {
        "fingerprint": fp, "model": r.models.clip, "pretrained": r.models.clip_pretrained, "dim": dim,
        "normalised": True, "n_inputs": len(pool), "shard_size": r.curate.shard_size,
        "inputs": "inputs.jsonl (line i = pool position i)", "complete": all(s["done"] for s in shards),
        "shards": shards})


def write_inputs(emb_dir: Path, fp: str, pool: Pool):
    """Pool position -> id/path, so the shard tensors (which store positions) are usable alone."""
    stamp = emb_dir / "inputs.fingerprint"
    if stamp.exists() and stamp.read_text().strip() == fp and (emb_dir / "inputs.jsonl").exists():
        return
    write_jsonl(emb_dir / "inputs.jsonl", ({"id": i, "path": p} for i, p in zip(pool.ids, pool.paths)))
    from .artifacts import write_text

    write_text(stamp, fp + "\n")


# ----------------------------------------------------------------------------------------------
# 3. Duplicates
# ----------------------------------------------------------------------------------------------
def find_duplicates(x: np.ndarray, hashes: np.ndarray, threshold: float, cells: np.ndarray,
                    block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Rows that repeat an earlier row: identical pixels anywhere, or cosine >= threshold with an
    earlier kept row of the same partition cell. Returns (duplicate_of [n] (-1 = kept), similarity)."""
    n = len(x)
    dup_of = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float32)
    # identical pixels: the first row with a hash is the representative
    order = np.argsort(hashes, kind="stable")
    hs = hashes[order]
    starts = np.r_[True, hs[1:] != hs[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
    same = first != order
    dup_of[order[same]] = first[same]
    sim[order[same]] = 1.0
    # near duplicates inside each cell (rows of a cell stay in pool order: stable sort)
    by_cell = np.argsort(cells, kind="stable")
    bounds = np.flatnonzero(np.r_[True, cells[by_cell][1:] != cells[by_cell][:-1], True])
    groups = [by_cell[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    small = 1.5e9 / x.shape[1]  # n^2 below this: BLAS threads cost more than they save
    with _blas_threads(1):
        for idx in (g for g in groups if len(g) ** 2 < small):
            _near_duplicates_in_cell(x, idx[dup_of[idx] < 0], threshold, dup_of, sim, block)
    for idx in (g for g in groups if len(g) ** 2 >= small):
        _near_duplicates_in_cell(x, idx[dup_of[idx] < 0], threshold, dup_of, sim, block)
    return dup_of, sim


def _near_duplicates_in_cell(x, idx, threshold, dup_of, sim, block):
    if len(idx) < 2:
        return
    xc = x[idx]
    nbrs: dict[int, list[tuple[int, float]]] = {}
    block = int(max(64, min(block, 2.5e7 // len(idx))))  # keep the similarity block near 100 MB
    for s in range(1, len(idx), block):
        e = min(s + block, len(idx))
        s_mat = xc[s:e] @ xc[:e].T  # each row against every earlier row
        rows, cols = np.nonzero(s_mat >= threshold - 1e-6)
        keep = cols < rows + s
        for i, j in zip(rows[keep] + s, cols[keep]):
            nbrs.setdefault(int(i), []).append((int(j), float(s_mat[i - s, j])))
    if not nbrs:
        return
    kept = np.ones(len(idx), dtype=bool)
    for i in sorted(nbrs):  # greedy in pool order: a row is dropped if it repeats a kept row
        for j, s_ij in nbrs[i]:
            if kept[j]:
                kept[i] = False
                dup_of[idx[i]] = idx[j]
                sim[idx[i]] = s_ij
                break


# ----------------------------------------------------------------------------------------------
# 4. K-means backends (spherical: centroids are unit vectors, similarity is the dot product)
# ----------------------------------------------------------------------------------------------
def resolve_backend(name: str) -> str:
    if name == "sklearn":
        return "sklearn"
    try:
        import faiss  # noqa: F401
        return "faiss"
    except ImportError:
        if name == "faiss":
            raise InputError("faiss is not installed (pip install faiss-cpu)", field="curate.backend") from None
        return "sklearn"


@contextlib.contextmanager
def _threads_for(flops: float, backend: str):
    """One thread for small problems: a hierarchical run makes thousands of small K-means calls, and
    there OpenMP start-up and barrier waits (very long on a busy machine) cost more than the maths."""
    if flops >= 2e9:
        yield
        return
    if backend == "faiss":
        import faiss

        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)
    else:
        with _blas_threads(1):
            yield


_CONTROLLER = None


def _blas_threads(n: int):
    """threadpoolctl limit with a cached controller: building one scans the loaded libraries (~15 ms),
    too slow to repeat for each of thousands of leaf clusters."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n)


def kmeans(x: np.ndarray, k: int, *, iters: int, seed: int, backend: str,
           max_points_per_centroid: int = 256, plusplus: bool = True) -> np.ndarray:
    """k unit-norm centroids for the rows of x (k < len(x)), seeded with k-means++ unless told not to."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    work = 2.0 * min(len(x), max_points_per_centroid * k) * k * x.shape[1] * iters
    with _threads_for(work, backend):
        return _kmeans(x, k, iters=iters, seed=seed, backend=backend,
                       max_points_per_centroid=max_points_per_centroid, plusplus=plusplus)


def _kmeans(x, k, *, iters, seed, backend, max_points_per_centroid, plusplus):
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
        km.train(x, init_centroids=kmeans_plusplus(x, k, seed) if plusplus else None)
        c = km.centroids
    else:
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if len(x) > max_points_per_centroid * k:  # subsample like faiss does: centroids need ~256 points
            rng = np.random.default_rng(seed)
            x = x[np.sort(rng.choice(len(x), max_points_per_centroid * k, replace=False))]
        # Our k-means++ seeds for both backends: same seeding rule, and sklearn's own greedy variant
        # upcasts float32 to float64 and dominated the run time (~90% of a hierarchical run).
        init = kmeans_plusplus(x, k, seed) if plusplus else "random"
        if len(x) * k > 2e8:  # full Lloyd over a big pool is out of reach on CPU; mini-batches are not
            km = MiniBatchKMeans(n_clusters=k, batch_size=max(4096, 3 * k), n_init=1, max_iter=iters,
                                 random_state=seed, init=init)
        else:
            km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed, init=init)
        c = km.fit(x).cluster_centers_.astype(np.float32)
    return _unit(c)


def kmeans_plusplus(x: np.ndarray, k: int, seed: int, sample_per_centroid: int = 64) -> np.ndarray:
    """k-means++ seeding (on a subsample of <= 64 rows per centroid). faiss starts from random rows;
    spreading the seeds first gives a measurably better selection (see BENCHMARKS.md)."""
    rng = np.random.default_rng(seed)
    if len(x) > sample_per_centroid * k:
        x = x[np.sort(rng.choice(len(x), sample_per_centroid * k, replace=False))]
    with _blas_threads(1):  # k sequential mat-vec products: threads only add synchronisation
        return _plusplus_picks(x, k, rng)


def _plusplus_picks(x, k, rng):
    picks = [int(rng.integers(len(x)))]
    d2 = np.maximum(2.0 - 2.0 * (x @ x[picks[0]]), 0.0).astype(np.float64)  # unit rows: |a-b|^2 = 2-2a.b
    for _ in range(1, k):
        cum = np.cumsum(d2)
        j = int(np.searchsorted(cum, rng.random() * cum[-1], side="right")) if cum[-1] > 0 \
            else int(rng.integers(len(x)))
        picks.append(min(j, len(x) - 1))
        np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[j]), 0.0), out=d2)
    return np.ascontiguousarray(x[picks])


def assign(x: np.ndarray, c: np.ndarray, backend: str, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine for each row: (labels int64, similarity float32)."""
    with _threads_for(2.0 * len(x) * len(c) * x.shape[1], backend):
        return _assign(x, c, backend, block)


def _assign(x, c, backend, block):
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(c.shape[1])
        index.add(np.ascontiguousarray(c, dtype=np.float32))
        labels = np.empty(len(x), dtype=np.int64)
        sims = np.empty(len(x), dtype=np.float32)
        for s in range(0, len(x), block * 4):
            d, i = index.search(np.ascontiguousarray(x[s:s + block * 4]), 1)
            labels[s:s + len(i)], sims[s:s + len(i)] = i[:, 0], d[:, 0]
        return labels, sims
    labels = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), block):
        m = x[s:s + block] @ c.T
        labels[s:s + len(m)] = m.argmax(1)
        sims[s:s + len(m)] = m[np.arange(len(m)), labels[s:s + len(m)]]
    return labels, sims


def _unit(c: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.maximum(n, 1e-12)).astype(np.float32)


def group_seed(seed: int, *path: int) -> int:
    h = hashlib.blake2b(repr((seed,) + path).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# 5. Selection
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    rows: list = field(default_factory=list)  # row indices into x (arrays, concatenated at the end)
    cluster: list = field(default_factory=list)
    distance: list = field(default_factory=list)
    rank: list = field(default_factory=list)
    coarse: list = field(default_factory=list)
    centroids: list = field(default_factory=list)  # [k_i, d] blocks; global cluster id = running offset
    sizes: list = field(default_factory=list)
    n_clusters: int = 0

    def arrays(self):
        cat = (lambda v, dt: np.concatenate(v).astype(dt) if v else np.zeros(0, dt))
        return (cat(self.rows, np.int64), cat(self.cluster, np.int64), cat(self.distance, np.float32),
                cat(self.rank, np.int64), cat(self.coarse, np.int64))


def pick_in_group(x, rows, quota, *, sel: Selection, coarse: int, seed: int, backend: str, iters: int):
    """Flat selection inside one group: K-means with k = quota, then the member nearest each
    centroid. Centroids left without members (rare) are replaced by the best-ranked leftovers."""
    xg = x[rows]
    n = len(rows)
    if quota >= n:  # every member is picked and is its own cluster
        sel.rows.append(rows)
        sel.cluster.append(sel.n_clusters + np.arange(n))
        sel.distance.append(np.zeros(n))
        sel.rank.append(np.zeros(n))
        sel.coarse.append(np.full(n, coarse))
        sel.centroids.append(xg)
        sel.sizes.append(np.ones(n))
        sel.n_clusters += n
        return
    c = kmeans(xg, quota, iters=iters, seed=seed, backend=backend)
    labels, sims = assign(xg, c, backend)
    order = np.lexsort((np.arange(n), -sims, labels))  # by cluster, most central first
    sizes = np.bincount(labels, minlength=quota)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    picked = np.flatnonzero(rank == 0)
    if len(picked) < quota:
        rest = np.flatnonzero(rank > 0)
        rest = rest[np.lexsort((rest, -sims[rest], -sizes[labels[rest]], rank[rest]))]
        picked = np.sort(np.r_[picked, rest[:quota - len(picked)]])
    sel.rows.append(rows[picked])
    sel.cluster.append(sel.n_clusters + labels[picked])
    sel.distance.append(1.0 - sims[picked])
    sel.rank.append(rank[picked])
    sel.coarse.append(np.full(len(picked), coarse))
    sel.centroids.append(c)
    sel.sizes.append(sizes)
    sel.n_clusters += quota


def allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Quotas proportional to cluster size, at least one per non-empty cluster, summing to total
    (largest remainder; ties to the lower index). Needs #non-empty <= total <= sum(sizes)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    nonempty = sizes > 0
    q = nonempty.astype(np.int64)
    spare, room = total - int(q.sum()), np.where(nonempty, sizes - 1, 0)
    if spare <= 0 or room.sum() == 0:
        return q
    share = room * (spare / room.sum())
    base = np.minimum(np.floor(share).astype(np.int64), room)
    left = spare - int(base.sum())
    frac = np.where(base < room, share - base, -1.0)
    top = np.lexsort((np.arange(len(sizes)), -frac))[:left]
    base[top] += 1
    return q + base


def select_flat(x, quota, *, seed, backend, iters, progress=None) -> Selection:
    sel = Selection()
    pick_in_group(x, np.arange(len(x)), quota, sel=sel, coarse=0, seed=group_seed(seed, 0), backend=backend,
                  iters=iters)
    if progress:
        progress(quota)
    return sel


def select_hierarchical(x, quota, *, seed, backend, iters, coarse_clusters=0, leaf_quota=64,
                        progress=None) -> tuple[Selection, np.ndarray]:
    """Level 1: k1 = coarse_clusters (0 = ceil(sqrt(quota))) clusters over the whole pool, quotas
    proportional to size; below, a cluster whose quota exceeds leaf_quota is split again into
    ceil(sqrt(quota)) clusters; a leaf is selected flat. Returns (selection, level-1 centroids)."""
    sel = Selection()
    n = len(x)
    k1 = coarse_clusters or math.ceil(math.sqrt(quota))
    k1 = max(1, min(k1, quota, n))
    if k1 == 1 or quota >= n:
        c1 = _unit(x.mean(0, keepdims=True))
        labels = np.zeros(n, dtype=np.int64)
    else:
        c1 = kmeans(x, k1, iters=iters, seed=group_seed(seed, 1), backend=backend)
        labels, _ = assign(x, c1, backend)
    for cid, rows, q in _split(labels, k1, np.arange(n), quota):
        _descend(x, rows, q, sel=sel, coarse=cid, path=(1, cid), seed=seed, backend=backend, iters=iters,
                 leaf_quota=leaf_quota, progress=progress)
    return sel, c1


def _split(labels, k, rows, quota):
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=k)
    quotas = allocate(sizes, quota)
    bounds = np.r_[0, np.cumsum(sizes)]
    for cid in range(k):
        if quotas[cid] > 0:
            yield cid, rows[order[bounds[cid]:bounds[cid + 1]]], int(quotas[cid])


def _descend(x, rows, q, *, sel, coarse, path, seed, backend, iters, leaf_quota, progress):
    if q <= leaf_quota or q >= len(rows):
        pick_in_group(x, rows, q, sel=sel, coarse=coarse, seed=group_seed(seed, *path), backend=backend,
                      iters=iters)
        if progress:
            progress(q)
        return
    b = math.ceil(math.sqrt(q))
    c = kmeans(x[rows], b, iters=iters, seed=group_seed(seed, *path), backend=backend)
    labels, _ = assign(x[rows], c, backend)
    for cid, sub, sq in _split(labels, b, rows, q):
        _descend(x, sub, sq, sel=sel, coarse=coarse, path=path + (cid,), seed=seed, backend=backend,
                 iters=iters, leaf_quota=leaf_quota, progress=progress)


def dedup_cells(x: np.ndarray, *, seed: int, backend: str) -> np.ndarray:
    """A cheap partition into cells of ~sqrt(n) rows for the near-duplicate search: near-duplicates
    are within ~0.1 of each other, so they almost always share a cell, and comparing all pairs inside
    cells costs ~n*sqrt(n)*d instead of n^2*d. Cells over 4x the target (dense regions of real
    pools) are split again, since their cost grows with the square of their size."""
    n = len(x)
    target = max(8, math.ceil(math.sqrt(n)))
    k = int(min(math.ceil(n / target), n // 8))
    if k < 2:
        return np.zeros(n, dtype=np.int64)
    c = kmeans(x, k, iters=8, seed=group_seed(seed, 0xDED), backend=backend, max_points_per_centroid=64,
               plusplus=False)
    labels = assign(x, c, backend)[0]
    for depth in range(3):
        sizes = np.bincount(labels)
        big = np.flatnonzero(sizes > 4 * target)
        if not len(big):
            break
        order = np.argsort(labels, kind="stable")
        starts = np.r_[0, np.cumsum(sizes)]
        next_label = len(sizes)
        for cell in big:
            rows = order[starts[cell]:starts[cell + 1]]
            kk = math.ceil(len(rows) / target)
            cc = kmeans(x[rows], kk, iters=8, seed=group_seed(seed, 0xDED, depth, int(cell)), backend=backend,
                        max_points_per_centroid=64, plusplus=False)
            sub = assign(x[rows], cc, backend)[0]
            labels[rows] = np.where(sub == 0, cell, next_label + sub - 1)
            next_label += kk - 1
    return labels


@dataclass
class SubsetResult:
    selection: Selection
    coarse: np.ndarray | None  # level-1 centroids (hierarchical)
    dup_of: np.ndarray  # per input row: row it duplicates, -1 if kept
    dup_sim: np.ndarray
    distinct: np.ndarray  # input rows that took part in clustering; selection.rows index into these
    n_distinct: int
    readmitted: int
    dedup_seconds: float


def select_subset(x: np.ndarray, hashes: np.ndarray, select: int, *, mode: str, backend: str, seed: int,
                  iters: int, coarse_clusters: int = 0, leaf_quota: int = 64, dedup_threshold: float = 0.995,
                  progress=None) -> SubsetResult:
    """Steps 3-4 on an embedding matrix (rows L2-normalised): drop duplicates, then select.
    Compacts `x` in place (the caller's array is reused to stay within memory at pool scale)."""
    t = time.perf_counter()
    cells = dedup_cells(x, seed=seed, backend=backend)
    dup_of, dup_sim = find_duplicates(x, hashes, dedup_threshold, cells)
    del cells
    distinct = np.flatnonzero(dup_of < 0)
    n_distinct, readmitted = len(distinct), 0
    if select > len(distinct):  # fewer distinct images than asked: duplicates fill the gap, in pool order
        extra = np.flatnonzero(dup_of >= 0)[:select - len(distinct)]
        readmitted = len(extra)
        dup_of[extra] = -1
        distinct = np.flatnonzero(dup_of < 0)
    dedup_seconds = round(time.perf_counter() - t, 4)
    xd = compact_rows(x, distinct)
    if mode == "flat":
        sel, coarse = select_flat(xd, select, seed=seed, backend=backend, iters=iters, progress=progress), None
    else:
        sel, coarse = select_hierarchical(xd, select, seed=seed, backend=backend, iters=iters,
                                          coarse_clusters=coarse_clusters, leaf_quota=leaf_quota,
                                          progress=progress)
    return SubsetResult(sel, coarse, dup_of, dup_sim, distinct, n_distinct, readmitted, dedup_seconds)


def compact_rows(x: np.ndarray, keep: np.ndarray, block: int = 65536) -> np.ndarray:
    """x[keep] for sorted `keep`, written over x itself: a second copy of a pool-scale matrix would
    double peak memory. Safe because keep[i] >= i, so a row is read before it is overwritten."""
    if len(keep) == len(x):
        return x
    for s in range(0, len(keep), block):
        chunk = keep[s:s + block]
        x[s:s + len(chunk)] = x[chunk]
    return x[:len(keep)]


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def _progress(console=None):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f}/s" if task.speed else "-/s", style="cyan")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def run(r, pool, out, select: int):
    """Curate POOL into OUT. Returns OUT/curated.jsonl (None on ranks other than 0)."""
    out = Path(out)
    c = r.curate
    console = _console()
    rank, world, local = dist_env()
    if select <= 0:
        raise InputError(f"--select must be positive, got {select}", field="--select")
    backend = resolve_backend(c.backend)
    t_list = time.perf_counter()
    listing = list_pool(pool, exclude=out)
    if len(listing) == 0:
        extra = f" ({len(listing.ignored)} files without an image extension)" if listing.ignored else ""
        raise InputError(f"empty pool: no images found{extra}", path=pool)
    if select > len(listing):
        raise InputError(f"--select {select} is larger than the pool ({len(listing)} images)", path=pool,
                         field="--select")
    t_list = time.perf_counter() - t_list
    emb_dir = out / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    if world == 1:  # temp files of writes a kill interrupted (with several ranks, others may be writing)
        remove_stale_temps(out)
    if rank == 0:
        for stale in ("curated.jsonl", "centroids.safetensors", "rejected.jsonl", "run.json"):
            (out / stale).unlink(missing_ok=True)
    man = RunManifest("curate", out, r)
    man.data["inputs"] = {"pool": {"path": listing.source, "kind": "folder" if Path(pool).is_dir() else "manifest",
                                   "listed": len(listing), "listing_sha256": listing_hash(listing)}}
    man.data["timings_s"]["list"] = round(t_list, 4)
    device = pick_device(r, local)
    with man.timed("embed"):
        stats = embed_pool(r, listing, emb_dir, rank=rank, world=world, device=device, console=console)
    fp = stats["fingerprint"]
    ranges = shard_ranges(len(listing), c.shard_size)
    if rank != 0:
        console.print(f"curate rank {rank}/{world}: shards done; rank 0 selects")
        return None
    if world > 1:
        with man.timed("wait_for_ranks"):
            wait_for_shards(emb_dir, fp, ranges, c.rank_timeout_s, console)
    write_index(emb_dir, fp, r, listing, ranges, stats["dim"])
    write_inputs(emb_dir, fp, listing)
    emb = load_embeddings(emb_dir, fp, len(ranges))
    rejected = [{"id": listing.ids[p], "path": listing.paths[p], "reason": reason, "detail": detail, "_pos": p}
                for p, reason, detail in sorted(emb.rejects)]
    usable = len(emb.x)
    if select > usable:
        write_jsonl(out / "rejected.jsonl", [_public(d) for d in rejected])
        raise InputError(f"--select {select} is larger than the usable pool: {usable} of {len(listing)} images "
                         f"decode ({len(rejected)} rejected, see {out / 'rejected.jsonl'})", path=pool,
                         field="--select")
    if c.mode == "flat" and usable * select > 2e10:
        console.print(f"[yellow]curate: flat K-means with k={select} on {usable} points is a very long run on "
                      "CPU; curate.mode=hierarchical is made for this scale[/]")
    with man.timed("select"), _progress(console) as prog:
        task = prog.add_task(f"select ({c.mode}, {backend})", total=select)
        res = select_subset(emb.x, emb.hashes, select, mode=c.mode, backend=backend, seed=r.seed,
                            iters=c.kmeans_iters, coarse_clusters=c.coarse_clusters, leaf_quota=c.leaf_quota,
                            dedup_threshold=c.dedup_threshold, progress=lambda k: prog.advance(task, k))
    man.data["timings_s"]["dedup"] = res.dedup_seconds
    if res.readmitted:
        console.print(f"[yellow]curate: only {res.n_distinct} distinct images for --select "
                      f"{select}; {res.readmitted} duplicates are selected too[/]")
    dup_of, dup_sim, distinct, sel, coarse_c = res.dup_of, res.dup_sim, res.distinct, res.selection, res.coarse
    readmitted = res.readmitted
    for row in np.flatnonzero(dup_of >= 0):
        p, q = int(emb.positions[row]), int(emb.positions[dup_of[row]])
        rejected.append({"id": listing.ids[p], "path": listing.paths[p], "reason": f"duplicate of {listing.ids[q]}",
                         "duplicate_of": listing.ids[q], "similarity": round(float(dup_sim[row]), 6), "_pos": p})
    rows, cluster, distance, rank_in, coarse = sel.arrays()
    with man.timed("write"):
        records = _curated_records(listing, emb.positions[distinct[rows]], cluster, distance, rank_in,
                                   coarse if c.mode == "hierarchical" else None)
        tensors = {"centroids": np.concatenate(sel.centroids), "sizes": np.concatenate(sel.sizes).astype(np.int64)}
        if coarse_c is not None:
            tensors["coarse_centroids"] = coarse_c
        _save_np(out / "centroids.safetensors", tensors, {"mode": c.mode, "backend": backend, "seed": str(r.seed)})
        rejected.sort(key=lambda d: d["_pos"])
        write_jsonl(out / "rejected.jsonl", [_public(d) for d in rejected])
        write_jsonl(out / "curated.jsonl", records)
    reasons: dict[str, int] = {}
    for d in rejected:
        key = "duplicate" if "duplicate_of" in d else d["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    man.count(listed=len(listing), ignored_files=len(listing.ignored), embedded=usable, rejected=len(rejected),
              rejected_by_reason=reasons, duplicates_readmitted=readmitted, distinct=len(distinct),
              selected=len(records), clusters=sel.n_clusters)
    man.set(mode=c.mode, backend=backend, device=device, world_size=world, embedding=stats,
            ignored_examples=listing.ignored[:20],
            images_per_second=round(stats["images_embedded"] / stats["embed_seconds"], 2)
            if stats["embed_seconds"] else None)
    man.write()
    ignored = f"; {len(listing.ignored)} non-image files ignored" if listing.ignored else ""
    console.print(f"curate: {len(records)} of {len(listing)} images -> {out / 'curated.jsonl'} "
                  f"({len(rejected)} rejected: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'}"
                  f"{ignored})")
    return out / "curated.jsonl"


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _curated_records(listing: Pool, positions, cluster, distance, rank_in, coarse):
    order = np.argsort(positions, kind="stable")  # pool order
    records = []
    for i in order:
        p = int(positions[i])
        rec = {"id": listing.ids[p], "path": listing.paths[p], "cluster": int(cluster[i]),
               "distance": round(float(max(distance[i], 0.0)), 6), "rank": int(rank_in[i])}
        if coarse is not None:
            rec["coarse_cluster"] = int(coarse[i])
        rec.update(listing.extras.get(p, {}))
        records.append(rec)
    return records


def _save_np(path, arrays: dict, metadata: dict):
    import torch

    save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, metadata)

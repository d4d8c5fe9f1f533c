"""Reading and writing the files stages exchange: JSONL records, safetensors, PNG, run.json.

Every write is atomic (temp file in the same directory, then rename), so a killed stage never
leaves a half-written file. Every JSONL read validates: a bad line raises `file:line: field: problem`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InputError


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual umask permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# What atomic_path's mkstemp leaves when killed (".name.<8 random chars>.ext"), tempfile's default
# ".tmpXXXXXXXX" names, and the ".something.tmp" folders checkpoints are assembled in.
_STALE_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?$|^\.tmp[a-z0-9_]{8}|^\..+\.tmp$")


def remove_stale_temps(root: str | os.PathLike) -> int:
    """Delete the temp files and folders a killed run left under `root` (recursively). Call it only
    when no other process writes there (single-process runs). Returns how many were removed."""
    import shutil

    root = Path(root)
    if not root.is_dir():
        return 0
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if _STALE_TEMP.match(name):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
                n += 1
        for name in filenames:
            if _STALE_TEMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(dirpath) / name)
                n += 1
    return n


def discard_folder(path) -> None:
    """Delete a folder without ever leaving it half-deleted under its name: it is first renamed to a
    temp name (atomic), then removed. A kill in between leaves a temp folder that `remove_stale_temps`
    removes; never a folder that looks complete (its marker file kept) but lacks files."""
    import shutil

    path = Path(path)
    if not path.exists():
        return
    gone = path.with_name(f".{path.name}.discard.tmp")
    shutil.rmtree(gone, ignore_errors=True)
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def check_out_dir(path, field: str = "--out", *, file: bool = False) -> Path:
    """Fail early, naming the option, when `path` cannot become an output folder (or, with file=True,
    an output file): it, or the nearest existing folder above it, is a file or is not writable."""
    path = Path(path)
    if path.exists():
        if file and path.is_dir():
            raise InputError("is a folder, expected a file", path=path, field=field)
        if not file and not path.is_dir():
            raise InputError("exists and is not a folder", path=path, field=field)
    up = path if (path.is_dir() and not file) else path.parent
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise InputError(f"cannot create it: {up} is a file", path=path, field=field)
    if not os.access(up, os.W_OK | os.X_OK):
        raise InputError(f"cannot write there: {up} is not writable", path=path, field=field)
    return path


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int = 2):
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------
def write_jsonl(path, records: Iterable[dict]):
    """Write all records at once, atomically."""
    buf = io.StringIO()
    for r in records:
        buf.write(json.dumps(r, default=_json_default) + "\n")
    write_text(path, buf.getvalue())


def append_jsonl(path, record: dict):
    """Append one record durably. A line is written whole with one write() and fsync'd; readers skip
    a torn last line (see read_jsonl(tolerate_torn_tail=True)), so a kill loses at most that record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        _drop_torn_tail(fd)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the lock


def _lock(fd: int):
    """Serialise appenders in different processes (a no-op where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _drop_torn_tail(fd: int):
    """End the file with a newline before appending. A last line without one is either a record
    written by hand (kept, newline added) or what a killed append left (cut: it is unreadable). Either
    way the next record must not be glued onto it, which would corrupt the middle of the file."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end, chunk, line_start = size, 1 << 16, 0
    while end > 0:
        start = max(0, end - chunk)
        nl = os.pread(fd, end - start, start).rfind(b"\n")
        if nl >= 0:
            line_start = start + nl + 1
            break
        end = start
    try:
        json.loads(os.pread(fd, size - line_start, line_start).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        os.ftruncate(fd, line_start)
    else:
        os.write(fd, b"\n")


# A field spec: name -> (type or tuple of types, required)
Schema = dict[str, tuple[Any, bool]]


def read_utf8(path, field: str | None = None) -> str:
    """A text file's contents, or InputError naming the first line that is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e.__class__.__name__})", path=path, field=field) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError("not UTF-8 text", path=path, line=data[:e.start].count(b"\n") + 1, field=field) from None


def read_jsonl(path, schema: Schema | None = None, *, tolerate_torn_tail: bool = False,
               check: Callable[[dict, int], None] | None = None) -> list[dict]:
    """Read and validate every line. Blank lines are skipped. Raises InputError(file:line: field)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.is_dir():
        raise InputError("is a folder, expected a JSONL file", path=path)
    out = []
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e.__class__.__name__})", path=path) from None
    n = len(raw_lines)
    for i, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if tolerate_torn_tail and i == n:
                break  # no newline after it: an interrupted append; everything before it is intact
            raise InputError(f"malformed JSON ({e.__class__.__name__}: {getattr(e, 'msg', e)})",
                             path=path, line=i) from None
        if not isinstance(rec, dict):
            raise InputError("expected a JSON object", path=path, line=i)
        if schema:
            validate_record(rec, schema, path=path, line=i)
        if check:
            check(rec, i)
        rec["_line"] = i
        out.append(rec)
    return out


def validate_record(rec: dict, schema: Schema, *, path=None, line=None):
    for name, (types, required) in schema.items():
        if name not in rec or rec[name] is None:
            if required:
                raise InputError("missing", path=path, line=line, field=name)
            continue
        v = rec[name]
        if types is float:
            types = (int, float)
        ok = isinstance(v, types) and not (isinstance(v, bool) and types in (int, (int, float)))
        if not ok:
            tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise InputError(f"expected {tn}, got {type(v).__name__} {v!r}", path=path, line=line, field=name)


def strip_meta(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# Tensors (safetensors only: nothing is ever unpickled)
# ----------------------------------------------------------------------------------------------
def save_tensors(path, tensors: dict, metadata: dict[str, str] | None = None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path=path)
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"not a readable safetensors file ({e.__class__.__name__})", path=path) from None


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def save_png(path, image):
    """Save a PIL image (or HxW[x3] uint8 array) as PNG, atomically."""
    from PIL import Image
    import numpy as np

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    write_bytes(path, buf.getvalue())


def open_image(path, *, mode: str = "RGB", where=None, line=None, field="image"):
    """Open and fully decode an image, or raise InputError naming where it was referenced."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}", path=where or path, line=line, field=field)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot decode image {path} ({e.__class__.__name__})", path=where or path,
                         line=line, field=field) from None


# ----------------------------------------------------------------------------------------------
# run.json: how an output directory was made
# ----------------------------------------------------------------------------------------------
_PACKAGES = ("onereward", "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft",
             "safetensors", "open_clip_torch", "scikit-learn", "faiss-cpu", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[p] = metadata.version(p)
    return out


def describe_input(path) -> dict:
    """Size and, for small files, a hash; enough for a reader to tell which input was used."""
    p = Path(path)
    if not p.exists():
        return {"path": str(p), "exists": False}
    if p.is_dir():
        n = sum(1 for _ in p.rglob("*") if _.is_file())
        return {"path": str(p.resolve()), "files": n}
    info = {"path": str(p.resolve()), "bytes": p.stat().st_size}
    if p.stat().st_size <= 64 * 2**20:
        info["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return info


class RunManifest:
    """Collects what a stage did and writes `run.json` into its output directory."""

    def __init__(self, stage: str, out_dir, recipe=None, inputs: dict | None = None, seed: int | None = None):
        self.stage, self.out_dir = stage, Path(out_dir)
        self.data: dict[str, Any] = {
            "stage": stage,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": seed if seed is not None else (recipe.seed if recipe is not None else None),
            "recipe": recipe.to_dict() if recipe is not None else None,
            "recipe_source": getattr(recipe, "source", None),
            "versions": package_versions(),
            "inputs": {k: describe_input(v) for k, v in (inputs or {}).items()},
            "counts": {},
            "timings_s": {},
        }
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.data["timings_s"][name] = round(self.data["timings_s"].get(name, 0.0) + time.perf_counter() - t, 4)

    def count(self, **kv):
        self.data["counts"].update(kv)

    def set(self, **kv):
        self.data.update(kv)

    def write(self):
        self.data["timings_s"]["total"] = round(time.perf_counter() - self._t0, 4)
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(self.out_dir / "run.json", self.data)
        return self.out_dir / "run.json"

"""Training state as safetensors + JSON (nothing pickled), shared by `train-reward` and `rl`."""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import torch

from .errors import InputError


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def names_latest(ckpt_dir, name: str) -> bool:
    """Whether ckpt_dir/latest.json names the checkpoint folder `name` (and it holds its state.json).
    A run resumed at its last step saves that step again; it must keep the folder (it holds exactly
    that state): replacing it would leave latest.json naming nothing between the delete and the rename,
    and a kill there would leave a run that cannot resume."""
    import json

    ckpt_dir = Path(ckpt_dir)
    try:
        return json.loads((ckpt_dir / "latest.json").read_text())["path"] == name and \
            (ckpt_dir / name / "state.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_fingerprint(saved: dict, now: dict, ckpt, may_change) -> None:
    """Refuse a --resume whose settings differ from those the checkpoint was trained with, naming every
    differing key (a section's keys one by one). `may_change`: the keys a resume may change."""
    def flat(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in flat(v).items()})
            else:
                out[k] = v
        return out

    a, b = flat(saved), flat(now)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise InputError(f"cannot resume: {', '.join(diff)} differ from the checkpoint's run (only "
                         f"{', '.join(sorted(may_change))} may change)", path=ckpt)


def lr_factor(step: int, warmup: int, schedule: str = "constant", total: int = 0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup over `warmup` steps,
    then (recipe.LR_SCHEDULES) constant, or a cosine / linear decay reaching 0 just after step `total` - 1."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def make_scheduler(optimizer, warmup: int, schedule: str = "constant", total: int = 0):
    """A LambdaLR over `lr_factor`; its state_dict (the step counter) is JSON, the lambda is rebuilt."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, schedule, total))


def optimizer_to_files(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_files() -> tuple[dict, dict]:
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def rng_from_files(tensors: dict, meta: dict):
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(meta["python"]))
    s = meta["numpy"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x

"""Loading a FLUX.1-Fill pipeline from any spec the CLI accepts.

A spec is a hub id, a local `FluxFillPipeline` folder, `zoo:flux-fill`, or an `rl` output folder
(`policy/` or `ema/`) holding `onereward_policy.json` {"base": <spec>, "kind": "lora" | "transformer"}.
An rl folder is loaded as its base pipeline plus the trained weights, so `generate`, `eval` and any
script see a trained policy through the same call as the base model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..errors import InputError

POLICY_FILE = "onereward_policy.json"
POLICY_KINDS = ("lora", "transformer")


def read_policy_info(path) -> dict:
    """Parse and validate `onereward_policy.json` in an rl output folder."""
    f = Path(path) / POLICY_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read policy description ({e.__class__.__name__})", path=f) from None
    if not isinstance(info, dict):
        raise InputError("expected a JSON object", path=f)
    if not isinstance(info.get("base"), str) or not info["base"]:
        raise InputError("missing base pipeline spec", path=f, field="base")
    if info.get("kind") not in POLICY_KINDS:
        raise InputError(f"must be one of {', '.join(POLICY_KINDS)}, got {info.get('kind')!r}", path=f, field="kind")
    return info


def _looks_like_local_path(spec: str) -> bool:
    # A hub id is "owner/name"; anything else with a separator, a dot prefix or a drive is a path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or Path(spec).exists()


@contextlib.contextmanager
def quiet_loading():
    """Hide the per-component loading bars of diffusers/transformers (our stages draw their own)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _from_pretrained(cls, path: str, where: str, **kw):
    try:
        with quiet_loading():
            return cls.from_pretrained(path, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"cannot load {cls.__name__} from '{path}': {first}", path=where) from None


def load_fill_pipeline(spec: str, *, device="cpu", dtype=torch.float32, base: str | None = None, _depth: int = 0):
    """Load a `FluxFillPipeline` from `spec` (see the module doc) onto `device` in `dtype`.

    `base` overrides the base spec recorded in an rl folder (e.g. when the base moved). A wrong or
    missing spec is an InputError.
    """
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from .tiny import resolve_model_path

    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty model spec", field="policy")
    if _depth > 4:
        raise InputError("policy folders refer to each other in a loop", path=spec)
    path = resolve_model_path(spec.strip())
    local = Path(path).expanduser()
    if local.is_dir() and (local / POLICY_FILE).exists():
        info = read_policy_info(local)
        pipe = load_fill_pipeline(base or info["base"], device=device, dtype=dtype, _depth=_depth + 1)
        if info["kind"] == "lora":
            if not (local / "pytorch_lora_weights.safetensors").exists():
                raise InputError("LoRA policy folder has no pytorch_lora_weights.safetensors", path=local)
            try:
                with quiet_loading():
                    pipe.load_lora_weights(str(local))
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise InputError(f"cannot load LoRA weights: {e.__class__.__name__}: {e}", path=local) from None
        else:
            tr = _from_pretrained(FluxTransformer2DModel, str(local), str(local), dtype=dtype)
            pipe.transformer = tr.to(device)
        return pipe.to(device)
    if local.is_dir():
        if not (local / "model_index.json").exists():
            raise InputError(f"not a FluxFillPipeline folder (no model_index.json) and no {POLICY_FILE}",
                             path=local)
        pipe = _from_pretrained(FluxFillPipeline, str(local), str(local), dtype=dtype)
        return pipe.to(device)
    if _looks_like_local_path(spec):
        raise InputError("model folder not found", path=spec)
    pipe = _from_pretrained(FluxFillPipeline, path, spec, dtype=dtype)  # a hub id (cache or download)
    return pipe.to(device)

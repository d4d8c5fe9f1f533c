"""Loading a FLUX.1-Fill pipeline from any spec the CLI accepts, and the inference settings it carries.

A spec is one of
- a hub id or a local `FluxFillPipeline` folder, or `zoo:flux-fill`;
- an `rl` output folder (`policy/` or `ema/`) holding `onereward_policy.json`
  {"base": <spec>, "kind": "lora" | "transformer", "inference": {...}, "prompts": {...}};
- a transformer-only folder (`FluxTransformer2DModel.save_pretrained`) or a LoRA folder
  (`pytorch_lora_weights.safetensors`), loaded into a base pipeline the caller names;
- a subfolder of a hub repository, `owner/name/sub/folder`, fetched with huggingface_hub and then read
  like a local folder: `bytedance-research/OneReward/flux.1-fill-dev-OneReward-transformer`.
An rl or release folder is loaded as its base pipeline plus the trained weights, so `generate`, `eval`
and any script see a trained policy through the same call as the base model.

A policy's own inference settings (steps, guidance, true CFG, negative prompt, resolution) and fixed
prompts come from its `onereward_policy.json` (written by `rl`) or, for the OneReward release folders,
from the release's README; stages use them unless the recipe overrides them (`resolve_settings`).
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

POLICY_FILE = "onereward_policy.json"
POLICY_KINDS = ("lora", "transformer")
LORA_FILE = "pytorch_lora_weights.safetensors"
SETTING_KEYS = ("steps", "guidance", "true_cfg", "negative_prompt", "resolution")

# The OneReward release (hub repo bytedance-research/OneReward, README and src/examples): every
# folder runs on black-forest-labs/FLUX.1-Fill-dev with FluxFillCFGPipeline at these settings, with
# height/width = the input size (no resolution of its own: the stage's resolution applies).
RELEASE_REPO = "bytedance-research/OneReward"
RELEASE_INFERENCE = {"steps": 50, "guidance": 1.0, "true_cfg": 4.0, "negative_prompt": "nsfw"}
RELEASE_PROMPTS = {"removal": "remove", "extend_no_prompt": "high-definition, perfect composition"}
RELEASE_FOLDERS = {
    "flux.1-fill-dev-OneReward-transformer": {"kind": "transformer"},           # Alg. 1
    "flux.1-fill-dev-OneRewardDynamic-transformer": {"kind": "transformer"},    # Alg. 2
    # The README loads the removal LoRA on top of the Alg. 1 transformer (adapter weight 1.0).
    "flux.1-fill-dev-object-removal-lora": {"kind": "lora", "base": "../flux.1-fill-dev-OneReward-transformer"},
}
_HUB_SUBFOLDER = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w.-]+(?:/[\w.-]+)*)$")


def _check_settings(raw, where, prefix: str) -> dict:
    """A policy file's "inference" block: a subset of SETTING_KEYS with sane values."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError("expected an object", path=where, field=prefix)
    out = {}
    for k, v in raw.items():
        f = f"{prefix}.{k}"
        if k not in SETTING_KEYS:
            raise InputError(f"unknown setting (known: {', '.join(SETTING_KEYS)})", path=where, field=f)
        if v is None:
            continue
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"steps": isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "guidance": num and v >= 0, "true_cfg": num and v >= 1,
              "negative_prompt": isinstance(v, str),
              "resolution": isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 16 == 0}[k]
        if not ok:
            raise InputError(f"bad value {v!r}", path=where, field=f)
        out[k] = float(v) if k in ("guidance", "true_cfg") else v
    return out


def _check_prompts(raw, where) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                            for k, v in raw.items()):
        raise InputError("expected {task: fixed prompt} with non-empty strings", path=where, field="prompts")
    return dict(raw)


def read_policy_info(path) -> dict:
    """Parse and validate `onereward_policy.json` in an rl output folder."""
    f = Path(path) / POLICY_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise InputError(f"cannot read policy description ({e.__class__.__name__})", path=f) from None
    if not isinstance(info, dict):
        raise InputError("expected a JSON object", path=f)
    if not isinstance(info.get("base"), str) or not info["base"]:
        raise InputError("missing base pipeline spec", path=f, field="base")
    if info.get("kind") not in POLICY_KINDS:
        raise InputError(f"must be one of {', '.join(POLICY_KINDS)}, got {info.get('kind')!r}", path=f, field="kind")
    info["inference"] = _check_settings(info.get("inference"), f, "inference")
    info["prompts"] = _check_prompts(info.get("prompts"), f)
    return info


def inference_record(steps, guidance, true_cfg, negative_prompt, resolution, prompts: dict) -> dict:
    """The settings block `rl` writes into onereward_policy.json: what the policy was trained with."""
    return {"inference": {"steps": int(steps), "guidance": float(guidance), "true_cfg": float(true_cfg),
                          "negative_prompt": negative_prompt, "resolution": int(resolution)},
            "prompts": dict(prompts)}


def _looks_like_local_path(spec: str) -> bool:
    # "owner/name" is a hub id and "owner/name/sub/folder" a hub subfolder, unless it exists here.
    return spec.startswith((".", "/", "~")) or "\\" in spec or Path(spec).expanduser().exists()


def hub_subfolder(spec: str) -> tuple[str, str] | None:
    """(repo id, subfolder) for "owner/name/sub/folder" specs that are not local paths, else None."""
    if _looks_like_local_path(spec):
        return None
    m = _HUB_SUBFOLDER.match(spec)
    return (m.group(1), m.group(2)) if m else None


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


def _fetch_subfolder(repo: str, sub: str, spec: str) -> Path:
    """Download (or find in the HF cache) one subfolder of a hub repo; its local path."""
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"])
    except Exception as e:  # noqa: BLE001 - offline, gated, not found, network: all bad input here
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"not a local folder, and cannot fetch subfolder '{sub}' of hub repo '{repo}': {first}",
                         path=spec) from None
    d = Path(root) / sub
    if not d.is_dir():
        raise InputError(f"hub repo '{repo}' has no subfolder '{sub}'", path=spec)
    return d


def _is_transformer_folder(d: Path) -> bool:
    try:
        return json.loads((d / "config.json").read_text()).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or not UTF-8
        return False


def _check_weights(d: Path, kind: str, spec: str):
    """Cheap structure checks (JSON parses, listed components exist, safetensors headers read), so a
    broken folder fails before `eval`/`generate` write anything, not when its turn to load comes."""
    from safetensors import safe_open

    def header(f: Path):
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - any failure means the weights cannot load
            raise InputError(f"not a readable safetensors file ({e.__class__.__name__})", path=f) from None

    if kind == "pipeline":
        try:
            index = json.loads((d / "model_index.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"not valid JSON ({e.__class__.__name__})", path=d / "model_index.json") from None
        if not isinstance(index, dict):
            raise InputError("expected a JSON object", path=d / "model_index.json")
        listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        missing = sorted(k for k in listed | {"transformer", "vae"} if k not in listed or not (d / k).is_dir())
        if missing:
            raise InputError(f"component folder(s) missing: {', '.join(missing)}", path=d / "model_index.json")
        return
    if kind == "lora":
        if (d / LORA_FILE).is_file():
            header(d / LORA_FILE)
        return
    for f in sorted(d.glob("*.safetensors")):
        header(f)


def _relative_spec(spec: str, rel: str) -> str:
    """A sibling named relative to a spec: a path for local specs, "owner/name/other" for hub ones."""
    if hub_subfolder(spec):
        return posixpath.normpath(posixpath.join(spec, rel))
    return str((Path(spec).expanduser() / rel).resolve())


@dataclass(frozen=True)
class PolicyInfo:
    """What a spec is, without loading any weights."""
    spec: str
    layout: str                # hub | pipeline | policy | transformer | lora
    path: str                  # what from_pretrained reads: a hub id or a local folder ("" = fetch `hub` first)
    base: str | None = None    # the spec it is loaded on; "" = the caller's default pipeline
    kind: str | None = None    # lora | transformer for everything that is not a whole pipeline
    inference: dict = field(default_factory=dict)   # its own settings (a subset of SETTING_KEYS)
    prompts: dict = field(default_factory=dict)     # its own fixed prompts {task: prompt}
    settings_from: str = ""    # "onereward_policy.json" | "OneReward release" | "" (none of its own)
    hub: tuple[str, str] | None = None  # (repo id, subfolder) of a hub subfolder spec


def describe_policy(spec: str) -> PolicyInfo:
    """Classify a spec (downloading a hub subfolder if needed) and read its own inference settings."""
    from .tiny import resolve_model_path

    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty model spec", field="policy")
    spec = spec.strip()
    path = resolve_model_path(spec)
    local = Path(path).expanduser()
    if not local.is_dir():
        sub = hub_subfolder(path)
        if sub is not None and posixpath.basename(sub[1]) in RELEASE_FOLDERS:
            # A release folder is known by name: no download until its weights are needed.
            return _release_info(spec, "", RELEASE_FOLDERS[posixpath.basename(sub[1])]["kind"], sub)
        if sub is not None:
            local = _fetch_subfolder(*sub, spec=spec)
        elif _looks_like_local_path(path):
            raise InputError("model folder not found", path=spec)
        else:
            return PolicyInfo(spec, "hub", path)  # a whole pipeline on the hub (or in the HF cache)
    if (local / POLICY_FILE).exists():
        info = read_policy_info(local)
        _check_weights(local, info["kind"], spec)
        return PolicyInfo(spec, "policy", str(local), base=info["base"], kind=info["kind"],
                          inference=info["inference"], prompts=info["prompts"],
                          settings_from=POLICY_FILE if info["inference"] or info["prompts"] else "")
    if (local / "model_index.json").exists():
        _check_weights(local, "pipeline", spec)
        return PolicyInfo(spec, "pipeline", str(local))
    if (local / LORA_FILE).exists():
        kind = "lora"
    elif _is_transformer_folder(local):
        kind = "transformer"
    else:
        raise InputError(f"not a FluxFillPipeline folder (no model_index.json), a FluxTransformer2DModel folder, "
                         f"a LoRA folder ({LORA_FILE}) or an rl output ({POLICY_FILE})", path=local)
    _check_weights(local, kind, spec)
    release = RELEASE_FOLDERS.get(local.name)
    if release is None or release["kind"] != kind:
        return PolicyInfo(spec, kind, str(local), base="", kind=kind)
    return _release_info(spec, str(local), kind, hub_subfolder(path))


def _release_info(spec: str, path: str, kind: str, hub) -> PolicyInfo:
    release = RELEASE_FOLDERS[posixpath.basename(hub[1]) if hub else Path(path).name]
    base = _relative_spec(spec, release["base"]) if release.get("base") else ""
    return PolicyInfo(spec, kind, path, base=base, kind=kind, inference=dict(RELEASE_INFERENCE),
                      prompts=dict(RELEASE_PROMPTS), settings_from="OneReward release", hub=hub)


def resolve_settings(own: dict, recipe_values: dict, override: dict) -> tuple[dict, dict]:
    """Each key of `recipe_values`: the recipe's override if set, else the policy's own value, else the
    recipe's value. Returns (values, {key: "override" | "policy" | "recipe"})."""
    values, source = {}, {}
    for k, v in recipe_values.items():
        if override.get(k) is not None:
            values[k], source[k] = override[k], "override"
        elif own.get(k) is not None:
            values[k], source[k] = own[k], "policy"
        else:
            values[k], source[k] = v, "recipe"
    return values, source


def load_fill_pipeline(spec: str, *, device="cpu", dtype=torch.float32, base: str | None = None,
                       default_base: str | None = None, _depth: int = 0):
    """Load a `FluxFillPipeline` from `spec` (see the module doc) onto `device` in `dtype`.

    `base` overrides the base spec recorded in an rl folder (e.g. when the base moved). `default_base`
    is the pipeline a transformer-only or LoRA folder without a base of its own goes into (recipes:
    `models.fill_pipeline`). A wrong or missing spec is an InputError.
    """
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    if _depth > 4:
        raise InputError("policy folders refer to each other in a loop", path=spec)
    info = describe_policy(spec)
    if info.layout in ("hub", "pipeline"):
        pipe = _from_pretrained(FluxFillPipeline, info.path, info.spec, dtype=dtype)  # hub: cache or download
        return pipe.to(device)
    base_spec = base or info.base or default_base
    if not base_spec:
        raise InputError(f"a {info.kind}-only folder needs a base FluxFillPipeline to go into: set "
                         "models.fill_pipeline (e.g. black-forest-labs/FLUX.1-Fill-dev)", path=info.spec)
    pipe = load_fill_pipeline(base_spec, device=device, dtype=dtype, default_base=default_base, _depth=_depth + 1)
    local = Path(info.path) if info.path else _fetch_subfolder(*info.hub, spec=info.spec)
    if info.kind == "lora":
        if not (local / LORA_FILE).exists():
            raise InputError(f"LoRA policy folder has no {LORA_FILE}", path=local)
        if info.layout == "policy" and not _has_lora_metadata(local / LORA_FILE):
            import warnings

            warnings.warn(f"{local}: LoRA saved without its adapter config (rl before 0.2.0); it loads with "
                          "alpha = rank, which is the trained strength only if rl.lora_alpha was rl.lora_rank",
                          UserWarning, stacklevel=2)
        try:
            with quiet_loading():
                pipe.load_lora_weights(str(local), weight_name=LORA_FILE)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"cannot load LoRA weights: {e.__class__.__name__}: {e}", path=local) from None
    else:
        tr = _from_pretrained(FluxTransformer2DModel, str(local), str(local), dtype=dtype)
        pipe.transformer = tr.to(device)
    return pipe.to(device)


def _has_lora_metadata(f: Path) -> bool:
    """Whether a LoRA safetensors file carries the peft adapter config (rank, alpha) in its header."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable file fails in load_lora_weights with its own error
        return True
    return any(k == LORA_ADAPTER_METADATA_KEY or k.endswith("." + LORA_ADAPTER_METADATA_KEY) for k in meta)

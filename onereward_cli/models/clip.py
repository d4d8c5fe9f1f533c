"""open_clip loader shared by `curate` (image embeddings) and the eval metrics.

Specs:
    "zoo:open-clip"              the tiny zoo folder, loaded as open_clip "local-dir:<path>"
    "/path/to/folder"            any folder with open_clip_config.json + *.safetensors weights
    "local-dir:/path", "hf-hub:org/repo"   passed to open_clip unchanged
    "ViT-L-14" + pretrained      a built-in architecture; pretrained is a tag ("openai") or a
                                 .safetensors file ("" = random init, for tests only)

Only safetensors weights are read from local paths: open_clip would otherwise torch.load them.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .tiny import resolve_model_path


def open_clip_name(spec: str, pretrained: str = "") -> tuple[str, str | None]:
    """Resolve a recipe spec to the (model_name, pretrained) pair open_clip's factory expects."""
    spec = resolve_model_path(spec)
    if spec.startswith(("local-dir:", "hf-hub:")):
        local = Path(spec[len("local-dir:"):]) if spec.startswith("local-dir:") else None
        if local is not None:
            _check_local_dir(local)
        return spec, None
    p = Path(spec)
    if p.is_dir():
        _check_local_dir(p)
        return f"local-dir:{p.resolve()}", None
    if pretrained and not _is_known_tag(spec, pretrained):
        w = Path(pretrained)
        if not w.is_file():
            raise InputError(f"'{pretrained}' is neither a pretrained tag of {spec} nor a file",
                             field="models.clip_pretrained")
        if w.suffix != ".safetensors":
            raise InputError("only .safetensors weight files are loaded (nothing is unpickled); convert it "
                             "with safetensors.torch.save_file(torch.load(...))", path=w,
                             field="models.clip_pretrained")
    return spec, (pretrained or None)


def _is_known_tag(name: str, tag: str) -> bool:
    import open_clip

    return tag in open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))


def _check_local_dir(d: Path):
    if not (d / "open_clip_config.json").is_file():
        raise InputError("not an open_clip folder (open_clip_config.json missing)", path=d, field="models.clip")
    weights = sorted(x.name for x in d.iterdir() if x.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if weights and not any(w.endswith(".safetensors") for w in weights):
        raise InputError(f"only .safetensors weights are loaded, found {', '.join(weights)}", path=d,
                         field="models.clip")


def load_clip(spec: str, pretrained: str = "", device: str = "cpu"):
    """Return (model in eval mode, image preprocess transform, tokenizer)."""
    import open_clip

    name, tag = open_clip_name(spec, pretrained)
    if not name.startswith(("local-dir:", "hf-hub:")) and name.replace("/", "-") not in open_clip.list_models():
        raise InputError(f"unknown open_clip model '{name}' (see open_clip.list_models())", field="models.clip")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise InputError(f"cannot load open_clip model {name!r} (pretrained={tag!r}): {e}",
                         field="models.clip") from None
    return model.eval(), preprocess, tokenizer


def clip_identity(spec: str, pretrained: str = "") -> dict:
    """What decides the embeddings a model produces: name, tag, and the weight files (content hash
    for small files; size + mtime for big ones, since hashing a multi-GB checkpoint per run is slow)."""
    name, tag = open_clip_name(spec, pretrained)
    files = []
    local = Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else None
    if local is not None:
        files = sorted(x for x in local.iterdir() if x.is_file() and not x.name.startswith("."))
    elif tag and Path(tag).is_file():
        files = [Path(tag)]
    return {"model": name, "pretrained": tag, "files": [_file_identity(f) for f in files]}


def _file_identity(f: Path) -> list:
    import hashlib

    st = f.stat()
    if st.st_size <= 64 * 2**20:
        return [f.name, st.st_size, hashlib.sha256(f.read_bytes()).hexdigest()]
    return [f.name, st.st_size, st.st_mtime_ns]


def encode_images(model, pixels, normalize: bool = True):
    """Image embeddings as float32, L2-normalised by default (cosine = dot product)."""
    import torch.nn.functional as F

    feats = model.encode_image(pixels).float()
    return F.normalize(feats, dim=-1) if normalize else feats


def image_size(preprocess) -> int:
    """The square input size of an open_clip preprocess transform (used to draft-decode JPEGs)."""
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    return 224

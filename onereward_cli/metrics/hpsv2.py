"""HPSv2 / HPSv2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on HPD v2.

Source: tgxs002/HPSv2 hpsv2/img_score.py. Score = image_features @ text_features.T on L2-normalised
features, i.e. the plain cosine with no logit scale (~0.2-0.3; leaderboards print x100). Eval
preprocessing: bicubic resize 224, center crop, OpenAI mean/std; open_clip tokenizer, context 77.

Spec (`eval.metrics.hpsv2`):
  - a .safetensors file with the HPS state dict (convert HPS_v2.1_compressed.pt once with
    `python -m onereward_cli.metrics.convert HPS_v2.1_compressed.pt hps_v2.1.safetensors --key state_dict`);
    the architecture is `eval.metrics.hpsv2_arch` (default ViT-H-14);
  - or an open_clip folder (open_clip_config.json + *.safetensors), e.g. `zoo:open-clip` in tests.
We build the architecture with open_clip (which bundles the BPE vocabulary, so tokenising works
offline) and load the weights strictly; the `hpsv2` PyPI wheel is not used (it lacks its BPE file
and pins pytest).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from . import Column, Metric, TEXT_IMAGE_TASKS, resolve_spec


def _weights_and_arch(spec: str, arch: str) -> tuple[str, str]:
    p = Path(resolve_spec(spec)).expanduser()
    if p.is_dir():
        if not (p / "open_clip_config.json").is_file():
            raise InputError("not an open_clip folder (open_clip_config.json missing)", path=p,
                             field="eval.metrics.hpsv2")
        weights = sorted(p.glob("*.safetensors"))
        if not weights:
            raise InputError("no .safetensors weights in the folder", path=p, field="eval.metrics.hpsv2")
        return str(weights[0]), f"local-dir:{p.resolve()}"
    if not p.is_file():
        raise InputError("HPSv2 checkpoint not found", path=p, field="eval.metrics.hpsv2")
    if p.suffix != ".safetensors":
        raise InputError("only .safetensors checkpoints are read (nothing is unpickled); convert it once with "
                         f"`python -m onereward_cli.metrics.convert {p} {p.with_suffix('.safetensors')} "
                         "--key state_dict`", path=p, field="eval.metrics.hpsv2")
    return str(p), arch


def load_model(spec: str, arch: str, device: str, dtype):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    weights, arch = _weights_and_arch(spec, arch)
    model = open_clip.create_model(arch, pretrained=None, load_weights=False, device="cpu")
    open_clip.load_checkpoint(model, weights, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess, tokenizer


def hps_score(model, preprocess, tokenizer, images, prompts, device) -> list[float]:
    """HPSv2 of each (image, prompt) pair: cosine of the normalised features."""
    import torch

    x = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device=device, dtype=next(model.parameters()).dtype)
    t = tokenizer(list(prompts)).to(device)
    with torch.no_grad():
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(t, normalize=True)
    return [float(s) for s in (img * txt).sum(-1).float().cpu()]


def load(spec: str, mcfg, *, device: str, dtype) -> Metric:
    model, preprocess, tokenizer = load_model(spec, mcfg.hpsv2_arch, device, dtype)

    def score(items):
        vals = hps_score(model, preprocess, tokenizer, [it.image for it in items], [it.prompt for it in items], device)
        return [{"hpsv2": v} for v in vals]

    return Metric("hpsv2", "HPSv2", TEXT_IMAGE_TASKS, [Column("hpsv2", "HPSv2", "hpsv2")], score, spec=spec)

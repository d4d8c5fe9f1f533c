"""Tiny stand-ins for the OneReward release, laid out like the real thing, built from the trained zoo:

    <root>/flux.1-fill-dev-OneReward-transformer/        FluxTransformer2DModel folder (Alg. 1)
    <root>/flux.1-fill-dev-OneRewardDynamic-transformer/ FluxTransformer2DModel folder (Alg. 2)
    <root>/flux.1-fill-dev-object-removal-lora/          pytorch_lora_weights.safetensors

`hub_cache` writes the same folders as the Hugging Face cache holds a downloaded repo
(models--owner--name/refs/main -> snapshots/<commit>/...), together with the zoo pipeline standing in
for black-forest-labs/FLUX.1-Fill-dev, so hub ids resolve offline through huggingface_hub and diffusers.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

TRANSFORMERS = ("flux.1-fill-dev-OneReward-transformer", "flux.1-fill-dev-OneRewardDynamic-transformer")
LORA = "flux.1-fill-dev-object-removal-lora"
RELEASE_REPO = "bytedance-research/OneReward"
BASE_REPO = "black-forest-labs/FLUX.1-Fill-dev"


def build_release(zoo: Path, root: Path) -> Path:
    """Perturbed copies of the zoo transformer (a different seed per folder) and a random LoRA."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(TRANSFORMERS, start=1):
        tr = FluxTransformer2DModel.from_pretrained(Path(zoo) / "flux-fill" / "transformer")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tr.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tr.save_pretrained(root / name)
    tr = FluxTransformer2DModel.from_pretrained(root / TRANSFORMERS[0])
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    FluxFillPipeline.save_lora_weights(root / LORA, transformer_lora_layers=get_peft_model_state_dict(tr),
                                       safe_serialization=True)
    return root


def _cache_repo(cache: Path, repo_id: str, folders: dict[str, Path]) -> Path:
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    snap = entry / "snapshots" / commit
    for sub, src in folders.items():
        shutil.copytree(src, snap / sub if sub else snap, dirs_exist_ok=True)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    return snap


def hub_cache(zoo: Path, release: Path, cache: Path) -> Path:
    """An HF cache holding bytedance-research/OneReward (the release folders) and
    black-forest-labs/FLUX.1-Fill-dev (the zoo pipeline)."""
    _cache_repo(cache, RELEASE_REPO, {n: release / n for n in (*TRANSFORMERS, LORA)})
    _cache_repo(cache, BASE_REPO, {"": Path(zoo) / "flux-fill"})
    return cache

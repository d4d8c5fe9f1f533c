"""Object-mask proposals for removal samples from pools without boxes: SAM through transformers'
mask-generation pipeline (a grid of point prompts, masks filtered by predicted IoU and stability,
then non-maximum suppression), the same SamModel loader the ReMOVE metric uses (safetensors only).

    gen = load_segmenter("facebook/sam-vit-base", device="cuda", dtype=torch.float16)
    proposals = propose_masks(gen, image, recipe.generate.masks)   # [(bool HxW mask, predicted IoU)]
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def load_segmenter(spec: str, device="cpu", dtype=None):
    """A transformers mask-generation pipeline over a SAM checkpoint (hub id, folder or zoo spec)."""
    import torch
    from transformers import AutoImageProcessor, pipeline

    from ..metrics import first_line, resolve_spec
    from ..metrics.remove import load_model
    from .flux_fill import quiet_loading

    try:
        with quiet_loading():
            model, _, _ = load_model(spec, device, dtype or torch.float32)
            processor = AutoImageProcessor.from_pretrained(resolve_spec(spec))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load the segmenter '{spec}': {first_line(e)}", field="models.segmenter") from None
    return pipeline("mask-generation", model=model, image_processor=processor, device=torch.device(device))


def propose_masks(gen, image, mc) -> list[tuple[np.ndarray, float]]:
    """(mask, predicted IoU) for every object SAM finds in `image`, best first. Only masks whose predicted
    IoU and stability reach `mc.segment_min_iou` / `mc.segment_min_stability` come back."""
    out = gen(image.convert("RGB"), points_per_crop=mc.segment_points_per_side, points_per_batch=64,
              pred_iou_thresh=mc.segment_min_iou, stability_score_thresh=mc.segment_min_stability)
    props = [(np.asarray(m.cpu() if hasattr(m, "cpu") else m).astype(bool), float(s))
             for m, s in zip(out["masks"], out["scores"])]
    return sorted(props, key=lambda p: -p[1])

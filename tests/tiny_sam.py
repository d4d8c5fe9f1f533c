"""A random-init SAM at a tiny size, saved as a real checkpoint (SamModel.save_pretrained +
SamImageProcessor.save_pretrained): `models.segmenter` and the ReMOVE metric load it through the
same code as facebook/sam-vit-base."""
from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_sam(out: Path, seed: int = 0) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel

    cfg = SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                       patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1],
                                       mlp_dim=64, num_pos_feats=8),
                    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
                    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                             iou_head_hidden_dim=16))
    torch.manual_seed(seed)
    model = SamModel(cfg)
    with torch.no_grad():  # SAM's initializer_range is 1e-10: make the masks depend on the pixels
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                      mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}).save_pretrained(out)
    return Path(out)

"""ReMOVE (Chandrasekar et al., CVPRW 2024): a reference-free object-removal score.

Source: chandrasekaraditya/ReMOVE main.py, crop.py, segment_anything/predictor.py. Procedure:
  1. crop the edit to the smallest bounding square of the mask's white (== 255) pixels plus 16 px of
     padding (`find_smallest_bounding_square`, ported verbatim, odd edge cases included);
  2. SAM ViT-H image features of the crop (ResizeLongestSide to 1024 with bilinear PIL resizing,
     (x - pixel_mean) / pixel_std in 0-255 space, zero padding to 1024 x 1024) -> (256, 64, 64);
  3. the mask crop resized to 64 x 64 with PIL's default (bicubic) filter, then `// 255`: the
     foreground is the cells that stay exactly white, the background is all others;
  4. score = cosine(mean feature over the foreground, mean feature over the background). Higher means
     the filled region looks like its surroundings.
One deliberate deviation: where the crop is cut by the image border it is not square, SAM pads it, and
upstream's 64 x 64 mask no longer lines up with the features. We resize and pad the mask exactly as
the image (identical to upstream for square crops) and leave the padding out of the background.

Backbone via transformers SamModel.get_image_embeddings (spec `eval.metrics.remove`, e.g.
"facebook/sam-vit-huge" or a local copy). Image size and patch size come from its config.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import Column, Metric, REMOVAL_TASKS, resolve_spec

# segment_anything's Sam.pixel_mean / pixel_std (ImageNet statistics in 0-255).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def find_smallest_bounding_square(binary_image: np.ndarray):
    """Upstream crop.py: (x, y, size) of the padded bounding square of the == 255 pixels, or None."""
    if binary_image.ndim == 3:
        binary_image = np.array(Image.fromarray(binary_image).convert("L"))
    white = np.argwhere(binary_image == 255)
    if not white.any():
        return None
    min_row, max_row = int(white[:, 0].min()), int(white[:, 0].max())
    min_col, max_col = int(white[:, 1].min()), int(white[:, 1].max())
    size = max(max_col - min_col + 1, max_row - min_row + 1)
    H, W = binary_image.shape
    if min_col - 16 >= 0 and min_row - 16 >= 0 and max_row + 16 <= H and max_col + 16 <= W:
        sub = 16
    else:
        sub = max(min(min_col, min_row, H - max_row, W - max_col), 0)
    return min_col - sub, min_row - sub, size + 2 * sub


def sam_input(crop: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """ResizeLongestSide + Sam.preprocess: (1, 3, S, S) float tensor and the resized (h, w)."""
    h, w = crop.shape[:2]
    scale = img_size * 1.0 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1)
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    out = torch.zeros(1, 3, img_size, img_size)
    out[0, :, :nh, :nw] = x
    return out, (nh, nw)


def feature_masks(mask_crop: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(fg, bg) boolean (grid, grid) cell masks aligned with SAM's padded feature map."""
    h, w = mask_crop.shape
    scale = grid * 1.0 / max(h, w)
    gh, gw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    small = np.asarray(Image.fromarray(mask_crop).resize((gw, gh)))  # PIL default filter, as upstream
    fg = np.zeros((grid, grid), dtype=bool)
    valid = np.zeros((grid, grid), dtype=bool)
    fg[:gh, :gw] = (small // 255) == 1
    valid[:gh, :gw] = True
    return fg, valid & ~fg


def remove_from_features(features: torch.Tensor, fg: np.ndarray, bg: np.ndarray) -> float:
    """cos(mean of features over fg cells, mean over bg cells); features (C, G, G). NaN if either is empty."""
    if not fg.any() or not bg.any():
        return float("nan")
    f = features.float()
    mean_fg = f[:, torch.from_numpy(fg)].mean(-1)
    mean_bg = f[:, torch.from_numpy(bg)].mean(-1)
    return float(torch.nn.functional.cosine_similarity(mean_fg[None], mean_bg[None]).item())


def crop_inputs(image: Image.Image, mask: np.ndarray):
    """(image crop HxWx3 uint8, mask crop HxW uint8) around the mask, or None for an empty mask."""
    box = find_smallest_bounding_square(mask)
    if box is None:
        return None
    x, y, size = box
    img = np.asarray(image.convert("RGB"))
    # Negative starts cannot happen (sub <= min_row, min_col); slicing past the border truncates, as upstream.
    return img[y:y + size, x:x + size], mask[y:y + size, x:x + size]


def load_model(spec: str, device: str, dtype):
    from transformers import SamModel

    model = SamModel.from_pretrained(resolve_spec(spec), dtype=dtype, use_safetensors=True).to(device).eval()
    vc = model.config.vision_config
    return model, int(vc.image_size), int(vc.image_size) // int(vc.patch_size)


def remove_score(model, img_size: int, grid: int, image: Image.Image, mask: np.ndarray, device) -> float:
    crops = crop_inputs(image, mask)
    if crops is None:
        return float("nan")
    img_crop, mask_crop = crops
    x, _ = sam_input(img_crop, img_size)
    with torch.no_grad():
        feats = model.get_image_embeddings(x.to(device=device, dtype=model.dtype))
    feats = feats if torch.is_tensor(feats) else feats[0]
    if feats.shape[-1] != grid:
        raise RuntimeError(f"SAM features are {tuple(feats.shape)}, expected a {grid}x{grid} grid")
    fg, bg = feature_masks(mask_crop, grid)
    return remove_from_features(feats[0].cpu(), fg, bg)


def load(spec: str, mcfg, *, device: str, dtype) -> Metric:
    model, img_size, grid = load_model(spec, device, dtype)

    def score(items):
        return [{"remove": remove_score(model, img_size, grid, it.image, it.mask, device)} for it in items]

    return Metric("remove", "ReMOVE", REMOVAL_TASKS, [Column("remove", "ReMOVE", "remove")], score, spec=spec)

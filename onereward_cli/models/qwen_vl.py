"""Qwen2-VL / Qwen2.5-VL as a pairwise judge: loading, differentiable preprocessing, one forward.

Everything model-specific the reward scorer needs lives here, so `reward.py` reads as the paper's
§4.3 and this file reads as "how to feed two images and a question to a Qwen VLM":

- `load_vlm`: AutoModelForImageTextToText + AutoProcessor from a zoo spec, hub id or path (never
  trust_remote_code), with errors that name the checkpoint.
- `TorchImageProcessor`: a torch-native, differentiable twin of `Qwen2VLImageProcessor`
  (smart_resize -> antialiased resize -> rescale/normalise -> patchify). Bit-for-bit equal to the HF
  processor (up to float rounding, < 1e-6) when no resize is needed, i.e. H and W are multiples of
  28 inside [min_pixels, max_pixels]; with a resize we mimic torchvision's uint8 two-pass kernel
  (rounding with a straight-through gradient) and stay within one grey level of it (1/255/std =
  0.0151 in normalised units; mean difference < 0.002).
- `PromptBuilder`: chat template -> token ids with the image placeholders expanded exactly as the
  processor does, cached per query; left-padded batches with `mm_token_type_ids` (transformers 5.x
  needs them for the 3-D M-RoPE positions; without them positions silently fall back to 1-D).
- `last_token_logits`: runs the vision tower ONCE over a set of unique images, then feeds any number
  of (first image, second image, query) sequences through the language model in one left-padded
  forward, via the model's own `mm_encoder_outputs` input (the same scatter the model does for
  `pixel_values`). Only the last position's logits are built (`logits_to_keep=1`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

# PIL resample codes -> torch interpolate modes (the processor stores PIL codes; 3 = BICUBIC).
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_vlm(spec: str, *, dtype=torch.float32, device="cpu"):
    """(model, processor, resolved path). Model in eval mode on `device`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tiny import resolve_model_path

    path = resolve_model_path(spec)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - missing files, offline hub id, wrong format
        raise InputError(f"cannot load the reward model's processor from '{path}' "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                         field="models.reward") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load the reward model from '{path}' "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                         field="models.reward") from None
    if not hasattr(model, "get_image_features") or getattr(model.config, "image_token_id", None) is None \
            or not hasattr(processor, "image_processor") or not hasattr(processor.image_processor, "merge_size"):
        raise InputError(f"'{path}' is a {model.__class__.__name__}; the reward model must be a Qwen2-VL or "
                         f"Qwen2.5-VL checkpoint", field="models.reward")
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise InputError(f"'{path}' has no chat template (chat_template.jinja)", field="models.reward")
    return model.to(device).eval(), processor, path


def single_token_id(tokenizer, word: str, path: str, field: str) -> int:
    """The id of `word` as one token, or InputError: P(yes) is read from one logit."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise InputError(f"checkpoint '{path}': its tokenizer splits '{word}' into {len(ids)} tokens {pieces}; "
                         f"the reward answer must be a single token (choose another {field})", field=field)
    return ids[0]


def unwrap(model):
    """The HF model under DDP/FSDP (`.module`) and PEFT (`.get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def vision_tower(model):
    """transformers 5.x: the ViT lives at model.model.visual (model.visual is gone)."""
    return unwrap(model).model.visual


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count in range, aspect kept.

    Same arithmetic as transformers' `smart_resize` (copied so it cannot drift with the processor
    backend that happens to be installed)."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200",
                         field="image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _round_to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Round to k/255 in the forward pass, identity in the backward pass (straight-through)."""
    return x + ((x * 255.0).round() / 255.0 - x).detach()


class TorchImageProcessor:
    """Differentiable Qwen2VLImageProcessor: float images in [0, 1] -> (pixel_values, image_grid_thw)."""

    def __init__(self, image_processor, max_pixels: int | None = None):
        ip = image_processor
        size = getattr(ip, "size", None) or {}
        get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
        self.min_pixels = int(get("shortest_edge", None) or getattr(ip, "min_pixels", 56 * 56))
        self.max_pixels = int(get("longest_edge", None) or getattr(ip, "max_pixels", 28 * 28 * 1280))
        if max_pixels:
            self.max_pixels = max(self.min_pixels, min(self.max_pixels, int(max_pixels)))
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.temporal = int(ip.temporal_patch_size)
        self.factor = self.patch * self.merge
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.do_rescale = bool(getattr(ip, "do_rescale", True))
        self.do_normalize = bool(getattr(ip, "do_normalize", True))
        resample = getattr(ip, "resample", 3)
        self.mode = _RESAMPLE_MODES.get(int(getattr(resample, "value", resample)), "bicubic")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def tokens_per_image(self, height: int, width: int) -> int:
        h, w = self.target_size(height, width)
        return (h // self.patch) * (w // self.patch) // (self.merge ** 2)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.target_size(*x.shape[-2:])
        if (h, w) == tuple(x.shape[-2:]):
            return x  # the processor skips an identity resize too: exact parity here
        if self.mode == "nearest":
            return F.interpolate(x, size=(h, w), mode="nearest")
        # The HF processor resizes uint8 images with torchvision's separable antialiased kernel:
        # a horizontal pass, then a vertical one, each saturated to 0..255 and rounded. Doing the
        # same (rounding with a straight-through gradient) keeps us within one grey level of it;
        # one float pass would differ by up to ~18 grey levels on high-frequency content.
        y = x
        for size in ((x.shape[-2], w), (h, w)):
            y = F.interpolate(y, size=size, mode=self.mode, align_corners=False, antialias=True)
            y = _round_to_uint8_levels(y.clamp(0.0, 1.0))
        return y

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        b, c, h, w = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        # A still image is its own temporal patch: repeat it `temporal_patch_size` times.
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(b, gh * gw, c * t * p * p), gh, gw

    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) float in [0, 1], or a list of (3, H, W) tensors of any sizes.

        Returns pixel_values (sum of patches, 3*T*p*p) float32 and image_grid_thw (B, 3) long, in
        input order, exactly like the HF processor's output for the same images."""
        groups = [images] if torch.is_tensor(images) else [im.unsqueeze(0) for im in images]
        if torch.is_tensor(images) and images.dim() != 4:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        values, grids = [], []
        for g in groups:
            if g.shape[1] != 3:
                raise ValueError(f"expected 3 channels, got {g.shape[1]}")
            x = self._resize(g.float())
            mean, std = self.mean.to(x.device), self.std.to(x.device)
            if not self.do_rescale:  # such a processor expects raw 0..255 values
                x = x * 255.0
            if self.do_normalize:
                x = (x - mean) / std
            pv, gh, gw = self._patchify(x)
            values.append(pv.reshape(-1, pv.shape[-1]))
            grids += [[1, gh, gw]] * g.shape[0]
        device = values[0].device
        return torch.cat(values), torch.tensor(grids, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------
# Text: chat template + image placeholders
# ----------------------------------------------------------------------------------------------
class PromptBuilder:
    """Token ids for "<system> user: [image][image] QUERY assistant:", as the processor builds them."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self._ids: dict[str, list[int]] = {}

    def text(self, query: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": query}]}]
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def query_ids(self, query: str) -> list[int]:
        """Ids with ONE placeholder per image (the pad token is special, so it never merges)."""
        if query not in self._ids:
            ids = self.tokenizer(self.text(query))["input_ids"]
            if ids.count(self.image_token_id) != 2:
                raise InputError(f"the chat template produced {ids.count(self.image_token_id)} image "
                                 f"placeholders for two images", field="models.reward")
            self._ids[query] = ids
        return self._ids[query]

    def sequence(self, query: str, n_first: int, n_second: int) -> list[int]:
        out, k = [], 0
        for t in self.query_ids(query):
            if t == self.image_token_id:
                out += [t] * (n_first if k == 0 else n_second)
                k += 1
            else:
                out.append(t)
        return out

    def batch(self, items: list[tuple[str, int, int]], device="cpu") -> dict[str, torch.Tensor]:
        """Left-padded input_ids / attention_mask / mm_token_type_ids for (query, n1, n2) items."""
        seqs = [self.sequence(*it) for it in items]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
        mm = ((ids == self.image_token_id) & (mask == 1)).long()
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "mm_token_type_ids": mm.to(device)}


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def last_token_logits(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, seq_images: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Logits (S, V) at the last position of S left-padded sequences.

    pixel_values/image_grid_thw describe M unique images; seq_images (S, 2) says which two of them
    each sequence shows, in order. The vision tower runs once over the M images; every sequence
    then reuses their embeddings, so Q queries about one pair cost one ViT pass, not Q.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
    order = seq_images.reshape(-1).tolist()
    # The model scatters image embeddings into the placeholder positions in reading order
    # (sequence by sequence, first image then second), so list them in that order.
    encoded = BaseModelOutputWithPooling(pooler_output=tuple(feats[i] for i in order))
    out = model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw[seq_images.reshape(-1)], mm_encoder_outputs={"image": encoded},
                use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


class Judge(nn.Module):
    """`last_token_logits` as a module, so accelerate/DDP/FSDP wrap one forward that does it all."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, image_grid_thw, seq_images, input_ids, attention_mask, mm_token_type_ids):
        return last_token_logits(self.model, pixel_values, image_grid_thw, seq_images, input_ids,
                                 attention_mask, mm_token_type_ids)


@dataclass
class SequenceBatch:
    """What `Judge.forward` takes, built from images + (first, second, query) triples."""
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    seq_images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor

    def as_kwargs(self) -> dict:
        return dict(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw, seq_images=self.seq_images,
                    input_ids=self.input_ids, attention_mask=self.attention_mask,
                    mm_token_type_ids=self.mm_token_type_ids)

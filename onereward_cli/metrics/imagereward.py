"""ImageReward (Xu et al., 2023), ported in-tree onto transformers' BLIP classes.

Source: THUDM/ImageReward (now zai-org) ImageReward/ImageReward.py, models/BLIP/*. The model is
  BLIP ViT-L/16 at 224 px (24 layers, width 1024, LayerNorm eps 1e-6)
  -> BERT-base "MED" text encoder whose layers cross-attend to all image tokens (bidirectional
     self-attention, no token-type embeddings, no pooler), tokenizer bert-base-uncased + [DEC]/[ENC],
     padding to max_length 35
  -> the [CLS] hidden state -> MLP 768-1024-128-64-16-1 whose ReLUs are commented out upstream (so it
     is linear, with dropout that is inactive at eval)
  -> reward = (r - 0.16717362830052426) / 1.0333394966054072.
Preprocessing: bicubic resize of the short side to 224, center crop, OpenAI CLIP mean/std.

Why a port: the PyPI package (image-reward 1.5) imports `apply_chunking_to_forward` from
transformers.modeling_utils, which no longer exists, and pins timm/fairscale. transformers'
BlipVisionModel is BLIP's timm-style ViT and BlipTextModel is BLIP's MED (`config.is_decoder=True`
creates the cross-attention layers, `forward(is_decoder=False)` keeps self-attention bidirectional,
which is MED's "multimodal" mode). The official state dict maps onto them key by key (OFFICIAL_TO_PORT).

Checkpoint folder (`eval.metrics.imagereward`):
    med_config.json          the official MED config (BertConfig JSON; encoder_width is overridden
                             by the vision width, as upstream does)
    *.safetensors            the official state dict (keys "blip.visual_encoder.*", "blip.text_encoder.*",
                             "mlp.layers.*"), converted once from ImageReward.pt with
                             `python -m onereward_cli.metrics.convert ImageReward.pt DIR/ImageReward.safetensors`
    vision_config.json       optional: BlipVisionConfig overrides (default: BLIP ViT-L, 224 px)
    tokenizer files          optional: a BERT tokenizer; else `eval.metrics.imagereward_tokenizer`
                             (default bert-base-uncased, from the local HF cache)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from . import CLIP_MEAN, CLIP_STD, Column, Metric, TEXT_IMAGE_TASKS, clip_preprocess, resolve_spec

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
MLP_WIDTHS = (1024, 128, 64, 16)

BLIP_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")

# Keys of the official checkpoint that the score never uses: BLIP's other heads (vision_proj,
# text_proj, ...) and a buffer that old transformers saved.
IGNORED_KEYS = re.compile(r"^blip\.(?!visual_encoder\.|text_encoder\.)|^blip\.text_encoder\.embeddings\.position_ids$")

OFFICIAL_TO_PORT = [
    (r"^blip\.visual_encoder\.cls_token$", "visual_encoder.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "visual_encoder.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "visual_encoder.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"visual_encoder.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"visual_encoder.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"visual_encoder.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"visual_encoder.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"visual_encoder.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "visual_encoder.post_layernorm."),
    (r"^blip\.text_encoder\.", "text_encoder."),
    (r"^mlp\.", "mlp."),
]


class RewardMLP(nn.Module):
    """The upstream head, ReLUs left out exactly as upstream comments them out (same Sequential indices)."""

    def __init__(self, input_size: int):
        super().__init__()
        a, b, c, d = MLP_WIDTHS
        self.layers = nn.Sequential(nn.Linear(input_size, a), nn.Dropout(0.2), nn.Linear(a, b), nn.Dropout(0.2),
                                    nn.Linear(b, c), nn.Dropout(0.1), nn.Linear(c, d), nn.Linear(d, 1))

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size)

    def raw_reward(self, pixel_values, input_ids, attention_mask):
        """mlp([CLS] state of the text encoder cross-attending to the image) before standardisation."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                 is_decoder=False)
        return self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)

    def forward(self, pixel_values, input_ids, attention_mask):
        return (self.raw_reward(pixel_values, input_ids, attention_mask) - REWARD_MEAN) / REWARD_STD


# ----------------------------------------------------------------------------------------------
# Configs and weights
# ----------------------------------------------------------------------------------------------
def text_config_from_med(med: dict, vision_width: int):
    """BlipTextConfig equivalent of the official med_config.json (BertConfig keys)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med.get("pad_token_id", 0), encoder_hidden_size=vision_width, is_decoder=True,
        # BlipTextConfig's defaults are BLIP's own ids; the encoder never reads them.
        bos_token_id=med.get("bos_token_id"), eos_token_id=med.get("eos_token_id"), sep_token_id=med.get("sep_token_id"))


def port_state_dict(official: dict) -> tuple[dict, list[str]]:
    """Official ImageReward keys -> this port's keys. Returns (mapped, keys that match no rule)."""
    out, unknown = {}, []
    for k, v in official.items():
        if IGNORED_KEYS.search(k):
            continue
        for pat, rep in OFFICIAL_TO_PORT:
            if re.search(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            unknown.append(k)
    return out, unknown


def _checkpoint_dir(spec: str) -> Path:
    d = Path(resolve_spec(spec)).expanduser()
    if d.is_file():
        if d.suffix != ".safetensors":
            raise InputError("ImageReward.pt is a pickle and is not read; convert it once with `python -m "
                             f"onereward_cli.metrics.convert {d} DIR/ImageReward.safetensors` and put the official "
                             "med_config.json in DIR", path=d, field="eval.metrics.imagereward")
        d = d.parent
    if not d.is_dir():
        raise InputError("ImageReward checkpoint folder not found", path=d, field="eval.metrics.imagereward")
    if not (d / "med_config.json").is_file():
        raise InputError("med_config.json missing (copy it from the ImageReward release)", path=d,
                         field="eval.metrics.imagereward")
    return d


def load_model(spec: str, tokenizer_spec: str, device: str, dtype):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipVisionConfig

    d = _checkpoint_dir(spec)
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pts = sorted(x.name for x in d.glob("*.pt"))
        hint = f" (found {', '.join(pts)}; convert with `python -m onereward_cli.metrics.convert`)" if pts else ""
        raise InputError(f"no .safetensors weights{hint}", path=d, field="eval.metrics.imagereward")
    vision_kw = dict(BLIP_VIT_L)
    if (d / "vision_config.json").is_file():
        vision_kw.update(json.loads((d / "vision_config.json").read_text()))
    vcfg = BlipVisionConfig(**vision_kw)
    tcfg = text_config_from_med(json.loads((d / "med_config.json").read_text()), vcfg.hidden_size)
    model = ImageRewardModel(vcfg, tcfg)
    state, unknown = port_state_dict(load_file(str(weights[0])))
    if unknown:
        raise InputError(f"unexpected keys in the checkpoint: {', '.join(unknown[:5])}", path=weights[0],
                         field="eval.metrics.imagereward")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the architecture (missing: {missing[:4]}, "
                         f"unexpected: {unexpected[:4]})", path=weights[0], field="eval.metrics.imagereward")
    tok_src = str(d) if any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt")) else resolve_spec(tokenizer_spec)
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    # Upstream's init_tokenizer: harmless for scoring (neither token appears), kept for identical ids.
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    model.visual_encoder.to(dtype)
    model.text_encoder.to(dtype)
    return model.to(device).eval(), tokenizer, vcfg.image_size


def image_reward(model, tokenizer, image_size: int, images, prompts, device) -> list[float]:
    """ImageReward of each (image, prompt) pair (official standardisation applied)."""
    x = torch.stack([clip_preprocess(im, image_size, CLIP_MEAN, CLIP_STD) for im in images])
    x = x.to(device=device, dtype=model.visual_encoder.dtype)
    t = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                  return_tensors="pt").to(device)
    with torch.no_grad():
        r = model(x, t["input_ids"], t["attention_mask"])
    return [float(v) for v in r.float().cpu()]


def load(spec: str, mcfg, *, device: str, dtype) -> Metric:
    model, tokenizer, size = load_model(spec, mcfg.imagereward_tokenizer, device, dtype)

    def score(items):
        vals = image_reward(model, tokenizer, size, [it.image for it in items], [it.prompt for it in items], device)
        return [{"imagereward": v} for v in vals]

    return Metric("imagereward", "ImageReward", TEXT_IMAGE_TASKS,
                  [Column("imagereward", "ImageReward", "imagereward")], score, spec=spec)

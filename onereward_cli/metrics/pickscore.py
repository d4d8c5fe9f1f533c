"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Source: yuvalkirstain/PickScore README. Score = logit_scale.exp() * cos(text_emb, image_emb) with
both embeddings L2-normalised (~20-23 for good images). The checkpoint ("yuvalkirstain/PickScore_v1"
or a local copy) loads as a transformers CLIPModel; the authors take the processor from
"laion/CLIP-ViT-H-14-laion2B-s32B-b79K" (recipe `eval.metrics.pickscore_processor`; "" = the
checkpoint's own folder): short side 224 bicubic, center crop, OpenAI mean/std, text max_length 77.

transformers 5.x returns BaseModelOutputWithPooling from get_*_features; the projected embedding is
its `.pooler_output`.
"""
from __future__ import annotations

from . import Column, Metric, TEXT_IMAGE_TASKS, resolve_spec

DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def pickscore(model, processor, images, prompts, device) -> list[float]:
    """PickScore of each (image, prompt) pair, batched (row i scores image i against prompt i)."""
    import torch

    image_inputs = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(device)
    text_inputs = processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                            return_tensors="pt").to(device)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(model.dtype)))
        img = img / torch.norm(img, dim=-1, keepdim=True)
        txt = _features(model.get_text_features(input_ids=text_inputs["input_ids"],
                                                attention_mask=text_inputs.get("attention_mask")))
        txt = txt / torch.norm(txt, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (txt * img).sum(-1)
    return [float(s) for s in scores.float().cpu()]


def load_model(spec: str, processor_spec: str, device: str, dtype):
    from transformers import AutoProcessor, CLIPModel

    path = resolve_spec(spec)
    model = CLIPModel.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(resolve_spec(processor_spec) if processor_spec else path)
    return model, processor


def load(spec: str, mcfg, *, device: str, dtype) -> Metric:
    model, processor = load_model(spec, mcfg.pickscore_processor, device, dtype)

    def score(items):
        vals = pickscore(model, processor, [it.image for it in items], [it.prompt for it in items], device)
        return [{"pickscore": v} for v in vals]

    return Metric("pickscore", "PickScore", TEXT_IMAGE_TASKS, [Column("pickscore", "PickScore", "pickscore")],
                  score, spec=spec)

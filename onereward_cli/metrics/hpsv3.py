"""HPSv3 (Ma et al., 2025): Qwen2-VL-7B-Instruct with a reward head at a special <|Reward|> token.

Source: MizzenAI/HPSv3 hpsv3/inference.py, model/qwen2vl_trainer.py (Qwen2VLRewardModelBT),
config/HPSv3_7B.yaml, dataset/data_collator_qwen.py. The model:
  - processor of Qwen2-VL-7B-Instruct, padding right, plus the special token "<|Reward|>" (appended to
    the vocabulary; the checkpoint's embeddings are resized to match);
  - one user turn: [image resized by qwen_vl_utils' smart_resize to min = max = 256*28*28 pixels,
    text INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN], chat template with the
    generation prompt;
  - rm_head ("ranknet", fp32): Linear(hidden, 1024) ReLU Dropout(0.05) Linear(1024, 16) ReLU Linear(16, 2)
    on the last hidden state at the <|Reward|> token -> (mu, log sigma); the score is mu.
The PyPI package pins transformers 4.45.2; with 5.x its strict load fails because Qwen2-VL's modules
moved (visual -> model.visual, model -> model.language_model). We load the base model with
transformers, remap the released keys the way transformers' own conversion mapping does, and copy
the checkpoint in strictly, tensor by tensor (no second full copy in memory).

Spec: `eval.metrics.hpsv3` = HPSv3.safetensors (MizzenAI/HPSv3), `eval.metrics.hpsv3_base` = the base
model folder or hub id (Qwen/Qwen2-VL-7B-Instruct), `eval.metrics.hpsv3_pixels` = the fixed pixel count.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from . import Column, Metric, TEXT_IMAGE_TASKS, resolve_spec

REWARD_TOKEN = "<|Reward|>"
# Verbatim from HPSv3's data_collator_qwen.py (trailing spaces included: they are tokens).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""

# transformers' conversion mapping for Qwen2VLForConditionalGeneration checkpoints saved before 4.52.
KEY_RENAMES = [(re.compile(r"^visual"), "model.visual"),
               (re.compile(r"^model(?!\.(language_model|visual))"), "model.language_model")]


def rm_head(hidden_size: int) -> nn.Sequential:
    """HPSv3's default "ranknet" head (rm_head_kwargs unset in HPSv3_7B.yaml), output (mu, log sigma)."""
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def rename_key(k: str) -> str:
    for pat, rep in KEY_RENAMES:
        k = pat.sub(rep, k)
    return k


class HPSv3Model(nn.Module):
    def __init__(self, vlm, reward_token_id: int):
        super().__init__()
        self.vlm = vlm
        self.reward_token_id = reward_token_id
        self.rm_head = rm_head(vlm.config.get_text_config().hidden_size).float()

    def forward(self, **batch) -> torch.Tensor:
        """(B, 2) head output (mu, log sigma) at each row's <|Reward|> token."""
        ids = batch["input_ids"]
        hits = ids == self.reward_token_id
        if not bool((hits.sum(-1) == 1).all()):
            raise RuntimeError(f"expected exactly one {REWARD_TOKEN} token per sequence")
        hidden = self.vlm.model(**batch).last_hidden_state
        return self.rm_head(hidden[hits].float())


def _copy_checkpoint(model: HPSv3Model, path: Path):
    """Strictly copy the released state dict (old key layout) into the model, one tensor at a time."""
    from safetensors import safe_open

    own = {("rm_head." + k): v for k, v in model.rm_head.state_dict().items()}
    own.update(model.vlm.state_dict())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = {rename_key(k): k for k in f.keys()}
        missing = sorted(set(own) - set(names))
        unexpected = sorted(set(names) - set(own))
        if missing or unexpected:
            raise InputError(f"checkpoint does not match {type(model.vlm).__name__} + rm_head (missing: "
                             f"{missing[:3]} [{len(missing)}], unexpected: {unexpected[:3]} [{len(unexpected)}])",
                             path=path, field="eval.metrics.hpsv3")
        with torch.no_grad():
            for ours, theirs in names.items():
                t = f.get_tensor(theirs)
                if t.shape != own[ours].shape:
                    raise InputError(f"shape mismatch for {theirs}: {tuple(t.shape)} vs {tuple(own[ours].shape)}",
                                     path=path, field="eval.metrics.hpsv3")
                own[ours].copy_(t.to(own[ours].dtype))


def load_model(spec: str, base: str, device: str, dtype):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    ckpt = Path(resolve_spec(spec)).expanduser()
    if not ckpt.is_file():
        raise InputError("HPSv3 checkpoint not found (HPSv3.safetensors from MizzenAI/HPSv3)", path=ckpt,
                         field="eval.metrics.hpsv3")
    if ckpt.suffix != ".safetensors":
        raise InputError("only .safetensors checkpoints are read (nothing is unpickled)", path=ckpt,
                         field="eval.metrics.hpsv3")
    base_path = resolve_spec(base)
    processor = AutoProcessor.from_pretrained(base_path, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    reward_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    vlm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model = HPSv3Model(vlm, reward_id)
    _copy_checkpoint(model, ckpt)
    return model.to(device).eval(), processor


def smart_resized(image, pixels: int):
    """qwen_vl_utils.fetch_image with min_pixels = max_pixels = `pixels`: PIL (bicubic) resize."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, factor=28, min_pixels=pixels, max_pixels=pixels)
    return image.resize((w, h))


def hpsv3_batch(processor, images, prompts, pixels: int):
    messages = [[{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + PROMPT_WITH_SPECIAL_TOKEN}]}]
        for p in prompts]
    text = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    return processor(text=text, images=[smart_resized(im, pixels) for im in images], padding=True,
                     return_tensors="pt")


def hpsv3_score(model: HPSv3Model, processor, images, prompts, pixels: int, device) -> list[float]:
    """HPSv3 mu of each (image, prompt) pair."""
    batch = hpsv3_batch(processor, images, prompts, pixels)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.vlm.dtype)
    with torch.no_grad():
        out = model(**batch)
    return [float(v) for v in out[:, 0].cpu()]


def load(spec: str, mcfg, *, device: str, dtype) -> Metric:
    model, processor = load_model(spec, mcfg.hpsv3_base, device, dtype)
    pixels = mcfg.hpsv3_pixels

    def score(items):
        vals = hpsv3_score(model, processor, [it.image for it in items], [it.prompt for it in items], pixels, device)
        return [{"hpsv3": v} for v in vals]

    return Metric("hpsv3", "HPSv3", TEXT_IMAGE_TASKS, [Column("hpsv3", "HPSv3", "hpsv3")], score, spec=spec)

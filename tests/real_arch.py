"""The real-architecture model set: FLUX.1-Fill-dev, Qwen2.5-VL-7B-Instruct and ViT-L-14 configs, reduced
in depth (and, where a 2-core CPU with ~20 GiB demands it, in the number of heads / FF width), random
weights, saved in the formats the tiny zoo uses (FluxFillPipeline / HF save_pretrained / open_clip
local-dir). Head dims, patch sizes, latent channels, window attention, vocab sizes and untied heads are
the real ones. Tokenizers are the tiny zoo's (their ids fit in the real vocabularies).

Each value kept or changed is in REAL / KEPT below; tests/test_real_arch.py checks the built configs
against them."""
from __future__ import annotations

import json
from pathlib import Path

# The released configs (black-forest-labs/FLUX.1-Fill-dev, Qwen/Qwen2.5-VL-7B-Instruct, open_clip ViT-L-14).
FLUX = dict(patch_size=1, in_channels=384, out_channels=64, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56], guidance_embeds=True,
            num_layers=19, num_single_layers=38)
VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu", max_sequence_length=512)
QWEN_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24], tie_word_embeddings=False)
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])
VIT_L_14 = dict(embed_dim=768, vision=dict(image_size=224, layers=24, width=1024, head_width=64, patch_size=14),
                text=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12))

# What the set changes: depth everywhere; heads (head dim kept) and FF width where CPU memory/time need it.
FLUX_BUILT = {**FLUX, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1}
VAE_BUILT = {**VAE, "layers_per_block": 1}
CLIP_BUILT = {**CLIP_L, "num_hidden_layers": 1}
T5_BUILT = {**T5_XXL, "num_heads": 4, "d_ff": 1024, "num_layers": 1}
# GQA kept at 7:1 with the real head dim 128: 7 query heads, 1 KV head, width 896.
QWEN_TEXT_BUILT = {**QWEN_TEXT, "hidden_size": 896, "intermediate_size": 4736, "num_hidden_layers": 1,
                   "num_attention_heads": 7, "num_key_value_heads": 1}
# Block 0 windowed, block 1 full attention (the 7B's pattern: full every 8th block).
QWEN_VISION_BUILT = {**QWEN_VISION, "depth": 2, "hidden_size": 160, "intermediate_size": 428, "num_heads": 2,
                     "out_hidden_size": 896, "fullatt_block_indexes": [1]}
VIT_BUILT = dict(embed_dim=768, vision=dict(image_size=224, layers=1, width=128, head_width=64, patch_size=14),
                 text=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=1))


def build_flux_fill(out: Path, seed: int = 0, flux: dict | None = None, vae: dict | None = None,
                    clip: dict | None = None, t5: dict | None = None):
    """The configs default to the *_BUILT set; benchmarks/paper_scale.py passes its own sizes."""
    flux, vae, clip, t5 = flux or FLUX_BUILT, vae or VAE_BUILT, clip or CLIP_BUILT, t5 or T5_BUILT
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from onereward_cli.models.tiny import clip_tokenizer, t5_vocab

    # The tiny zoo's tokenizers (byte-level CLIP, word/char unigram T5): ids fit the real vocabularies.
    tok = clip_tokenizer()
    tok2 = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(**flux)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        in_channels=3, out_channels=3, **{**vae, "block_out_channels": tuple(vae["block_out_channels"])})
    te = CLIPTextModel(CLIPTextConfig(**clip, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    te2 = T5EncoderModel(T5Config(**{k: v for k, v in t5.items() if k != "max_sequence_length"},
                                  dropout_rate=0.0))
    for mod in (tr, vae, te, te2):
        mod.eval().to(torch.bfloat16)  # saved as the real checkpoint is (half the bytes of float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxFillPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                     transformer=tr).save_pretrained(out)


def build_qwen_vl(out: Path, tiny_qwen: Path, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """The 7B layout at reduced depth/width (or `text` / `vision` configs); tokenizer, chat template and
    processor from the tiny zoo's folder `tiny_qwen`, with the real checkpoint's pixel floor (56^2)."""
    text, vision = text or QWEN_TEXT_BUILT, vision or QWEN_VISION_BUILT
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    proc.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 12845056}  # the 7B's processor
    tok = proc.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
                                                      "<|vision_start|>", "<|vision_end|>")}
    t = {k: v for k, v in text.items() if k != "mrope_section"}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**t, max_position_embeddings=32768, max_window_layers=t["num_hidden_layers"],
                         rope_parameters={"rope_type": "default", "mrope_section": QWEN_TEXT["mrope_section"],
                                          "rope_theta": 1000000.0},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().to(torch.bfloat16).save_pretrained(out)
    proc.save_pretrained(out)


def build_open_clip(out: Path, seed: int = 0):
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {"embed_dim": VIT_BUILT["embed_dim"], "vision_cfg": VIT_BUILT["vision"],
                         "text_cfg": VIT_BUILT["text"]},
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def build_all(root: Path, tiny_qwen: Path) -> Path:
    root = Path(root)
    build_flux_fill(root / "flux-fill")
    build_qwen_vl(root / "qwen2.5-vl", tiny_qwen)
    build_open_clip(root / "open-clip")
    return root

"""Each metric on tiny random models of its real classes, saved in the real on-disk format and loaded
through the metric's own loader; the score is checked against a hand computation of the authors'
formula. Also: GSB counting, Table 3 aggregation, and the per-metric error isolation."""
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onereward_cli import metrics as M
from onereward_cli.errors import InputError


def _rand_image(seed, w=48, h=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _mcfg(**kw):
    from onereward_cli.recipe import MetricsConfig

    return MetricsConfig(**kw)


def _upstream_clip_transform(size):
    """ImageReward's / HPSv2's torchvision eval transform, verbatim."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(M.CLIP_MEAN, M.CLIP_STD)])


def test_clip_preprocess_matches_torchvision_pipeline():
    for w, h in ((48, 40), (40, 48), (33, 77)):
        im = _rand_image(w * h, w, h)
        ours = M.clip_preprocess(im, 32)
        ref = _upstream_clip_transform(32)(im)
        assert torch.allclose(ours, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickscore_dir(zoo, tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("pickscore")
    tok = CLIPTokenizer.from_pretrained(Path(zoo) / "flux-fill" / "tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        image_size=32, patch_size=8), projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d)
    return d


def test_pickscore_is_logit_scale_times_cosine(pickscore_dir):
    from onereward_cli.metrics import pickscore

    metric = M.load_metric("pickscore", _mcfg(pickscore=str(pickscore_dir), pickscore_processor=""), "cpu", torch.float32)
    images = [_rand_image(1), _rand_image(2, 40, 48)]
    prompts = ["a red circle", "a blue star on a dots background"]
    items = [M.EvalItem(f"s{i}", "fill", p, im, np.zeros((40, 48), np.uint8), im) for i, (im, p) in enumerate(zip(images, prompts))]
    got = [r["pickscore"] for r in metric.score(items)]

    model, proc = pickscore.load_model(str(pickscore_dir), "", "cpu", torch.float32)
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        tx = proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        txt = model.text_projection(model.text_model(**tx).pooler_output)
        want = model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
        # CLIPModel's own logits are the same quantity: logit_scale * cos, pairwise.
        logits = model(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"], pixel_values=px).logits_per_text
    assert abs(float(model.logit_scale.detach().exp()) - math.exp(3.0)) < 1e-4
    assert np.allclose(got, want.numpy(), atol=1e-5)
    assert np.allclose(got, torch.diagonal(logits).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# HPSv2
# ----------------------------------------------------------------------------------------------
def test_hpsv2_is_plain_cosine(zoo):
    import open_clip

    from onereward_cli.metrics import hpsv2

    folder = str(Path(zoo) / "open-clip")
    metric = M.load_metric("hpsv2", _mcfg(hpsv2=folder), "cpu", torch.float32)
    images = [_rand_image(3), _rand_image(4)]
    prompts = ["a green square", "a yellow triangle"]
    items = [M.EvalItem(f"s{i}", "extend", p, im, np.zeros((40, 48), np.uint8), im) for i, (im, p) in enumerate(zip(images, prompts))]
    got = [r["hpsv2"] for r in metric.score(items)]

    # Hand computation straight from open_clip: the state dict in the folder, forward, cosine.
    model = open_clip.create_model(f"local-dir:{folder}")
    model.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    x = torch.stack([_upstream_clip_transform(size)(im) for im in images])
    with torch.no_grad():
        out = model(x, tok(prompts))
    img, txt = out[0], out[1]  # normalised features
    want = (img * txt).sum(-1)
    assert np.allclose(got, want.numpy(), atol=1e-5)
    assert all(-1.0 <= g <= 1.0 for g in got)  # a cosine, no logit scale

    with pytest.raises(InputError, match="convert"):
        bad = Path(folder).parent / "hps.pt"
        bad.write_bytes(b"not really")
        try:
            hpsv2.load_model(str(bad), "ViT-H-14", "cpu", torch.float32)
        finally:
            bad.unlink()


# ----------------------------------------------------------------------------------------------
# ImageReward
# ----------------------------------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "star",
         "on", "background", "dots", "remove"]
MED = dict(vocab_size=len(VOCAB) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, add_cross_attention=True, encoder_width=768,
           model_type="bert", type_vocab_size=2, architectures=["BertModel"])
VIS = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _timm_blip_vit():
    """BLIP's ViT is timm's VisionTransformer layout (same keys, eps 1e-6, qkv bias, final norm)."""
    import timm

    torch.manual_seed(1)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=VIS["image_size"], patch_size=VIS["patch_size"], embed_dim=VIS["hidden_size"],
        depth=VIS["num_hidden_layers"], num_heads=VIS["num_attention_heads"], mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="")
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def _med_state_dict(g):
    H, I, V, E = MED["hidden_size"], MED["intermediate_size"], MED["vocab_size"], VIS["hidden_size"]
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"embeddings.word_embeddings.weight": r(V, H), "embeddings.position_embeddings.weight": r(MED["max_position_embeddings"], H),
          "embeddings.LayerNorm.weight": 1 + r(H), "embeddings.LayerNorm.bias": r(H),
          "embeddings.position_ids": torch.arange(MED["max_position_embeddings"])[None]}
    for i in range(MED["num_hidden_layers"]):
        for blk, kv in (("attention", H), ("crossattention", E)):
            p = f"encoder.layer.{i}.{blk}"
            sd.update({f"{p}.self.query.weight": r(H, H), f"{p}.self.query.bias": r(H),
                       f"{p}.self.key.weight": r(H, kv), f"{p}.self.key.bias": r(H),
                       f"{p}.self.value.weight": r(H, kv), f"{p}.self.value.bias": r(H),
                       f"{p}.output.dense.weight": r(H, H), f"{p}.output.dense.bias": r(H),
                       f"{p}.output.LayerNorm.weight": 1 + r(H), f"{p}.output.LayerNorm.bias": r(H)})
        p = f"encoder.layer.{i}"
        sd.update({f"{p}.intermediate.dense.weight": r(I, H), f"{p}.intermediate.dense.bias": r(I),
                   f"{p}.output.dense.weight": r(H, I), f"{p}.output.dense.bias": r(H),
                   f"{p}.output.LayerNorm.weight": 1 + r(H), f"{p}.output.LayerNorm.bias": r(H)})
    return sd


def _med_reference(sd, input_ids, attn_mask, image_embeds):
    """BLIP's MED in "multimodal" mode, written out from med.py: bidirectional self-attention with the
    text padding mask, cross-attention to every image token, post-LN residual blocks."""
    H, nh, eps = MED["hidden_size"], MED["num_attention_heads"], MED["layer_norm_eps"]
    hd = H // nh
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    ln = lambda x, p: F.layer_norm(x, (H,), sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731

    def attn(x, kv, p, mask_add):
        split = lambda t: t.view(t.shape[0], t.shape[1], nh, hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(lin(x, p + ".self.query")), split(lin(kv, p + ".self.key")), split(lin(kv, p + ".self.value"))
        ctx = ((q @ k.transpose(-1, -2) / math.sqrt(hd) + mask_add).softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return ln(lin(ctx, p + ".output.dense") + x, p + ".output.LayerNorm")

    L = input_ids.shape[1]
    x = ln(sd["embeddings.word_embeddings.weight"][input_ids] + sd["embeddings.position_embeddings.weight"][:L],
           "embeddings.LayerNorm")
    self_mask = (1.0 - attn_mask[:, None, None, :].float()) * -10000.0
    for i in range(MED["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        x = attn(x, x, p + ".attention", self_mask)
        x = attn(x, image_embeds, p + ".crossattention", 0.0)
        x = ln(lin(F.gelu(lin(x, p + ".intermediate.dense")), p + ".output.dense") + x, p + ".output.LayerNorm")
    return x


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("imagereward")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    (d / "med_config.json").write_text(json.dumps(MED))
    (d / "vision_config.json").write_text(json.dumps(VIS))
    g = torch.Generator().manual_seed(2)
    official = {f"blip.visual_encoder.{k}": v for k, v in _timm_blip_vit().state_dict().items()}
    official.update({f"blip.text_encoder.{k}": v for k, v in _med_state_dict(g).items()})
    official.update({"blip.vision_proj.weight": torch.randn(8, 48, generator=g), "blip.vision_proj.bias": torch.zeros(8),
                     "blip.text_proj.weight": torch.randn(8, 32, generator=g), "blip.text_proj.bias": torch.zeros(8)})
    from onereward_cli.metrics.imagereward import MLP_WIDTHS

    dims = (MED["hidden_size"],) + MLP_WIDTHS + (1,)
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        official[f"mlp.layers.{idx}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        official[f"mlp.layers.{idx}.bias"] = 0.1 * torch.randn(o, generator=g)
    save_file({k: v.contiguous() for k, v in official.items()}, str(d / "ImageReward.safetensors"))
    return d, official


def test_imagereward_port_matches_blip_formula(imagereward_dir):
    from onereward_cli.metrics import imagereward as IR

    d, official = imagereward_dir
    metric = M.load_metric("imagereward", _mcfg(imagereward=str(d)), "cpu", torch.float32)
    images = [_rand_image(5), _rand_image(6, 40, 48)]
    prompts = ["a red circle on a dots background", "remove"]
    items = [M.EvalItem(f"s{i}", "fill", p, im, np.zeros((40, 48), np.uint8), im) for i, (im, p) in enumerate(zip(images, prompts))]
    got = np.array([r["imagereward"] for r in metric.score(items)])

    # Reference: timm's ViT (BLIP's vision tower) + MED written out by hand + the linear MLP + standardisation.
    vit = _timm_blip_vit()
    x = torch.stack([_upstream_clip_transform(VIS["image_size"])(im) for im in images])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"].shape == (2, 35) and int(t["input_ids"][0, 0]) == tok.cls_token_id
    med = {k[len("blip.text_encoder."):]: v for k, v in official.items() if k.startswith("blip.text_encoder.")}
    with torch.no_grad():
        image_embeds = vit.forward_features(x)
        h = _med_reference(med, t["input_ids"], t["attention_mask"], image_embeds)[:, 0]
        for idx in (0, 2, 4, 6, 7):  # ReLUs are commented out upstream: a purely linear head
            h = h @ official[f"mlp.layers.{idx}.weight"].T + official[f"mlp.layers.{idx}.bias"]
    want = ((h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).numpy()  # official constants
    assert np.allclose(got, want, atol=1e-4), (got, want)

    # The port's vision tower alone equals timm's (key remapping is exact).
    model, _, _ = IR.load_model(str(d), "bert-base-uncased", "cpu", torch.float32)
    with torch.no_grad():
        assert torch.allclose(model.visual_encoder(pixel_values=x).last_hidden_state, image_embeds, atol=1e-5)


def test_imagereward_refuses_pickles_and_reports_missing_keys(imagereward_dir, tmp_path):
    from safetensors.torch import save_file

    from onereward_cli.metrics import imagereward as IR

    pt = tmp_path / "ImageReward.pt"
    pt.write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="pickle"):
        IR.load_model(str(pt), "bert-base-uncased", "cpu", torch.float32)
    d, official = imagereward_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("med_config.json", "vision_config.json", "vocab.txt", "tokenizer_config.json"):
        if (d / f).exists():
            (broken / f).write_bytes((d / f).read_bytes())
    part = {k: v.contiguous() for k, v in official.items() if "mlp.layers.7" not in k}
    save_file(part, str(broken / "ImageReward.safetensors"))
    with pytest.raises(InputError, match="mlp.layers.7"):
        IR.load_model(str(broken), "bert-base-uncased", "cpu", torch.float32)


def test_convert_uses_restricted_unpickler(tmp_path):
    from safetensors.torch import load_file

    from onereward_cli.metrics.convert import convert, main

    sd = {"state_dict": {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}, "epoch": 3}
    torch.save(sd, tmp_path / "ck.pt")
    assert convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors", key="state_dict") == 2
    out = load_file(str(tmp_path / "ck.safetensors"))
    assert torch.equal(out["a.weight"], sd["state_dict"]["a.weight"])

    class Evil:  # an arbitrary class: weights_only=True must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "evil.safetensors")]) == 2
    assert not (tmp_path / "evil.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# HPSv3
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hpsv3_files(zoo, tmp_path_factory):
    """A tiny Qwen2-VL base folder and a checkpoint in HPSv3's released (transformers 4.45) key layout."""
    from safetensors.torch import save_file
    from transformers import (AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from onereward_cli.metrics.hpsv3 import REWARD_TOKEN, rm_head

    base = tmp_path_factory.mktemp("qwen2vl-base")
    zp = AutoProcessor.from_pretrained(Path(zoo) / "qwen2.5-vl")
    tok = zp.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
                                                    "<|vision_start|>", "<|vision_end|>")}
    kw = dict(min_pixels=784, max_pixels=12544, patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw),
                     chat_template=zp.chat_template).save_pretrained(base)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(3)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(base)
    # The "trained" reward model: resized vocabulary (+<|Reward|>), new weights, a head.
    torch.manual_seed(4)
    trained = Qwen2VLForConditionalGeneration(cfg).eval()
    trained.resize_token_embeddings(len(tok) + 1, mean_resizing=False)
    head = rm_head(32).eval()
    released = {}
    for k, v in trained.state_dict().items():  # back to the old layout HPSv3.safetensors uses
        k = k.replace("model.visual.", "visual.", 1) if k.startswith("model.visual.") else k
        k = k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k
        released[k] = v.contiguous()
    released.update({f"rm_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    ck = tmp_path_factory.mktemp("hpsv3") / "HPSv3.safetensors"
    save_file(released, str(ck))
    return base, ck, trained, head, REWARD_TOKEN


def test_hpsv3_score_is_mu_at_reward_token(hpsv3_files):
    from transformers import AutoProcessor

    from onereward_cli.metrics import hpsv3 as H3

    base, ck, trained, head, token = hpsv3_files
    assert "visual.patch_embed.proj.weight" in __import__("safetensors").safe_open(str(ck), "pt").keys()
    metric = M.load_metric("hpsv3", _mcfg(hpsv3=str(ck), hpsv3_base=str(base), hpsv3_pixels=3136), "cpu", torch.float32)
    images = [_rand_image(7, 64, 48), _rand_image(8, 48, 64)]
    prompts = ["a red circle", "a blue star on a dots background"]
    items = [M.EvalItem(f"s{i}", "fill", p, im, np.zeros((48, 64), np.uint8), im) for i, (im, p) in enumerate(zip(images, prompts))]
    got = np.array([r["hpsv3"] for r in metric.score(items)])

    proc = AutoProcessor.from_pretrained(base, padding_side="right")
    proc.tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    rid = proc.tokenizer.convert_tokens_to_ids(token)
    want = []
    for im, p in zip(images, prompts):  # one at a time, no padding: the head at the token, index 0
        text = proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": H3.INSTRUCTION.format(text_prompt=p) + H3.PROMPT_WITH_SPECIAL_TOKEN}]}],
            tokenize=False, add_generation_prompt=True)
        assert text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")
        b = proc(text=[text], images=[H3.smart_resized(im, 3136)], return_tensors="pt")
        assert tuple(int(v) for v in b["image_grid_thw"][0]) == (1, 4, 4)  # 56 x 56 = 3136 px
        with torch.no_grad():
            h = trained.model(**b).last_hidden_state[0]
            pos = int((b["input_ids"][0] == rid).nonzero())
            want.append(float(head(h[pos])[0]))
    assert np.allclose(got, want, atol=1e-4), (got, want)


def test_hpsv3_rejects_mismatched_checkpoint(hpsv3_files, tmp_path):
    from safetensors.torch import save_file

    from onereward_cli.metrics import hpsv3 as H3

    base, ck, *_ = hpsv3_files
    save_file({"rm_head.0.weight": torch.zeros(1024, 32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InputError, match="missing"):
        H3.load_model(str(tmp_path / "x.safetensors"), str(base), "cpu", torch.float32)


# ----------------------------------------------------------------------------------------------
# ReMOVE
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    from transformers import SamConfig, SamModel

    d = tmp_path_factory.mktemp("sam")
    cfg = SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                                       output_channels=16, window_size=4, global_attn_indexes=[1], mlp_dim=64),
                    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
                    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                             iou_head_hidden_dim=16))
    torch.manual_seed(5)
    model = SamModel(cfg)
    with torch.no_grad():  # SAM's initializer_range is 1e-10: make the features depend on the pixels
        for p in model.vision_encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


def test_bounding_square_matches_upstream_rules():
    from onereward_cli.metrics.remove import find_smallest_bounding_square

    m = np.zeros((100, 100), np.uint8)
    m[40:50, 30:60] = 255  # 10 x 30 box, room for 16 px of padding
    assert find_smallest_bounding_square(m) == (30 - 16, 40 - 16, 30 + 32)
    m = np.zeros((100, 100), np.uint8)
    m[5:20, 50:60] = 255  # near the top: padding = min(min_col, min_row, H - max_row, W - max_col) = 5
    assert find_smallest_bounding_square(m) == (45, 0, 15 + 10)
    m[5:20, 50:60] = 254  # only exact white counts
    assert find_smallest_bounding_square(m) is None


def test_remove_is_one_when_inside_features_copy_outside():
    from onereward_cli.metrics.remove import remove_from_features

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 8, 8, generator=g)
    fg = np.zeros((8, 8), bool)
    fg[2:6, 2:6] = True
    bg = ~fg
    # Make the inside an exact copy of outside features (each fg cell copies some bg cell, the fg mean
    # equals the bg mean): cosine 1.
    same = feats.clone()
    bg_mean = same[:, torch.from_numpy(bg)].mean(-1)
    same[:, torch.from_numpy(fg)] = bg_mean[:, None]
    assert remove_from_features(same, fg, bg) == pytest.approx(1.0, abs=1e-6)
    flipped = same.clone()
    flipped[:, torch.from_numpy(fg)] = -bg_mean[:, None]
    assert remove_from_features(flipped, fg, bg) == pytest.approx(-1.0, abs=1e-6)
    assert math.isnan(remove_from_features(feats, np.zeros((8, 8), bool), bg))


def test_remove_metric_matches_hand_computation(sam_dir):
    from transformers import SamModel

    metric = M.load_metric("remove", _mcfg(remove=str(sam_dir)), "cpu", torch.float32)
    img = _rand_image(9, 96, 96)
    mask = np.zeros((96, 96), np.uint8)
    mask[30:50, 40:70] = 255
    got = metric.score([M.EvalItem("r", "removal", "remove", img, mask, img)])[0]["remove"]

    # By hand, following main.py: square crop x=24, y=14, size 62 (30 + 2 * 16); SAM preprocessing;
    # mask crop resized to the 8 x 8 feature grid with PIL's default filter, // 255.
    crop = np.asarray(img)[14:14 + 62, 24:24 + 62]
    resized = np.asarray(Image.fromarray(crop).resize((64, 64), Image.BILINEAR), dtype=np.float32)
    x = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)) \
        / torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    model = SamModel.from_pretrained(sam_dir).eval()
    with torch.no_grad():
        feats = model.get_image_embeddings(x[None])[0]
    fg = (np.array(Image.fromarray(mask[14:14 + 62, 24:24 + 62]).resize((8, 8))) // 255).astype(bool)
    bg = ~fg
    want = F.cosine_similarity(feats[:, torch.from_numpy(fg)].mean(-1), feats[:, torch.from_numpy(bg)].mean(-1), dim=0)
    assert got == pytest.approx(float(want), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Oracle, registry and error isolation
# ----------------------------------------------------------------------------------------------
def test_oracle_metric_equals_synth_oracle(synth_pool):
    from onereward_cli.synth import oracle_scores

    src = Image.open(sorted((synth_pool / "images").glob("*.png"))[0]).convert("RGB")
    mask = np.zeros((src.height, src.width), np.uint8)
    mask[10:30, 10:30] = 255
    cand = _rand_image(10, src.width, src.height)
    dims = ("text alignment", "consistency", "structure", "aesthetics")
    metric = M.oracle_metric({"fill": dims})
    row = metric.score([M.EvalItem("o", "fill", "a red circle", src, mask, cand, dims)])[0]
    want = oracle_scores(src, mask, cand, dims, "a red circle")
    for d in dims:
        assert row[f"oracle:{d}"] == pytest.approx(want[d])
    assert row["oracle"] == pytest.approx(np.mean(list(want.values())))


def test_failed_metric_is_recorded_and_others_continue(tmp_path, pickscore_dir):
    mcfg = _mcfg(pickscore=str(tmp_path / "no-such-checkpoint"), hpsv2=str(tmp_path / "also-missing.safetensors"),
                 oracle=True, imagereward="", normalised=True)
    img = _rand_image(11, 64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    dims = ("consistency", "structure")
    items = {"p": [M.EvalItem("a", "fill", "a red circle", img, mask, img, dims)],
             "q": [M.EvalItem("a", "fill", "a red circle", img, mask, img, dims)]}
    run = M.run_metrics(mcfg, items, device="cpu", dtype=torch.float32, batch_size=2, dimensions_by_task={"fill": dims})
    assert run.status["pickscore"].status == "error" and "no-such-checkpoint" in run.status["pickscore"].note
    assert run.status["hpsv2"].status == "error" and "not found" in run.status["hpsv2"].note
    assert run.status["imagereward"].status == "skipped" and "eval.metrics.imagereward" in run.status["imagereward"].note
    assert run.status["oracle"].status == "ok"
    assert set(run.values["oracle"]) == {("p", "a"), ("q", "a")}
    # Normalised columns appear for metrics with a known Table 2 scale.
    mcfg2 = _mcfg(pickscore=str(pickscore_dir), pickscore_processor="", oracle=False, normalised=True)
    run2 = M.run_metrics(mcfg2, items, device="cpu", dtype=torch.float32, batch_size=1, dimensions_by_task={})
    row = run2.values["pickscore"][("p", "a")]
    assert row["pickscore:norm"] == pytest.approx(row["pickscore"] / 26.0)
    assert run2.status["oracle"].status == "skipped"


# ----------------------------------------------------------------------------------------------
# Good-Same-Bad counting and Table 3 aggregation
# ----------------------------------------------------------------------------------------------
def test_gsb_judge_and_tally_on_fixed_judgements():
    from onereward_cli.metrics import gsb as G

    assert G.judge(0.9, 0.2) == "good"      # P wins both orders
    assert G.judge(0.3, 0.7) == "bad"       # Q wins both orders
    assert G.judge(0.9, 0.8) == "same"      # position bias: "yes" to whichever comes first
    assert G.judge(0.2, 0.1) == "same"
    assert G.judge(0.5, 0.4) == "same"      # exactly 0.5 is not a win
    recs = [("fill", "aesthetics", 0.9, 0.1), ("fill", "aesthetics", 0.8, 0.3), ("fill", "structure", 0.2, 0.9),
            ("fill", "structure", 0.7, 0.6), ("removal", "removal quality", 0.6, 0.4)]
    t = G.tally({"task": a, "dimension": b, "label": G.judge(x, y)} for a, b, x, y in recs)
    assert (t["fill"]["all"].good, t["fill"]["all"].same, t["fill"]["all"].bad) == (2, 1, 1)
    assert t["fill"]["all"].proportions() == {"good": 0.5, "same": 0.25, "bad": 0.25}
    assert t["fill"]["all"].net == pytest.approx(0.25)
    assert (t["fill"]["aesthetics"].good, t["fill"]["structure"].bad) == (2, 1)
    assert t["removal"]["all"].to_dict()["good_frac"] == 1.0
    rows = G.gsb_rows({"P vs Q": t}, str)
    assert rows[0][:7] == ["P vs Q", "fill", "all dimensions", 50.0, 25.0, 25.0, 4]


def test_gsb_from_ratings_and_plot(tmp_path):
    from onereward_cli.metrics import gsb as G

    means = {("fill", "a", "P", "aesthetics"): 4.0, ("fill", "a", "Q", "aesthetics"): 3.0,
             ("fill", "b", "P", "aesthetics"): 2.0, ("fill", "b", "Q", "aesthetics"): 2.0,
             ("fill", "b", "P", "usability"): 0.0, ("fill", "b", "Q", "usability"): 1.0,
             ("fill", "c", "P", "aesthetics"): 5.0}  # no Q rating for c: not compared
    recs = G.rating_judgements(means, "P", "Q")
    assert sorted((r["id"], r["dimension"], r["label"]) for r in recs) == [
        ("a", "aesthetics", "good"), ("b", "aesthetics", "same"), ("b", "usability", "bad")]
    path = G.plot_gsb({"P vs Q (human)": G.tally(recs), "P vs R (reward)": G.tally(recs[:1])}, tmp_path / "g.png", str)
    assert Image.open(path).size[0] > 100


def test_table3_aggregation_on_fixed_ratings(tmp_path):
    from onereward_cli.metrics import human as H

    csv = tmp_path / "ratings.csv"
    csv.write_text("sample,model,dimension,value,rater\n"
                   "f1,ours,usability,yes,r1\n"
                   "f1,ours,Usability Rate,no,r2\n"
                   "f2,ours,usability,1,r1\n"
                   "f2,ours,aesthetics,4,r1\n"
                   "f1,ours,aesthetics,3,r2\n"
                   "f1,base,usability,0,r1\n"
                   "f1,base,text_rendering,true,r1\n"
                   "f1,base,structural plausibility,2,r1\n"
                   "x1,ours,removal quality,yes,r1\n"
                   "x1,ours,removal quality,yes,r2\n")
    ratings = H.attach_tasks(H.read_ratings(csv), {"f1": "fill", "f2": "fill", "x1": "removal"}, csv)
    agg = H.aggregate(ratings)
    assert agg["fill"]["ours"]["usability"] == {"value": pytest.approx(100 * 2 / 3), "n": 3, "kind": "rate"}
    assert agg["fill"]["ours"]["aesthetics"]["value"] == pytest.approx(3.5)
    assert agg["fill"]["base"]["text rendering"]["value"] == 100.0
    assert agg["fill"]["base"]["structure"] == {"value": 2.0, "n": 1, "kind": "mos"}
    assert agg["removal"]["ours"]["removal quality"]["value"] == 100.0
    t = H.table3(agg, model_order=["base", "ours"])
    assert t.columns == ["Task", "Model", "Usability Rate(%)", "Structure", "Aesthetics", "Text Rendering(%)",
                         "Removal Quality(%)"]
    assert t.rows[0][:3] == ["Image Fill", "base", 0.0] and t.rows[1][1] == "ours"
    assert t.rows[2][0] == "Object Removal" and t.rows[2][-1] == 100.0

    jl = tmp_path / "ratings.jsonl"
    jl.write_text(json.dumps({"sample": "f1", "model": "ours", "dimension": "aesthetics", "value": 5, "task": "fill"})
                  + "\n" + json.dumps({"sample": "f1", "model": "ours", "dimension": "aesthetics", "value": 6}) + "\n")
    with pytest.raises(InputError, match=r"ratings.jsonl:2: value: .*1-5"):
        H.read_ratings(jl)


@pytest.mark.parametrize("row, match", [
    ("f1,ours,usability,maybe", r"ratings.csv:3: value: .*yes/no"),
    ("f1,ours,aesthetic,4", r"ratings.csv:3: dimension: unknown dimension 'aesthetic'"),
    ("f1,,aesthetics,4", r"ratings.csv:3: model: missing"),
    ("zz,ours,aesthetics,4", r"ratings.csv:3: task: sample 'zz' is not in the benchmark"),
])
def test_human_ratings_errors_name_file_line_field(tmp_path, row, match):
    from onereward_cli.metrics import human as H

    csv = tmp_path / "ratings.csv"
    csv.write_text("sample,model,dimension,value\nf1,ours,aesthetics,4\n" + row + "\n")
    with pytest.raises(InputError, match=match):
        H.attach_tasks(H.read_ratings(csv), {"f1": "fill"}, csv)
    (tmp_path / "bad.csv").write_text("sample,model,value\nf1,ours,4\n")
    with pytest.raises(InputError, match=r"bad.csv:1: dimension: missing column"):
        H.read_ratings(tmp_path / "bad.csv")

"""The tiny zoo: `onereward tiny-models` is reproducible to the byte and every model loads offline
through the public APIs that real checkpoints go through."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli.errors import InputError
from onereward_cli.models.tiny import ZOO_MODELS, build_zoo, resolve_model_path


def _cli():
    exe = Path(sys.executable).with_name("onereward")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onereward_cli.cli"]


@pytest.fixture(scope="module")
def two_zoos(tmp_path_factory):
    """Two random zoos built by two separate `onereward tiny-models DIR --random --force` processes."""
    dirs = [tmp_path_factory.mktemp("zoo_a"), tmp_path_factory.mktemp("zoo_b")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen(_cli() + ["tiny-models", str(d), "--random", "--force"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in dirs]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    return dirs


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(two_zoos):
    a, b = (_files(d) for d in two_zoos)
    weights = [k for k in a if k.endswith(".safetensors")]
    assert {Path(k).parts[0] for k in weights} == set(ZOO_MODELS)
    assert len(weights) >= 6  # flux: transformer, vae, 2 text encoders; qwen; open_clip
    assert sorted(a) == sorted(b)
    for k in weights:
        assert a[k] == b[k], k
    # configs, tokenizers and the scheduler too: same seed, same bytes
    assert [k for k in a if a[k] != b[k]] == []
    for name in ZOO_MODELS:
        assert (two_zoos[0] / name / ".complete").exists()
    assert not [p for p in two_zoos[0].iterdir() if p.name.startswith(".")]  # no build leftovers


def test_existing_zoo_is_not_rebuilt(two_zoos):
    d = two_zoos[0]
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*.safetensors")}
    assert build_zoo(d) == d
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.safetensors")} == before


def test_flux_fill_pipeline_loads_and_runs(two_zoos):
    from diffusers import FluxFillPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = FluxFillPipeline.from_pretrained(two_zoos[0] / "flux-fill")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.in_channels == 48
    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))

    def call(seed):
        return pipe(prompt="a red circle", image=img, mask_image=mask, height=32, width=32, num_inference_steps=2,
                    guidance_scale=30.0, max_sequence_length=32, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images

    out = call(0)
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, call(0))
    assert not torch.equal(out, call(1))


def test_qwen_vl_loads_tokenises_and_runs(two_zoos):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = two_zoos[0] / "qwen2.5-vl"
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
    proc = AutoProcessor.from_pretrained(d)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    tok = proc.tokenizer
    q = "Is the first image better than the second one?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": q}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"{vis}{vis}{q}<|im_end|>\n<|im_start|>assistant\n")
    ids = {}
    for w in ("yes", "no", "Yes", "No"):
        assert tok.tokenize(w) == [w]
        enc = tok.encode(w, add_special_tokens=False)
        assert len(enc) == 1
        ids[w] = enc[0]
        # the answer right after the generation prompt is that single token
        assert tok.encode(text + w, add_special_tokens=False)[-1] == ids[w]
    assert len(set(ids.values())) == 4
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray((rng.rand(56, 56, 3) * 255).astype(np.uint8)) for _ in range(2)]
    inp = proc(text=[text], images=imgs, return_tensors="pt")
    assert "mm_token_type_ids" in inp and inp["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        logits = model(**inp).logits
    assert logits.shape[:2] == inp["input_ids"].shape and logits.shape[-1] >= len(tok)
    assert torch.isfinite(logits).all()
    p_yes = torch.stack([logits[0, -1, ids["yes"]], logits[0, -1, ids["no"]]]).softmax(0)[0]
    assert 0 < p_yes < 1


def test_open_clip_loads_from_local_dir(two_zoos):
    import open_clip

    from onereward_cli.artifacts import load_tensors

    d = two_zoos[0] / "open-clip"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{d}")
    model.eval()
    saved = load_tensors(d / "open_clip_model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # the saved weights, not a random init
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)) for _ in range(3)]
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(im) for im in imgs]), normalize=True)
        ft = model.encode_text(tokenizer(["a red circle", "a blue square on a striped background"]), normalize=True)
    assert fi.shape == (3, 32) and ft.shape == (2, 32)
    assert torch.isfinite(fi).all() and torch.isfinite(ft).all()
    assert torch.allclose(fi.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_resolve_model_path(zoo):
    assert resolve_model_path("zoo:flux-fill") == str(zoo / "flux-fill")
    assert resolve_model_path("black-forest-labs/FLUX.1-Fill-dev") == "black-forest-labs/FLUX.1-Fill-dev"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"
    with pytest.raises(InputError) as exc:
        resolve_model_path("zoo:flux-fil")
    assert "flux-fill" in str(exc.value)


def test_resolve_random_and_trained_zoo(zoo, zoo_random):
    assert resolve_model_path("zoo-random:qwen2.5-vl") == str(zoo_random / "qwen2.5-vl")
    assert resolve_model_path("zoo:qwen2.5-vl") == str(zoo / "qwen2.5-vl")
    with pytest.raises(InputError, match="unknown zoo model"):
        resolve_model_path("zoo-random:nope")


def test_the_shipped_judge_resolves_loads_and_has_no_random_build(zoo):
    """zoo:onereward (the tiny OneReward judge the demo's RL optimises) is in the trained zoo, hash-checked,
    and loads through RewardScorer like any trained reward model; asking for a random one is an error."""
    import torch

    from onereward_cli.recipe import load_recipe
    from onereward_cli.reward import RewardScorer

    assert resolve_model_path("zoo:onereward") == str(zoo / "onereward")
    r = load_recipe("demo")
    sc = RewardScorer.load(r.demo.rl_reward_model, r.reward)
    assert sc.trained_with["query_mode"] == "full" and sc.trained_with["image_size"] == r.reward.image_size
    x = torch.rand(2, 3, 64, 64)
    p = sc.p_yes(x, x.flip(0), [["Is the first image better?"]] * 2)
    assert all(0 < float(v) < 1 for v in torch.cat(p))
    with pytest.raises(InputError, match="no random build"):
        resolve_model_path("zoo-random:onereward")


def test_add_judge_puts_a_reward_model_into_a_zoo_and_rehashes(zoo, tmp_path):
    import json
    import shutil

    from onereward_cli.models.tiny import add_judge, verify_trained

    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy, ignore=shutil.ignore_patterns("onereward"))
    with pytest.raises(InputError, match="not a reward model folder"):
        add_judge(copy / "qwen2.5-vl", copy)
    add_judge(zoo / "onereward", copy)
    assert verify_trained("onereward", copy) == copy / "onereward"
    man = json.loads((copy / "manifest.json").read_text())
    assert man["judge"]["reward"]["query_mode"] == "full" and "budget" in man  # pretrain's record kept

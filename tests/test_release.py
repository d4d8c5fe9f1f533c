"""The OneReward release as a user meets it, offline: tiny folders laid out like
bytedance-research/OneReward (two transformer folders and the object-removal LoRA, see release_layout.py),
as a local folder and as a Hugging Face cache entry, loaded into the base pipeline as the release's README
does, with the release's inference settings and fixed prompts; and `eval --recipe eval-onereward-release`
comparing base, OneReward and OneReward-Dynamic in one command."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli.errors import InputError
from onereward_cli.models.flux_fill import describe_policy, load_fill_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under --import-mode=importlib
from release_layout import BASE_REPO, LORA, RELEASE_REPO, TRANSFORMERS, build_release, hub_cache  # noqa: E402
from test_evaluate import _cli, _write_bench  # noqa: E402

ONEREWARD, DYNAMIC = TRANSFORMERS
RELEASE_SETTINGS = {"steps": 50, "guidance": 1.0, "true_cfg": 4.0, "negative_prompt": "nsfw"}


@pytest.fixture(scope="module")
def release(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    rel = build_release(zoo, root / "OneReward")
    return rel, hub_cache(zoo, rel, root / "hf-cache")


@pytest.fixture()
def hub(release, monkeypatch):
    """huggingface_hub (and diffusers through it) look up hub ids in the tiny cache."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(release[1]))
    return release[1]


def _forward(tr, seed=0):
    """The transformer's velocity on fixed random inputs (enough to tell two weight sets apart)."""
    c = tr.config
    g = torch.Generator().manual_seed(seed)
    n, L = 16, 8
    with torch.no_grad():
        return tr(hidden_states=torch.randn(1, n, c.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, L, c.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(L, 3),
                  guidance=torch.tensor([3.0]) if c.guidance_embeds else None, return_dict=False)[0]


def test_release_folders_are_known_by_name(release, tmp_path):
    """Guards: the release folders get the README's settings and fixed prompts, the LoRA goes on top of
    the Alg. 1 transformer, and a transformer folder the table does not know carries no settings."""
    rel, _ = release
    for name in TRANSFORMERS:
        info = describe_policy(str(rel / name))
        assert (info.kind, info.base, info.settings_from) == ("transformer", "", "OneReward release")
        assert info.inference == RELEASE_SETTINGS
        assert info.prompts == {"removal": "remove", "extend_no_prompt": "high-definition, perfect composition"}
    lora = describe_policy(str(rel / LORA))
    assert lora.kind == "lora" and lora.base == str((rel / ONEREWARD).resolve()) and lora.inference == RELEASE_SETTINGS
    other = tmp_path / "my-transformer"
    shutil.copytree(rel / ONEREWARD, other)
    info = describe_policy(str(other))
    assert info.kind == "transformer" and info.inference == {} and info.settings_from == ""
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a FluxFillPipeline folder"):
        describe_policy(str(tmp_path / "empty"))


def test_transformer_and_lora_folders_go_into_the_base_pipeline(release, zoo):
    """Guards: the release transformer replaces the base's (the rest of the pipeline stays the base's),
    the LoRA is applied on top of it, and a transformer-only folder without a base is an error."""
    from diffusers import FluxTransformer2DModel

    rel, _ = release
    base = str(zoo / "flux-fill")
    pipe = load_fill_pipeline(str(rel / ONEREWARD), default_base=base)
    want = FluxTransformer2DModel.from_pretrained(rel / ONEREWARD)
    assert torch.equal(_forward(pipe.transformer), _forward(want))
    plain = load_fill_pipeline(base)
    assert not torch.equal(_forward(pipe.transformer), _forward(plain.transformer))
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), plain.vae.state_dict().values()))
    lora = load_fill_pipeline(str(rel / LORA), default_base=base)
    assert lora.get_list_adapters() == {"transformer": ["default_0"]}
    assert (_forward(lora.transformer) - _forward(want)).abs().max() > 1e-4
    with pytest.raises(InputError, match="needs a base FluxFillPipeline"):
        load_fill_pipeline(str(rel / DYNAMIC))


def test_hub_subfolders_load_as_the_release_readme_does(hub):
    """Guards the hub-id path: `owner/repo/subfolder` goes through huggingface_hub and gives the same
    weights as the README's FluxTransformer2DModel.from_pretrained(repo, subfolder=...) and
    pipe.load_lora_weights(repo, subfolder=..., weight_name=...)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(RELEASE_REPO, subfolder=ONEREWARD)
    ref = FluxFillPipeline.from_pretrained(BASE_REPO, transformer=tr)
    mine = load_fill_pipeline(f"{RELEASE_REPO}/{ONEREWARD}", default_base=BASE_REPO)
    assert torch.equal(_forward(mine.transformer), _forward(ref.transformer))
    ref.load_lora_weights(RELEASE_REPO, subfolder=LORA, weight_name="pytorch_lora_weights.safetensors",
                          adapter_name="object_removal_lora")
    ref.set_adapters(["object_removal_lora"], adapter_weights=[1.0])
    mine_lora = load_fill_pipeline(f"{RELEASE_REPO}/{LORA}", default_base=BASE_REPO)
    assert (_forward(mine_lora.transformer) - _forward(ref.transformer)).abs().max() <= 1e-6
    assert describe_policy(f"{RELEASE_REPO}/{DYNAMIC}").inference == RELEASE_SETTINGS
    with pytest.raises(InputError, match="has no subfolder 'nope'"):
        load_fill_pipeline(f"{RELEASE_REPO}/nope", default_base=BASE_REPO)
    with pytest.raises(InputError, match="cannot fetch subfolder 'sub' of hub repo 'someone/else'"):
        load_fill_pipeline("someone/else/sub", default_base=BASE_REPO)


def test_eval_release_recipe_compares_base_onereward_dynamic(hub, zoo, synth_pool, tmp_path, capsys):
    """One command with the bundled recipe (hub ids resolved from the tiny cache). Guards: each policy
    runs with its own settings (release: guidance 1, true CFG 4, "nsfw"; base: the recipe's guidance
    30), eval.override forces steps on all, the release's fixed prompts are used, the report says
    which settings each ran with, and the OneReward edit equals a rollout computed by hand."""
    from onereward_cli import rollout
    from onereward_cli.evaluate import _to_tensor, _to_uint8

    bench = _write_bench(synth_pool, tmp_path / "bench")
    out = tmp_path / "eval"
    argv = ["eval", "--recipe", "eval-onereward-release", "--benchmark", str(bench), "--out", str(out),
            "--set", "device=cpu", "--set", "dtype=float32", "--set", "eval.resolution=64",
            "--set", "eval.max_sequence_length=32", "--set", "eval.batch_size=4", "--set", "eval.metrics.pickscore=",
            "--set", "eval.metrics.remove=", "--set", "eval.metrics.oracle=true", "--set", "eval.override.steps=2"]
    assert _cli(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    pol = {p["label"]: p for p in m["policies"]}
    assert list(pol) == ["OneReward", "FLUX.1-Fill-dev", "OneRewardDynamic"]
    for label in ("OneReward", "OneRewardDynamic"):
        assert pol[label]["settings"] == {**RELEASE_SETTINGS, "steps": 2, "resolution": 64}
        assert pol[label]["settings_source"] == {"steps": "override", "guidance": "policy", "true_cfg": "policy",
                                                 "negative_prompt": "policy", "resolution": "recipe"}
    assert pol["FLUX.1-Fill-dev"]["settings"] == {"steps": 2, "guidance": 30.0, "true_cfg": 1.0,
                                                  "negative_prompt": "", "resolution": 64}
    edits = {(e["policy"], e["id"]): e for e in map(json.loads, (out / "edits.jsonl").read_text().splitlines())}
    assert len(edits) == 12
    assert edits[("OneReward", "s3")]["prompt"] == "remove"
    assert edits[("OneReward", "s2")]["prompt"] == "high-definition, perfect composition"
    assert m["summary"]["removal"]["OneRewardDynamic"]["oracle"]["n"] == 1
    md = (out / "report.md").read_text()
    assert "Policies and the inference settings each ran with" in md
    assert "| OneReward | bytedance-research/OneReward/flux.1-fill-dev-OneReward-transformer | P | 2 | 1 | 4 | “nsfw” | 64² | own (OneReward release); recipe eval.*: resolution; eval.override: steps |" in md

    # The OneReward edit of s0, by hand: the release transformer in the base pipeline, true CFG 4.
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    pipe = FluxFillPipeline.from_pretrained(BASE_REPO, transformer=FluxTransformer2DModel.from_pretrained(
        RELEASE_REPO, subfolder=ONEREWARD))
    src = Image.open(out / "images" / "_inputs" / "64px" / "s0_source.png").convert("RGB")
    mask = np.asarray(Image.open(out / "images" / "_inputs" / "64px" / "s0_mask.png"))
    table = rollout.encode_unique(pipe, ["a red circle", "nsfw"], 32, device="cpu")
    x = rollout.full_rollout(pipe, _to_tensor(src)[None], torch.from_numpy(mask / 255.0).float()[None, None],
                             table.lookup(["a red circle"]), 2, 1.0, [torch.Generator("cpu").manual_seed(0)],
                             true_cfg=4.0, neg_embeds=table.lookup(["nsfw"]))
    got = np.asarray(Image.open(out / "images" / "OneReward" / "s0.png"))
    assert np.array_equal(got, _to_uint8(x[0]))
    base = np.asarray(Image.open(out / "images" / "FLUX.1-Fill-dev" / "s0.png"))
    assert not np.array_equal(got, base)

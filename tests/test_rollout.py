"""The one rollout implementation against FluxFillPipeline (parity), the flow-matching identities,
gradients, partial rollouts, the text-embedding cache, and loading pipelines/policies."""
import json

import numpy as np
import pytest
import torch

from onereward_cli import rollout as R
from onereward_cli.errors import InputError
from onereward_cli.models.flux_fill import load_fill_pipeline

H, W = 32, 48  # non-square on purpose: catches height/width swaps in packing and ids
STEPS, SEQ = 3, 32
TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(zoo):
    p = load_fill_pipeline("zoo:flux-fill")
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, H, W, generator=g)
    masks = torch.zeros(b, 1, H, W)
    masks[0, :, 8:24, 8:40] = 1
    if b > 1:
        masks[1:, :, :, :20] = 1
    return images, masks


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipeline_images(pipe, prompts, images, masks, guidance, seeds, **kw):
    return pipe(prompt=prompts, image=images, mask_image=masks, height=H, width=W, num_inference_steps=STEPS,
                guidance_scale=guidance, generator=_gens(seeds), max_sequence_length=SEQ, output_type="pt",
                **kw).images


# ----------------------------------------------------------------------------------------------
# Parity with FluxFillPipeline
# ----------------------------------------------------------------------------------------------
def test_full_rollout_matches_pipeline(pipe):
    images, masks = _inputs()
    prompts = ["a red circle", "remove"]
    ref = _pipeline_images(pipe, prompts, images, masks, 7.0, [0, 1])
    emb = R.encode_prompts(pipe, prompts, max_sequence_length=SEQ)
    out = R.full_rollout(pipe, images, masks, emb, STEPS, 7.0, _gens([0, 1]))
    assert out.shape == ref.shape == (2, 3, H, W)
    assert (out - ref).abs().max() <= TOL
    assert ref.std() > 0.01  # not a degenerate output


def test_single_generator_matches_pipeline(pipe):
    images, masks = _inputs(1)
    ref = pipe(prompt="a blue star", image=images, mask_image=masks, height=H, width=W, num_inference_steps=2,
               guidance_scale=30.0, generator=torch.Generator().manual_seed(5), max_sequence_length=SEQ,
               output_type="pt").images
    emb = R.encode_prompts(pipe, ["a blue star"], max_sequence_length=SEQ)
    out = R.full_rollout(pipe, images, masks, emb, 2, 30.0, torch.Generator().manual_seed(5))
    assert (out - ref).abs().max() <= TOL
    other = R.full_rollout(pipe, images, masks, emb, 2, 30.0, torch.Generator().manual_seed(6))
    assert (other - ref).abs().max() > 1e-3  # the seed matters


def test_custom_mu_matches_pipeline_shift(pipe, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_fill as mod

    images, masks = _inputs()
    monkeypatch.setattr(mod, "calculate_shift", lambda *a, **k: 0.93)
    ref = _pipeline_images(pipe, ["a", "b"], images, masks, 3.0, [2, 3])
    monkeypatch.undo()
    emb = R.encode_prompts(pipe, ["a", "b"], max_sequence_length=SEQ)
    out = R.full_rollout(pipe, images, masks, emb, STEPS, 3.0, _gens([2, 3]), mu=0.93)
    assert (out - ref).abs().max() <= TOL
    per_item = R.full_rollout(pipe, images, masks, emb, STEPS, 3.0, _gens([2, 3]), mu=[0.93, 0.93])
    assert (per_item - ref).abs().max() <= TOL
    default = R.full_rollout(pipe, images, masks, emb, STEPS, 3.0, _gens([2, 3]))
    assert (default - ref).abs().max() > 1e-4  # mu changes the schedule


@torch.no_grad()
def _reference_true_cfg(pipe, prompts, negs, images, masks, steps, guidance, true_cfg, seeds):
    """FluxFillCFGPipeline's loop written out with the pipeline's own pieces: one transformer call on
    [negative, positive], pred = neg + true_cfg * (pos - neg), the scheduler's step."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps

    B = len(prompts)
    gen = _gens(seeds)
    pe, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=SEQ)
    ne, npooled, _ = pipe.encode_prompt(prompt=negs, prompt_2=None, max_sequence_length=SEQ)
    init = pipe.image_processor.preprocess(images, height=H, width=W).to(torch.float32)
    seq = (H // pipe.vae_scale_factor // 2) * (W // pipe.vae_scale_factor // 2)
    c = pipe.scheduler.config
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    C = pipe.vae.config.latent_channels
    latents, img_ids = pipe.prepare_latents(init, timesteps[:1].repeat(B), B, C, H, W, pe.dtype, "cpu", gen)
    m = pipe.mask_processor.preprocess(masks, height=H, width=W)
    mk, mil = pipe.prepare_mask_latents(m, init * (1 - m), B, C, 1, H, W, pe.dtype, "cpu", gen)
    cond = torch.cat((mil, mk), dim=-1)
    g = torch.full([B], guidance, dtype=torch.float32)
    for t in timesteps:
        x = torch.cat((latents, cond), dim=2)
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * B) / 1000,
                               guidance=g.repeat(2), pooled_projections=torch.cat([npooled, pooled]),
                               encoder_hidden_states=torch.cat([ne, pe]), txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False)[0]
        v_neg, v_pos = out.chunk(2)
        latents = pipe.scheduler.step(v_neg + true_cfg * (v_pos - v_neg), t, latents, return_dict=False)[0]
    lat = pipe._unpack_latents(latents, H, W, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(lat, return_dict=False)[0], output_type="pt")


def test_true_cfg_matches_onereward_formula(pipe):
    images, masks = _inputs()
    prompts, negs = ["a red circle", "a green square"], ["nsfw", "nsfw"]
    ref = _reference_true_cfg(pipe, prompts, negs, images, masks, STEPS, 1.0, 4.0, [0, 1])
    emb = R.encode_prompts(pipe, prompts, max_sequence_length=SEQ)
    neg = R.encode_prompts(pipe, negs, max_sequence_length=SEQ)
    out = R.full_rollout(pipe, images, masks, emb, STEPS, 1.0, _gens([0, 1]), true_cfg=4.0, neg_embeds=neg)
    assert (out - ref).abs().max() <= TOL
    plain = _pipeline_images(pipe, prompts, images, masks, 1.0, [0, 1])
    assert (out - plain).abs().max() > 1e-4  # CFG did something
    with pytest.raises(ValueError, match="neg_embeds"):
        R.full_rollout(pipe, images, masks, emb, STEPS, 1.0, _gens([0, 1]), true_cfg=4.0)


def test_per_item_cfg_and_guidance_equal_separate_runs(pipe):
    images, masks = _inputs()
    emb = R.encode_prompts(pipe, ["a", "b"], max_sequence_length=SEQ)
    neg = R.encode_prompts(pipe, ["", "blurry"], max_sequence_length=SEQ)
    both = R.full_rollout(pipe, images, masks, emb, STEPS, torch.tensor([2.0, 9.0]), _gens([4, 5]),
                          true_cfg=torch.tensor([1.0, 3.0]), neg_embeds=neg, mu=[0.6, 1.1])
    a = R.full_rollout(pipe, images[:1], masks[:1], emb.select([0]), STEPS, 2.0, _gens([4]), mu=0.6)
    b = R.full_rollout(pipe, images[1:], masks[1:], emb.select([1]), STEPS, 9.0, _gens([5]), true_cfg=3.0,
                       neg_embeds=neg.select([1]), mu=1.1)
    assert (both[0] - a[0]).abs().max() <= TOL and (both[1] - b[0]).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------
# Schedule, noise, flow-matching identities
# ----------------------------------------------------------------------------------------------
def test_make_sigmas_equals_pipeline_schedule(pipe):
    images, masks = _inputs(1)
    seen = {}

    def grab(p, i, t, kw):
        seen.setdefault("sigmas", p.scheduler.sigmas.clone())
        return {}

    pipe(prompt="x", image=images, mask_image=masks, height=H, width=W, num_inference_steps=4, guidance_scale=1.0,
         max_sequence_length=SEQ, output_type="latent", callback_on_step_end=grab)
    s = R.make_sigmas(pipe, 4, H, W)
    assert s.shape == (5,) and s[-1] == 0 and s[0] == 1 and (s[1:] < s[:-1]).all()
    assert torch.equal(s, seen["sigmas"])
    before = pipe.scheduler.sigmas.clone()
    R.make_sigmas(pipe, 7, H, W, mu=1.1)
    assert torch.equal(pipe.scheduler.sigmas, before)  # the pipeline's own scheduler is untouched
    per = R.make_sigmas(pipe, 4, H, W, mu=[0.5, 1.15])
    assert per.shape == (2, 5) and (per[1, 1:-1] > per[0, 1:-1]).all()  # larger mu, more noise kept


def test_initial_latents_match_prepare_latents(pipe):
    images, _ = _inputs()
    init = pipe.image_processor.preprocess(images, height=H, width=W)
    # prepare_latents reads the scheduler's state: set it as __call__ does before calling it.
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=R.default_mu(pipe, H, W))
    pipe.scheduler.set_begin_index(0)
    C = pipe.vae.config.latent_channels
    with torch.no_grad():
        ref, _ = pipe.prepare_latents(init, pipe.scheduler.timesteps[:1].repeat(2), 2, C, H, W, torch.float32, "cpu",
                                      _gens([8, 9]))
    out = R.initial_latents(pipe, 2, H, W, _gens([8, 9]), "cpu", torch.float32)
    assert out.shape == ref.shape == (2, (H // 4) * (W // 4), 4 * C)
    assert torch.equal(out, ref)


def test_predict_x0_is_the_scheduler_definition(pipe):
    torch.manual_seed(0)
    sig = R.make_sigmas(pipe, 4, H, W)
    x0 = torch.randn(2, 96, 16)
    eps = torch.randn(2, 96, 16)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=R.default_mu(pipe, H, W))
    for i in range(4):
        s, s_next = sig[i], sig[i + 1]
        x_t = (1 - s) * x0 + s * eps
        v = eps - x0
        assert torch.allclose(R.predict_x0(x_t, v, s), x0, atol=1e-5)
        step = sched.step(v, sched.timesteps[i], x_t, return_dict=False)[0]
        assert torch.allclose(step, (1 - s_next) * x0 + s_next * eps, atol=1e-5)
        assert torch.allclose(R.euler_step(x_t, v, s, s_next), step, atol=1e-6)
    # Per-item sigma: one value per batch row.
    s2 = torch.tensor([0.3, 0.8])
    x_t = (1 - s2.view(2, 1, 1)) * x0 + s2.view(2, 1, 1) * eps
    assert torch.allclose(R.predict_x0(x_t, eps - x0, s2), x0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Partial rollouts and gradients
# ----------------------------------------------------------------------------------------------
def _setup(pipe, b=2):
    images, masks = _inputs(b)
    emb = R.encode_prompts(pipe, ["a red circle", "remove"][:b], max_sequence_length=SEQ)
    sig = R.make_sigmas(pipe, 4, H, W)
    gen = _gens(range(b))
    lat = R.initial_latents(pipe, b, H, W, gen, "cpu", torch.float32)
    cond = R.prepare_condition(pipe, images, masks, gen)
    return images, masks, emb, sig, lat, cond


def test_partial_rollout_stops_at_the_chosen_step(pipe):
    images, masks, emb, sig, lat, cond = _setup(pipe)
    tr = pipe.transformer
    with torch.no_grad():
        full = R.denoise(tr, lat, cond, emb, sig, 0, 4, 5.0)
        half = R.denoise(tr, lat, cond, emb, sig, 0, 2, 5.0)
        rest = R.denoise(tr, half, cond, emb, sig, 2, 4, 5.0)
        assert torch.equal(R.denoise(tr, lat, cond, emb, sig, 1, 1, 5.0), lat)
    assert torch.equal(rest, full) and not torch.allclose(half, full)
    # The pipeline's own latents after step 2 (callback) equal our partial rollout to stop=2.
    seen = {}

    def grab(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {}

    pipe(prompt=["a red circle", "remove"], image=images, mask_image=masks, height=H, width=W, num_inference_steps=4,
         guidance_scale=5.0, generator=_gens([0, 1]), max_sequence_length=SEQ, output_type="latent",
         callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    assert (seen[1] - half).abs().max() <= TOL
    with pytest.raises(ValueError):
        R.denoise(tr, lat, cond, emb, sig, 3, 5, 5.0)


def test_gradient_flows_through_one_step_and_decode(pipe):
    images, masks, emb, sig, lat, cond = _setup(pipe)
    tr = pipe.transformer
    with torch.no_grad():
        x_t = R.denoise(tr, lat, cond, emb, sig, 0, 2, 5.0)
    tr.zero_grad(set_to_none=True)
    x_t = x_t.detach().requires_grad_(True)
    v = R.velocity(tr, x_t, cond, emb, sig[2], 5.0)
    img = R.decode(pipe, R.predict_x0(x_t, v, sig[2]), H, W)
    assert img.shape == (2, 3, H, W) and 0 <= img.min() and img.max() <= 1
    img.mean().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    w = tr.x_embedder.weight.grad
    assert w is not None and torch.isfinite(w).all() and w.abs().sum() > 0
    tr.zero_grad(set_to_none=True)
    # decode alone is differentiable in its input
    z = torch.randn(1, (H // 4) * (W // 4), 16, requires_grad=True)
    R.decode(pipe, z, H, W).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_decode_matches_pipeline_postprocess(pipe):
    z = torch.randn(2, (H // 4) * (W // 4), 16, generator=torch.Generator().manual_seed(0))
    lat = pipe._unpack_latents(z, H, W, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.no_grad():
        ref = pipe.image_processor.postprocess(pipe.vae.decode(lat, return_dict=False)[0], output_type="pt")
        assert (R.decode(pipe, z, H, W) - ref).abs().max() <= 1e-6


def test_velocity_without_guidance_embeds(pipe):
    """A transformer without the guidance embedding (e.g. FLUX.1-schnell-like configs) gets guidance=None."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(pipe.transformer.config)
    cfg["guidance_embeds"] = False
    torch.manual_seed(0)
    tr = FluxTransformer2DModel.from_config(cfg).eval()
    images, masks, emb, sig, lat, cond = _setup(pipe)
    with torch.no_grad():
        v1 = R.velocity(tr, lat, cond, emb, sig[0], 1.0)
        v2 = R.velocity(tr, lat, cond, emb, sig[0], 30.0)
    assert torch.equal(v1, v2) and v1.shape == lat.shape


def test_rejects_sizes_not_multiple_of_16_in_pixels(pipe):
    with pytest.raises(ValueError, match="multiples"):
        R.prepare_condition(pipe, torch.rand(1, 3, 30, 32), torch.ones(1, 1, 30, 32))


# ----------------------------------------------------------------------------------------------
# Text-embedding cache
# ----------------------------------------------------------------------------------------------
def test_text_embeds_cache_round_trip(pipe, tmp_path, zoo):
    prompts = ["a red circle", "remove", "a red circle"]
    emb = R.encode_unique(pipe, prompts, SEQ)
    assert emb.prompts == ("a red circle", "remove") and len(emb) == 2
    f = tmp_path / "embeds.safetensors"
    emb.save(f)
    back = R.TextEmbeds.load(f)
    assert back.prompts == emb.prompts
    for a, b in ((emb.prompt_embeds, back.prompt_embeds), (emb.pooled_prompt_embeds, back.pooled_prompt_embeds),
                 (emb.text_ids, back.text_ids)):
        assert torch.equal(a, b)
    rows = back.lookup(prompts)
    assert rows.prompts == tuple(prompts) and torch.equal(rows.prompt_embeds[0], rows.prompt_embeds[2])
    with pytest.raises(KeyError):
        back.lookup(["never encoded"])
    # A pipeline without text encoders generates the same images from the cached embeddings.
    images, masks = _inputs(3)
    fresh = R.full_rollout(pipe, images, masks, R.encode_prompts(pipe, prompts, SEQ), 2, 4.0, _gens([1, 2, 3]))
    bare = load_fill_pipeline("zoo:flux-fill")
    bare.text_encoder = bare.text_encoder_2 = None
    cached = R.full_rollout(bare, images, masks, R.TextEmbeds.load(f).lookup(prompts), 2, 4.0, _gens([1, 2, 3]))
    assert (cached - fresh).abs().max() <= TOL


def test_text_embeds_load_rejects_other_files(tmp_path):
    from onereward_cli.artifacts import save_tensors

    f = tmp_path / "x.safetensors"
    save_tensors(f, {"w": torch.zeros(2)})
    with pytest.raises(InputError, match="not a text-embedding file"):
        R.TextEmbeds.load(f)
    with pytest.raises(InputError, match="not found"):
        R.TextEmbeds.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# load_fill_pipeline: specs, rl policy folders
# ----------------------------------------------------------------------------------------------
def test_load_pipeline_specs(zoo, tmp_path):
    p = load_fill_pipeline(str(zoo / "flux-fill"))
    assert type(p).__name__ == "FluxFillPipeline"
    with pytest.raises(InputError, match="not found"):
        load_fill_pipeline(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="model_index.json"):
        load_fill_pipeline(str(tmp_path))
    with pytest.raises(InputError, match="unknown zoo model"):
        load_fill_pipeline("zoo:sdxl")
    with pytest.raises(InputError, match="empty"):
        load_fill_pipeline("  ")
    with pytest.raises(InputError, match="cannot load"):
        load_fill_pipeline("no-such-owner/no-such-model")  # offline: not in the cache


def _write_policy(d, base, kind):
    d.mkdir(parents=True, exist_ok=True)
    (d / "onereward_policy.json").write_text(json.dumps({"base": base, "kind": kind}))


def test_load_transformer_policy(zoo, tmp_path, pipe):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(str(zoo / "flux-fill" / "transformer"))
    with torch.no_grad():
        tr.x_embedder.weight.add_(0.5)
    d = tmp_path / "policy"
    tr.save_pretrained(d)
    _write_policy(d, "zoo:flux-fill", "transformer")
    p = load_fill_pipeline(str(d))
    assert torch.equal(p.transformer.x_embedder.weight, tr.x_embedder.weight)
    assert not torch.equal(p.transformer.x_embedder.weight, pipe.transformer.x_embedder.weight)


def test_load_lora_policy(zoo, tmp_path, pipe):
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = FluxTransformer2DModel.from_pretrained(str(zoo / "flux-fill" / "transformer"))
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    d = tmp_path / "policy"
    FluxFillPipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(tr))
    _write_policy(d, "zoo:flux-fill", "lora")
    loaded = load_fill_pipeline(str(d))
    _, _, emb, sig, lat, cond = _setup(pipe)
    with torch.no_grad():
        want = R.velocity(tr, lat, cond, emb, sig[1], 3.0)
        got = R.velocity(loaded.transformer, lat, cond, emb, sig[1], 3.0)
        base = R.velocity(pipe.transformer, lat, cond, emb, sig[1], 3.0)
    assert (got - want).abs().max() <= 1e-5 and (got - base).abs().max() > 1e-4


def test_bad_policy_folders(zoo, tmp_path):
    d = tmp_path / "p1"
    _write_policy(d, "zoo:flux-fill", "adapter")
    with pytest.raises(InputError, match="kind"):
        load_fill_pipeline(str(d))
    d = tmp_path / "p2"
    d.mkdir()
    (d / "onereward_policy.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read policy"):
        load_fill_pipeline(str(d))
    d = tmp_path / "p3"
    _write_policy(d, "zoo:flux-fill", "lora")
    with pytest.raises(InputError, match="pytorch_lora_weights"):
        load_fill_pipeline(str(d))
    d = tmp_path / "p4"
    _write_policy(d, str(tmp_path / "p4"), "transformer")
    with pytest.raises(InputError, match="loop"):
        load_fill_pipeline(str(d))

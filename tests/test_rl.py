"""`onereward rl` on the tiny zoo: Alg. 1 / Alg. 2 step semantics, eq. 5, EMA, resume, outputs."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onereward_cli import rl
from onereward_cli.errors import InputError, TrainingAborted
from onereward_cli.recipe import load_recipe

SET = ["rl.resolution=32", "rl.rollout_steps=3", "rl.t1=1", "rl.t2=2", "rl.batch_size=2",
       "reward.image_size=28", "rl.lora_rank=2", "rl.lora_alpha=2", "rl.max_sequence_length=16"]


@pytest.fixture(scope="module")
def conditions(tmp_path_factory, zoo):
    """A triplet JSONL with one sample per task (fill, extend, removal)."""
    d = tmp_path_factory.mktemp("rlcond")
    rng = np.random.default_rng(0)
    recs = []
    for i, task in enumerate(["fill", "extend", "extend_no_prompt", "removal"]):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"src{i}.png")
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 8:24] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        recs.append({"id": f"s{i}", "task": task, "source": f"src{i}.png", "mask": f"m{i}.png",
                     "prompt": "a red circle" if task in ("fill", "extend") else ""})
    (d / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "triplets.jsonl"


def recipe(*extra):
    return load_recipe("tiny", SET + list(extra))


def test_refl_loss_matches_eq5():
    p = [torch.tensor([0.3, 0.8]), torch.tensor([1.0])]
    loss, per = rl.refl_loss(p, 0.9)
    # sample 1: mean(max(0, .9-.3), max(0, .9-.8)) = .35; sample 2: max(0, .9-1) = 0
    assert torch.allclose(per[0], torch.tensor(0.35))
    assert torch.allclose(per[1], torch.tensor(0.0))
    assert torch.allclose(loss, torch.tensor(0.175))


def test_ema_update_formula():
    ema = {"w": torch.tensor([1.0, 2.0])}
    params = {"w": torch.tensor([3.0, -2.0])}
    rl.ema_update(ema, params, 0.9)
    assert torch.allclose(ema["w"], 0.9 * torch.tensor([1.0, 2.0]) + 0.1 * torch.tensor([3.0, -2.0]))


def test_task_sampling_follows_probabilities(conditions):
    r = recipe("rl.batch_size=8")
    conds_by_task = {"fill": [0], "extend": [1], "extend_no_prompt": [2], "removal": [3]}
    fake = [None] * 4
    counts = Counter()
    for step in range(500):
        idx, t, _ = rl.sample_batch(r, fake, conds_by_task, step)
        assert r.rl.t1 <= t <= r.rl.t2
        counts.update(idx)
    total = sum(counts.values())
    for k, i in conds_by_task.items():
        p = r.tasks[k].probability
        assert abs(counts[i[0]] / total - p) < 0.04, (k, counts[i[0]] / total, p)


@pytest.mark.parametrize("schedule, factors", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
])
def test_lr_schedule_and_its_resume(schedule, factors):
    """Warmup 2 then the schedule over 6 steps; a scheduler restored from its JSON state continues it."""
    from onereward_cli.checkpointing import make_scheduler

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)

    o = opt()
    s = make_scheduler(o, 2, schedule, 6)
    seen = []
    for _ in range(6):
        seen.append(o.param_groups[0]["lr"])
        o.step()
        s.step()
    assert seen == pytest.approx([2.0 * f for f in factors])
    o2 = opt()
    s2 = make_scheduler(o2, 2, schedule, 6)
    for _ in range(3):
        o2.step()
        s2.step()
    state = json.loads(json.dumps(s2.state_dict()))  # what rl's state.json holds
    o3 = opt()
    s3 = make_scheduler(o3, 2, schedule, 6)
    s3.load_state_dict(state)
    assert s3.get_last_lr() == pytest.approx(seen[3:4])


def test_step_is_deterministic_per_step_index():
    r = recipe()
    by = {"fill": [0, 1], "removal": [2]}
    a = rl.sample_batch(r, [None] * 3, by, 7)
    b = rl.sample_batch(r, [None] * 3, by, 7)
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(torch.randn(3, generator=a[2]), torch.randn(3, generator=b[2]))


@pytest.fixture(scope="module")
def trainer(conditions, zoo):
    r = recipe()
    conds = rl.load_conditions(r, conditions)
    return rl.Trainer(r, conds, r.models.reward, dynamic=False)


def test_gradient_only_through_final_step(trainer):
    calls = []
    h = trainer.policy.transformer.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        loss, idx, t, p_yes, x_theta = trainer.step(0)
    finally:
        h.remove()
    # reference rollout (rollout_steps calls, no grad) + policy no-grad steps t + exactly one grad call
    assert calls.count(True) == 1
    assert calls[-1] is True
    assert len(x_theta) == 1 and x_theta[0].requires_grad  # one shape bucket: every condition is square
    loss.backward()
    grads = [p.grad for p in trainer.policy.trainable.values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # frozen: the base transformer, the VAE and the reward model get no gradient
    assert all(p.grad is None for n, p in trainer.policy.transformer.named_parameters() if "lora" not in n)
    assert all(p.grad is None for p in trainer.pipe.vae.parameters())
    assert all(p.grad is None for p in trainer.scorer.model.parameters())
    trainer.opt.zero_grad(set_to_none=True)


def _step_grads(tr):
    loss, *_ = tr.step(0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.policy.trainable.items()}
    tr.opt.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_reward_activation_checkpointing_keeps_the_gradient(trainer, conditions, zoo):
    r = recipe("rl.reward_activation_checkpointing=true")
    ck = rl.Trainer(r, rl.load_conditions(r, conditions), r.models.reward, dynamic=False)
    from onereward_cli.models.qwen_vl import unwrap

    assert unwrap(ck.scorer.model).is_gradient_checkpointing
    assert not unwrap(trainer.scorer.model).is_gradient_checkpointing
    (la, ga), (lb, gb) = _step_grads(trainer), _step_grads(ck)
    assert torch.allclose(la, lb, atol=1e-6)
    assert sum(g.abs().sum() for g in ga.values()) > 0
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


def test_static_reference_is_cached_and_base_model(trainer):
    idx = [0, 1]
    images, masks = rl.stack_conditions(trainer.conds, idx, trainer.device, trainer.dtype)
    cond = trainer.rollout.prepare_condition(trainer.pipe, images, masks, generator=torch.Generator().manual_seed(0))
    a = trainer.reference_images(idx, cond, torch.Generator().manual_seed(1))
    assert set(idx) <= set(trainer.ref_cache)
    b = trainer.reference_images(idx, cond, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # depends only on (c, eps_1)


def test_dynamic_reference_uses_ema_weights(conditions, zoo):
    r = recipe()
    conds = rl.load_conditions(r, conditions)
    tr = rl.Trainer(r, conds, r.models.reward, dynamic=True)
    pol = tr.policy
    assert pol.reference is None  # Alg. 2 keeps no separate frozen reference
    with torch.no_grad():
        for n in pol.ema:
            pol.ema[n].add_(0.5)
    before = {n: p.detach().clone() for n, p in pol.trainable.items()}
    with pol.reference_transformer() as ref:
        assert ref is pol.transformer
        for n, p in pol.trainable.items():
            assert torch.allclose(p, pol.ema[n].to(p.dtype))
    for n, p in pol.trainable.items():
        assert torch.equal(p, before[n])


def _weights(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "pytorch_lora_weights.safetensors"))


def test_resume_equals_uninterrupted_and_outputs_load(conditions, zoo, tmp_path):
    from diffusers import FluxFillPipeline

    warm = "rl.lr_warmup=3"  # the lr ramps across the interruption
    full = tmp_path / "full"
    rl.run(recipe("rl.steps=4", "rl.save_every=2", warm), conditions, full)
    part = tmp_path / "part"
    rl.run(recipe("rl.steps=2", "rl.save_every=2", warm), conditions, part)
    with pytest.raises(rl.InputError, match="rl.lr_warmup"):  # another schedule is not the same run
        rl.run(recipe("rl.steps=4", "rl.save_every=2"), conditions, part, resume=True)
    rl.run(recipe("rl.steps=4", "rl.save_every=2", warm), conditions, part, resume=True)
    a, b = _weights(full / "policy"), _weights(part / "policy")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _weights(full / "ema"), _weights(part / "ema")
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    log = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    lr = recipe().rl.lr
    assert [r["lr"] for r in log] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr])
    assert (full / "reward_curves.png").exists() and (full / "run.json").exists()
    meta = json.loads((full / "policy" / "onereward_policy.json").read_text())
    assert meta["kind"] == "lora"
    pipe = FluxFillPipeline.from_pretrained(os.environ["ONEREWARD_ZOO"] + "/flux-fill")
    pipe.load_lora_weights(str(full / "policy"))
    out = pipe(prompt="a red circle", image=torch.rand(1, 3, 32, 32), mask_image=torch.ones(1, 1, 32, 32),
               height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_full_finetune_saves_transformer(conditions, zoo, tmp_path):
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "full-ft"
    rl.run(recipe("rl.steps=1", "rl.lora=false", "rl.save_every=0"), conditions, out, dynamic=True)
    tr = FluxTransformer2DModel.from_pretrained(out / "policy")
    assert tr.config.in_channels == 48
    meta = json.loads((out / "ema" / "onereward_policy.json").read_text())
    assert meta["kind"] == "transformer"
    # The settings it was trained with, which eval and generate default to for this policy.
    q = recipe().rl
    assert meta["inference"] == {"steps": q.rollout_steps, "guidance": q.guidance, "true_cfg": q.true_cfg,
                                 "negative_prompt": q.negative_prompt, "resolution": q.resolution}
    assert meta["prompts"] == {"extend_no_prompt": "high-definition, perfect composition", "removal": "remove"}


def test_mean_reward_rises_with_fixed_reward_model(conditions, zoo, tmp_path):
    """The logged reward of a trained run against the lr -> 0 control on the same seed (the same tasks,
    conditions, noise and t each step, so only the weights differ). A first-vs-last comparison within one
    run cannot fail by itself: its mean moves with which tasks each step samples (it passed at lr 1e-12)."""
    means = {}
    for lr in ("3e-2", "1e-12"):
        out = tmp_path / f"rise-{lr}"
        rl.run(recipe("rl.steps=16", f"rl.lr={lr}", "rl.save_every=0", "rl.batch_size=2", "rl.max_grad_norm=0"),
               conditions, out)
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert len(log) == 16
        means[lr] = float(np.mean([r["mean_reward"] for r in log[-8:]]))
    print(f"mean reward, last 8 steps: {means}")
    # Measured on the shipped zoo (2026-12-05): 0.7000 trained vs 0.6149 control (the judge shipped before:
    # 0.8926 vs 0.8773); the same lr for both gives 0.
    assert means["3e-2"] > means["1e-12"] + 0.005, means


def test_nonfinite_loss_skips_then_aborts(conditions, zoo, tmp_path, monkeypatch):
    real = rl.refl_loss

    def nan_loss(p_yes, lam):
        loss, per = real(p_yes, lam)
        return loss * float("nan"), per

    monkeypatch.setattr(rl, "refl_loss", nan_loss)
    out = tmp_path / "nan"
    rl.run(recipe("rl.steps=2", "rl.save_every=0", "rl.max_nonfinite=5"), conditions, out)
    assert json.loads((out / "run.json").read_text())["counts"]["nonfinite"] == 2
    assert not (out / "log.jsonl").exists()  # skipped steps are not logged as trained
    with pytest.raises(TrainingAborted, match="non-finite") as e:
        rl.run(recipe("rl.steps=4", "rl.save_every=0", "rl.max_nonfinite=2"), conditions, tmp_path / "nan2")
    assert e.value.field == "rl.max_nonfinite"


def test_nonfinite_abort_exits_3_and_keeps_the_last_good_checkpoint(conditions, zoo, tmp_path, monkeypatch, capsys):
    from onereward_cli import cli

    out = tmp_path / "abort"
    rl.run(recipe("rl.steps=2", "rl.save_every=1"), conditions, out)  # two good steps, checkpointed
    ck = out / "checkpoints" / "step-000002"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    real = rl.refl_loss
    monkeypatch.setattr(rl, "refl_loss", lambda p_yes, lam: (real(p_yes, lam)[0] * float("nan"), None))
    capsys.readouterr()
    argv = ["rl", str(conditions), "--out", str(out), "--resume", *sum((["--set", x] for x in SET), []),
            "--set", "rl.steps=5", "--set", "rl.max_nonfinite=2"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 3, err
    assert [x for x in err.splitlines() if "error" in x] == err.splitlines()[-1:]  # one line, no traceback
    last = err.splitlines()[-1]
    assert last.startswith(f"error: {out}: rl.max_nonfinite: training aborted") and str(ck) in last
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert not (out / "checkpoints" / "step-000005").exists()


@pytest.mark.parametrize("change,keys", [
    (["rl.lr=2e-3"], "rl.lr"),
    (["rl.lambda=0.5", "rl.tau=0.5"], "rl.lambda, rl.tau"),
])
def test_resume_refuses_changed_settings(conditions, zoo, tmp_path, change, keys):
    out = tmp_path / "run"
    rl.run(recipe("rl.steps=1", "rl.save_every=1"), conditions, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(InputError, match=f"cannot resume: {keys} differ") as e:
        rl.run(recipe("rl.steps=2", *change), conditions, out, resume=True)
    assert "step-000001" in str(e.value.path)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_resume_without_a_checkpoint_is_an_error(conditions, zoo, tmp_path):
    out = tmp_path / "absent"
    with pytest.raises(InputError, match="no checkpoint"):
        rl.run(recipe("rl.steps=1"), conditions, out, resume=True)
    assert not out.exists()  # refused before anything was written


def test_heldout_oracle_is_logged(conditions, zoo, tmp_path):
    out = tmp_path / "held"
    held = tmp_path / "heldout.jsonl"  # prompts the training conditions do not have
    recs = [json.loads(x) for x in conditions.read_text().splitlines()]
    for r in recs:
        r["source"] = str(conditions.parent / r["source"])
        r["mask"] = str(conditions.parent / r["mask"])
        r["prompt"] = "a blue star" if r["prompt"] else ""
    held.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rl.run(recipe("rl.steps=2", "rl.save_every=0", "rl.eval_every=1"), conditions, out, heldout=held)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["heldout_oracle"] <= 1.0 for r in log)


def test_bad_conditions_exit_2(tmp_path, zoo):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "fill", "source": "nope.png", "mask": "nope.png", "prompt": "x"}\n')
    from onereward_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["rl", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_accelerate_two_processes_cpu(conditions, zoo, tmp_path):
    out = tmp_path / "ddp"
    acc = Path(sys.executable).parent / "accelerate"
    # On a machine without a GPU, `accelerate launch --cpu` starts a single process (multi-CPU needs MPI);
    # `--multi_gpu` makes accelerate use torchrun, and recipe device=cpu gives each rank a gloo CPU group.
    cmd = [str(acc), "launch", "--multi_gpu", "--num_processes", "2", "-m", "onereward_cli.cli", "rl", str(conditions),
           "--out", str(out)] + sum([["--set", s] for s in SET + ["rl.steps=2", "rl.save_every=0"]], [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "policy" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def _transformer_out(tr):
    """The transformer's output on fixed random inputs: the function a LoRA policy computes."""
    g = torch.Generator().manual_seed(0)
    c = tr.config
    kw = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        return tr(**kw)[0]


def test_lora_policy_reloads_at_trained_strength(conditions, zoo, tmp_path):
    """alpha != rank: the saved adapter must reload as the exact trained function, through diffusers
    and through our own loader (generate / eval)."""
    from diffusers import FluxFillPipeline

    from onereward_cli.models.flux_fill import load_fill_pipeline

    r = recipe("rl.lora_rank=2", "rl.lora_alpha=8", "rl.steps=2", "rl.lr=1e-2", "rl.save_every=0")
    out = tmp_path / "alpha"
    rl.run(r, conditions, out)
    # The trained function, rebuilt the way rl holds it: base + adapter (r=2, alpha=8) + the final weights.
    pipe = load_fill_pipeline(r.models.policy)
    pol = rl.Policy(pipe.transformer, r.rl, dynamic=False, seed=r.seed)
    ck = out / "checkpoints" / "step-000002"
    pol.load_state_tensors(rl.load_tensors(ck / "policy.safetensors"), rl.load_tensors(ck / "ema.safetensors"))
    trained = _transformer_out(pol.transformer)
    with pol.reference_transformer() as base:
        assert (trained - _transformer_out(base)).abs().max() > 1e-3  # the adapters did move
    theirs = FluxFillPipeline.from_pretrained(str(zoo / "flux-fill"))
    theirs.load_lora_weights(str(out / "policy"))
    assert torch.allclose(_transformer_out(theirs.transformer), trained, atol=1e-5)
    ours = load_fill_pipeline(str(out / "policy"))
    assert torch.allclose(_transformer_out(ours.transformer), trained, atol=1e-5)
    # A policy saved before the fix (no adapter config in the header) loads with a warning.
    from safetensors.torch import load_file, save_file

    f = out / "policy" / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(f)), str(f))
    with pytest.warns(UserWarning, match="alpha = rank"):
        load_fill_pipeline(str(out / "policy"))


def _update(conditions, *extra, plain_bf16=False):
    """The change of the trainable weights after two full fine-tuning steps at lr 1e-4."""
    r = recipe("rl.lora=false", "rl.lr=1e-4", *extra)
    tr = rl.Trainer(r, rl.load_conditions(r, conditions), r.models.reward, dynamic=True)
    if plain_bf16:  # what rl did before: AdamW straight on the bf16 weights
        for p in tr.params:
            p.data = p.data.to(torch.bfloat16)
        tr.opt = torch.optim.AdamW(tr.params, lr=r.rl.lr, weight_decay=0.0)
        tr.sched = rl.make_scheduler(tr.opt, 0)
    w0 = {n: p.detach().float().clone() for n, p in tr.policy.trainable.items()}
    for s in range(2):
        loss, *_ = tr.step(s)
        tr.optimizer_step(loss)
    dtypes = {p.dtype for p in tr.params}
    return torch.cat([(p.detach().float() - w0[n]).flatten() for n, p in tr.policy.trainable.items()]), dtypes


def test_bf16_training_updates_fp32_master_weights(conditions, zoo):
    bf16 = ("dtype=bfloat16", "rl.mixed_precision=bf16")
    ref, _ = _update(conditions)  # fp32 throughout
    got, dtypes = _update(conditions, *bf16)
    assert dtypes == {torch.float32}
    # Like fp32: (almost) every weight moves and the step has the same size and direction. Not equal: the
    # bf16 forward changes the gradients, and Adam's first steps follow their signs. Cosine measured 0.605
    # with the shipped reward VLM (0.595 to above 0.6 with earlier weights of it); an unrelated update gives ~0.
    print(f"bf16 vs fp32 update: cosine {F.cosine_similarity(got, ref, dim=0):.3f}, norm ratio {got.norm() / ref.norm():.3f}")
    assert (got == 0).float().mean() < 0.01
    assert abs(got.norm() / ref.norm() - 1) < 0.1
    assert F.cosine_similarity(got, ref, dim=0) > 0.45
    # The failure this guards: in plain bf16 most ~1e-4 steps are below half an ulp and rounded away.
    lost, dtypes = _update(conditions, *bf16, plain_bf16=True)
    assert dtypes == {torch.bfloat16}
    assert (lost == 0).float().mean() > 0.3


def test_full_policy_is_saved_in_the_model_dtype_and_masters_survive():
    m = torch.nn.Linear(3, 2)
    w = m.weight.data.clone()
    with rl.stored_in(m, torch.bfloat16):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight.data, w)  # no rounding of the masters


def test_float16_training_is_refused(conditions, zoo, tmp_path):
    with pytest.raises(rl.InputError, match="dtype: training in float16 needs loss scaling"):
        rl.run(recipe("dtype=float16"), conditions, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_conditions_keep_their_aspect_ratio_and_batches_bucket_by_shape(zoo, tmp_path, dynamic):
    """Two shapes in one batch train; dynamic mode too, where swapping the EMA in for a later bucket's
    reference must not touch weights an earlier bucket's graph saved (it did: an in-place error)."""
    d = tmp_path / "wide"
    d.mkdir()
    rng = np.random.default_rng(1)
    recs = []
    for i, (w, h) in enumerate([(32, 32), (128, 32), (32, 32), (128, 32)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"src{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        recs.append({"id": f"s{i}", "task": "fill", "source": f"src{i}.png", "mask": f"m{i}.png",
                     "prompt": "a red circle"})
    (d / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = recipe("rl.batch_size=3", "tasks.fill.probability=1", "tasks.extend.probability=0",
               "tasks.extend_no_prompt.probability=0", "tasks.removal.probability=0")
    conds = rl.load_conditions(r, d / "triplets.jsonl")
    # about rl.resolution**2 pixels at the source's 4:1 aspect ratio, as generate sizes its conditions
    assert [tuple(c.image.shape[1:]) for c in conds] == [(32, 32), (16, 64), (32, 32), (16, 64)]
    assert all(c.mask.shape[1:] == c.image.shape[1:] for c in conds)
    tr = rl.Trainer(r, conds, r.models.reward, dynamic=dynamic)
    with torch.no_grad():  # an EMA that differs from the weights, as after training
        for n in tr.policy.ema:
            tr.policy.ema[n].add_(0.01)
    step = next(s for s in range(50) if len(rl.shape_buckets(conds, rl.sample_batch(r, conds, tr.by_task, s)[0])) == 2)
    loss, idx, t, p_yes, x_theta = tr.step(step)
    assert sorted(tuple(x.shape[2:]) for x in x_theta) == [(16, 64), (32, 32)]
    assert len(p_yes) == len(idx) == r.rl.batch_size and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.params)
    tr.opt.zero_grad(set_to_none=True)
    assert 0.0 <= rl.heldout_oracle(tr, conds) <= 1.0


@pytest.mark.parametrize("kind, lora, world, says", [("FSDP", "true", "2", "LoRA runs under DDP"),
                                                  ("FSDP", "false", "1", "this launch has one"),
                                                  ("DEEPSPEED", "false", "2", "does not run under DeepSpeed")])
def test_unsupported_sharded_launch_is_a_one_line_error(conditions, zoo, tmp_path, monkeypatch, capsys, kind, lora,
                                                        world, says):
    """What `accelerate launch --config_file recipes/accelerate/{fsdp-rl,deepspeed_*}.yaml` sets in the
    environment, where rl cannot honour it (full fine-tuning under FSDP on 2+ processes runs: test_fsdp.py)."""
    from onereward_cli.cli import main

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    monkeypatch.setenv("WORLD_SIZE", world)  # read only by the check, which runs before Accelerator()
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["rl", str(conditions), "--out", str(out)] + sum([["--set", s] for s in SET + [f"rl.lora={lora}"]], []))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_fsdp_config_on_one_process_fails_fast_through_accelerate_launch(conditions, zoo, tmp_path):
    out = tmp_path / "fsdp"
    acc = Path(sys.executable).parent / "accelerate"
    cfg = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp-rl.yaml"
    cmd = [str(acc), "launch", "--config_file", str(cfg), "--num_processes", "1", "-m", "onereward_cli.cli", "rl",
           str(conditions), "--out", str(out)] + sum([["--set", s] for s in SET + ["rl.lora=false"]], [])
    p = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0  # the launcher's own code; the rank's is 2 (see the in-process test)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "this launch has one" in lines[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr.split("error:")[0]  # the rank itself raised nothing
    assert not out.exists()


def _scripted_heldout(monkeypatch, scores):
    """heldout_oracle replaced by a score per optimizer steps taken (the scheduler's counter survives a
    resume), so which step is best is known in advance."""
    monkeypatch.setattr(rl, "heldout_oracle", lambda trainer, conds, n=4: scores[trainer.sched.last_epoch])


def test_keep_best_saves_the_best_heldout_step_and_the_last(conditions, zoo, tmp_path, monkeypatch):
    """Guards rl.keep_best: policy/ must be the weights of the step with the best held-out score, last/
    the final ones. Broken (policy/ saved from the final weights) the first assertion fails."""
    _scripted_heldout(monkeypatch, {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.4})
    sel = tmp_path / "sel"
    rl.run(recipe("rl.steps=3", "rl.save_every=0", "rl.eval_every=1", "rl.keep_best=true"), conditions, sel)
    one, three = tmp_path / "one", tmp_path / "three"
    rl.run(recipe("rl.steps=1", "rl.save_every=0"), conditions, one)  # step s is a function of s alone
    rl.run(recipe("rl.steps=3", "rl.save_every=0"), conditions, three)
    best, last, w1, w3 = (_weights(d) for d in (sel / "policy", sel / "last", one / "policy", three / "policy"))
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)  # the two candidates differ
    for k in w1:
        assert torch.equal(best[k], w1[k]), k
        assert torch.equal(last[k], w3[k]), k
    man = json.loads((sel / "run.json").read_text())
    assert man["selected"] == {"step": 1, "heldout_oracle": 0.7, "start_heldout_oracle": 0.5}


def test_keep_best_returns_the_base_model_when_nothing_beats_it(conditions, zoo, tmp_path, monkeypatch):
    """If no step beats the start, policy/ is the starting model: every LoRA up-projection is zero (PEFT
    initialises lora_B to 0), so the policy is exactly the base. Broken (no step-0 candidate) it fails."""
    _scripted_heldout(monkeypatch, {0: 0.9, 1: 0.7, 2: 0.6})
    out = tmp_path / "base"
    rl.run(recipe("rl.steps=2", "rl.save_every=0", "rl.eval_every=1", "rl.keep_best=true"), conditions, out)
    w = _weights(out / "policy")
    ups = [k for k in w if "lora_B" in k]
    assert ups and all(torch.count_nonzero(w[k]) == 0 for k in ups)
    assert any(torch.count_nonzero(v) > 0 for k, v in _weights(out / "last").items() if "lora_B" in k)


def test_keep_best_resumes_to_the_same_selection(conditions, zoo, tmp_path, monkeypatch):
    """The best snapshot is checkpointed: a run killed after its best step and resumed selects the same
    weights as an uninterrupted run (were the snapshot lost, the resumed run would pick a later step)."""
    _scripted_heldout(monkeypatch, {0: 0.5, 1: 0.8, 2: 0.6, 3: 0.7, 4: 0.4})
    s = ["rl.save_every=2", "rl.eval_every=1", "rl.keep_best=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    rl.run(recipe("rl.steps=4", *s), conditions, full)
    rl.run(recipe("rl.steps=2", *s), conditions, part)
    rl.run(recipe("rl.steps=4", *s), conditions, part, resume=True)
    for sub in ("policy", "last"):
        a, b = _weights(full / sub), _weights(part / sub)
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    assert json.loads((part / "run.json").read_text())["selected"]["step"] == 1


def test_keep_best_needs_eval_every():
    with pytest.raises(InputError, match="rl.keep_best"):
        recipe("rl.keep_best=true", "rl.eval_every=0")

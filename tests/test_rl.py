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
    assert x_theta.requires_grad
    loss.backward()
    grads = [p.grad for p in trainer.policy.trainable.values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # frozen: the base transformer, the VAE and the reward model get no gradient
    assert all(p.grad is None for n, p in trainer.policy.transformer.named_parameters() if "lora" not in n)
    assert all(p.grad is None for p in trainer.pipe.vae.parameters())
    assert all(p.grad is None for p in trainer.scorer.model.parameters())
    trainer.opt.zero_grad(set_to_none=True)


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

    full = tmp_path / "full"
    rl.run(recipe("rl.steps=4", "rl.save_every=2"), conditions, full)
    part = tmp_path / "part"
    rl.run(recipe("rl.steps=2", "rl.save_every=2"), conditions, part)
    rl.run(recipe("rl.steps=4", "rl.save_every=2"), conditions, part, resume=True)
    a, b = _weights(full / "policy"), _weights(part / "policy")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _weights(full / "ema"), _weights(part / "ema")
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    log = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
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
    out = tmp_path / "rise"
    rl.run(recipe("rl.steps=16", "rl.lr=3e-2", "rl.save_every=0", "rl.batch_size=2", "rl.max_grad_norm=0"),
           conditions, out)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first = np.mean([r["mean_reward"] for r in log[:4]])
    last = np.mean([r["mean_reward"] for r in log[-4:]])
    assert last > first, (first, last)


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

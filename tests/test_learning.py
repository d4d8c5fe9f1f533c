"""Tests that something *learns*, each against a control that must not (issue 13).

- RL with a reward whose gradient is known (a brightness judge) moves a fixed (batch, noise, t)
  rollout the right way; the same run at lr -> 0 does not move it.
- The static reference (Alg. 1) is the base model: after training has moved the adapters, its
  rollout equals the base transformer's run without LoRA, and the cached reference too.
- Reward-model training on a learnable rule beats chance on held-out pairs; the same training on
  shuffled labels does not.

Each was broken on purpose once (optimizer step removed, adapters left on for the reference,
labels shuffled for the trained run) and failed; see CHANGELOG (issue 13).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli import rl, train_reward
from onereward_cli.recipe import load_recipe

RL_SET = ["rl.resolution=32", "rl.rollout_steps=3", "rl.t1=1", "rl.t2=2", "rl.batch_size=2",
          "reward.image_size=28", "rl.lora_rank=2", "rl.lora_alpha=4", "rl.max_sequence_length=16",
          "rl.max_grad_norm=0", "rl.lambda=1.0"]


@pytest.fixture(scope="module")
def conditions(tmp_path_factory, zoo):
    """Two fill and two removal conditions drawn by the synthetic renderer."""
    from onereward_cli import synth

    d = tmp_path_factory.mktemp("learncond")
    synth.run(load_recipe("tiny"), d / "pool", n=4, seed=3)
    recs = []
    for i, line in enumerate((d / "pool" / "manifest.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        m = np.zeros((rec.get("height", 64), rec.get("width", 64)), np.uint8)
        m[16:48, 16:48] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        task = "fill" if i % 2 == 0 else "removal"
        recs.append({"id": f"s{i}", "task": task, "source": str(d / "pool" / rec["path"]), "mask": f"m{i}.png",
                     "prompt": "a red circle" if task == "fill" else ""})
    (d / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "triplets.jsonl"


class BrightnessJudge:
    """P(yes) = sigmoid(10 * (mean brightness of x_theta - that of x_ref)): its gradient is known."""

    def p_yes(self, x_theta, x_ref, queries, share_vision=True):
        p = torch.sigmoid(10.0 * (x_theta.mean(dim=(1, 2, 3)) - x_ref.mean(dim=(1, 2, 3))))
        return [p[i].expand(len(q)) for i, q in enumerate(queries)]


def _trainer(conditions, *extra, dynamic=False):
    r = load_recipe("tiny", RL_SET + list(extra))
    tr = rl.Trainer(r, rl.load_conditions(r, conditions), r.models.reward, dynamic=dynamic)
    tr.scorer = BrightnessJudge()
    return tr


@torch.no_grad()
def _fixed_brightness(tr) -> float:
    """Mean brightness of x_theta on a fixed batch, noise and t (the quantity the judge rewards)."""
    idx = [0, 1, 2, 3]
    images, masks = rl.stack_conditions(tr.conds, idx, tr.device, tr.dtype)
    cond = tr.rollout.prepare_condition(tr.pipe, images, masks, generator=torch.Generator().manual_seed(0))
    return float(tr.policy_images(idx, cond, 1, torch.Generator().manual_seed(1)).mean())


def _train(tr, steps: int) -> list[float]:
    losses = []
    for s in range(steps):
        loss, *_ = tr.step(s)
        tr.optimizer_step(loss)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_rl_moves_the_policy_the_way_the_reward_gradient_points(conditions, zoo, dynamic):
    moved = {}
    for lr in (2e-2, 1e-12):  # 1e-12: the control, identical except for the step size
        tr = _trainer(conditions, f"rl.lr={lr}", dynamic=dynamic)
        before = _fixed_brightness(tr)
        _train(tr, 6)
        moved[lr] = _fixed_brightness(tr) - before
    print(f"brightness moved ({'dynamic' if dynamic else 'static'}): {moved}")
    # Measured on the shipped zoo: +0.381 static, +0.386 dynamic (trained) vs 0.0 (control); the VLM shipped
    # before 2026-12-05: +0.389 / +0.393.
    assert moved[2e-2] > 0.01, moved
    assert abs(moved[1e-12]) < 1e-4, moved


def test_static_reference_is_the_base_model_after_the_adapters_moved(conditions, zoo):
    from onereward_cli.models.flux_fill import load_fill_pipeline

    tr = _trainer(conditions, "rl.lr=2e-2", "rl.cache_reference=true")
    _train(tr, 4)
    lora_b = [p for n, p in tr.policy.trainable.items() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0  # lora_B starts at 0: it moved

    base = load_fill_pipeline(tr.r.models.policy, device=tr.device, dtype=tr.dtype)  # no LoRA at all
    idx = [0, 2]
    images, masks = rl.stack_conditions(tr.conds, idx, tr.device, tr.dtype)
    cond = tr.rollout.prepare_condition(tr.pipe, images, masks, generator=torch.Generator().manual_seed(5))
    hw = tuple(images.shape[-2:])
    sig = tr.sigmas(hw)
    eps = tr._noise(len(idx), torch.Generator().manual_seed(6), hw)
    emb = tr._embeds(idx)

    def rollout(transformer, c, e, em):
        with torch.no_grad():
            lat = tr.rollout.denoise(transformer, e, c, em, sig, 0, len(sig) - 1,
                                     guidance=tr.cfg.guidance, true_cfg=tr.cfg.true_cfg)
            return tr.rollout.decode(base, lat, *hw)

    x_base = rollout(base.transformer, cond, eps, emb)
    x_policy = rollout(tr.policy.transformer, cond, eps, emb)  # adapters on
    x_ref = tr._reference_rollout(cond, emb, eps, hw)
    assert (x_policy - x_base).abs().max() > 1e-3  # the adapters change the function...
    torch.testing.assert_close(x_ref, x_base, atol=1e-5, rtol=0)  # ...but not the reference's

    # The cached reference (drawn from a generator seeded by the condition) is the base model's too.
    cached = tr.reference_images(idx, cond, torch.Generator().manual_seed(7))
    for k, i in enumerate(idx):
        g = torch.Generator().manual_seed(tr.r.seed * 7_777 + i)
        im, m = rl.stack_conditions(tr.conds, [i], tr.device, tr.dtype)
        c1 = tr.rollout.prepare_condition(base, im, m, generator=g)
        want = rollout(base.transformer, c1, tr._noise(1, g, hw), tr._embeds([i]))
        torch.testing.assert_close(cached[k:k + 1], want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Reward model: a learnable rule, held out, against shuffled labels
# ----------------------------------------------------------------------------------------------
def _rule_pairs(d: Path, n_train: int, n_test: int, shuffle: bool) -> Path:
    """Fresh random pictures per pair; the rule: the darker one wins (against the base model's lean towards
    bright first images, so the base sits far below chance). shuffle: train labels are coin flips."""
    rng = np.random.default_rng(0)
    (d / "img").mkdir(parents=True, exist_ok=True)
    # Exactly half of each task's train labels flipped: no net signal left (a coin flip per pair leaves
    # a majority the model learns: 1.00 held-out with 28/48 flipped).
    flip = np.zeros(n_train, bool)
    for task in (0, 1):
        ids = np.arange(task, n_train, 2)
        flip[np.random.default_rng(1 + task).permutation(ids)[: len(ids) // 2]] = True

    def pair(i, split):
        lo = rng.integers(0, 90, (48, 48, 3)).astype(np.uint8)
        hi = (rng.integers(0, 90, (48, 48, 3)) + 150).astype(np.uint8)
        Image.fromarray(hi).save(d / "img" / f"{split}{i}_hi.png")
        Image.fromarray(lo).save(d / "img" / f"{split}{i}_lo.png")
        w, l = f"img/{split}{i}_lo.png", f"img/{split}{i}_hi.png"
        if split == "train" and shuffle and flip[i]:
            w, l = l, w
        task, dim, prompt = ("fill", "aesthetics", "a red circle") if i % 2 == 0 else ("removal", "removal quality", "")
        return {"sample_id": f"{split}{i}", "task": task, "dimension": dim, "prompt": prompt, "winner": w,
                "loser": l, "source": "", "mask": "", "annotator": "rule"}

    for split, n in (("train", n_train), ("test", n_test)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(pair(i, split)) + "\n" for i in range(n)))
    return d


def test_reward_model_learns_a_held_out_rule_and_shuffled_labels_do_not(tmp_path, zoo):
    r = load_recipe("tiny", ["reward.batch_size=8", "reward.eval_every=0", "reward.save_every=0", "reward.epochs=3",
                             "reward.lr=2e-3", "reward.warmup_steps=2", "reward.train_vision=true",
                             "reward.max_grad_norm=1.0"])
    margin = {}  # held-out mean P(yes | w, l) - mean P(yes | l, w): how strongly the rule is judged
    for shuffle in (False, True):
        pairs = _rule_pairs(tmp_path / f"pairs-{shuffle}", 48, 32, shuffle)
        out = tmp_path / f"out-{shuffle}"
        train_reward.run(r, pairs, out)
        for name, key in (("accuracy", shuffle), ("accuracy_baseline", "base")):
            o = json.loads((out / f"{name}.json").read_text())["overall"]
            margin[key] = o["mean_p_yes_winner_first"] - o["mean_p_yes_winner_second"]
    # Order-symmetric accuracy alone cannot tell them apart: the shuffled model sits at P(yes) = 0.51 / 0.49,
    # a residual tilt that is "right" on every pair. Measured on the shipped zoo: margin 0.994 (rule),
    # 0.010 (shuffled), -0.059 (base) (earlier VLM weights: 0.990-0.993, 0.003-0.005, 0.015-0.033).
    print(f"reward margins: {margin}")
    assert margin[False] >= 0.5, margin
    assert margin[True] < 0.2 and margin["base"] < 0.2, margin


def _world_oracle_run(tmp_path, lr: float, steps: int, seed: int = 0) -> tuple[float, float]:
    """RL (static) against the shipped judge on world triplets; the held-out oracle on other scenes
    before and after `steps` steps."""
    from onereward_cli.pretrain import world

    r = load_recipe("demo", [f"rl.lr={lr}", "rl.lr_warmup=0", f"seed={seed}"])
    cfg = world.WorldConfig.from_recipe(r)
    tasks = [k for k, v in r.tasks.items() if v.probability > 0]
    train = world.write_benchmark(tmp_path / "train", {k: 6 for k in tasks}, cfg, seed=seed, namespace="train")
    val = world.write_benchmark(tmp_path / "val", {k: 4 for k in tasks}, cfg, seed=seed, namespace="validation")
    held = rl.load_conditions(r, val)
    tr = rl.Trainer(r, rl.load_conditions(r, train), r.demo.rl_reward_model, dynamic=False, extra_conds=held)
    before = rl.heldout_oracle(tr, held, n=len(held))
    _train(tr, steps)
    return before, rl.heldout_oracle(tr, held, n=len(held))


def test_rl_on_the_shipped_judge_raises_the_held_out_oracle_and_lr_to_zero_does_not(tmp_path, zoo):
    """Guards the demo's claim that RL improves the policy: 10 static steps against zoo:onereward (the
    judge `make demo` optimises) raise the synthetic oracle's score of full rollouts on 16 world triplets
    that RL never sees; the same run at lr -> 0 leaves it where it started. Breaks when the optimizer step,
    the gradient into the LoRA, or the judge's signal is lost (zoo:qwen2.5-vl, the untuned base, as the
    judge instead: see CHANGELOG)."""
    b_hi, a_hi = _world_oracle_run(tmp_path / "hi", 3e-4, 10)
    b_lo, a_lo = _world_oracle_run(tmp_path / "lo", 1e-12, 10)
    print(f"held-out oracle: lr 3e-4 {b_hi:.4f} -> {a_hi:.4f}; lr 1e-12 {b_lo:.4f} -> {a_lo:.4f}")
    assert b_hi == pytest.approx(b_lo, abs=1e-6)  # same base, same held-out rollouts
    assert abs(a_lo - b_lo) < 1e-4
    # Measured with the judge shipped 2026-12-05: +0.0115 (0.5669 -> 0.5784); the untuned base as judge:
    # -0.0127. With the judge shipped before: +0.0062 (seeds 1, 2: +0.0042, +0.0127), its base -0.0047.
    assert a_hi - a_lo > 0.003

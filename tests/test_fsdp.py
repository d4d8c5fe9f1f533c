"""`rl` full fine-tuning under FSDP2 (issue 14): two CPU processes (gloo) sharding the policy, its frozen
reference and its EMA must train the same weights as one process that computes both ranks' batches and
averages their gradients, and a sharded checkpoint must resume exactly."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli import rl, sharding
from onereward_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SET = ["rl.resolution=32", "rl.rollout_steps=3", "rl.t1=1", "rl.t2=2", "rl.batch_size=2", "rl.lora=false",
       "rl.lr=1e-4", "reward.image_size=28", "rl.max_sequence_length=16", "rl.eval_every=2", "rl.heldout_n=2",
       "rl.save_every=2", "rl.steps=4"]


def _recipe(*extra):
    return load_recipe("tiny", SET + list(extra))


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory, zoo):
    """Four conditions of two shapes (32x32 and 4:1), every task: batches must agree on a shape per step."""
    d = tmp_path_factory.mktemp("fsdpcond")
    rng = np.random.default_rng(3)
    recs = []
    for i, (task, (w, h)) in enumerate(zip(["fill", "extend", "extend_no_prompt", "removal"],
                                          [(32, 32), (128, 32), (128, 32), (32, 32)])):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"src{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        recs.append({"id": f"s{i}", "task": task, "source": f"src{i}.png", "mask": f"m{i}.png",
                     "prompt": "a red circle" if task in ("fill", "extend") else ""})
    (d / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "triplets.jsonl"


class _C:  # a condition as sample_batch sees it: a task and an image shape
    def __init__(self, task, shape):
        self.task, self.image = task, torch.zeros(shape)


def test_one_shape_sampling_keeps_each_samples_distribution():
    """Under FSDP every rank's batch shares one shape and t; each sample must still follow p_k / |D_k|."""
    r = load_recipe("tiny", ["rl.batch_size=3"])
    conds = [_C("fill", (3, 32, 32)), _C("fill", (3, 16, 64)), _C("extend", (3, 16, 64)),
             _C("extend_no_prompt", (3, 32, 32)), _C("removal", (3, 32, 32)), _C("removal", (3, 24, 40))]
    by_task = {}
    for i, c in enumerate(conds):
        by_task.setdefault(c.task, []).append(i)
    keys, probs = rl.task_distribution(r, by_task)
    want = {i: dict(zip(keys, probs))[c.task] / len(by_task[c.task]) for i, c in enumerate(conds)}
    counts, differ = Counter(), 0
    for step in range(1500):
        per_rank = [rl.sample_batch(r, conds, by_task, step, rank, one_shape=True) for rank in (0, 1)]
        shapes = {tuple(conds[i].image.shape) for idx, _, _ in per_rank for i in idx}
        assert len(shapes) == 1 and per_rank[0][1] == per_rank[1][1]  # one shape, one t, on both ranks
        differ += per_rank[0][0] != per_rank[1][0]
        for idx, _, _ in per_rank:
            counts.update(idx)
    assert differ > 750  # the ranks still draw their own samples
    total = sum(counts.values())
    for i, p in want.items():
        assert abs(counts[i] / total - p) < 0.03, (i, counts[i] / total, p)


def test_launch_settings_are_read_from_the_accelerate_environment():
    assert sharding.from_launch({}) is None
    s = sharding.from_launch({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8", "FSDP_RESHARD_AFTER_FORWARD": "false",
                              "FSDP_OFFLOAD_PARAMS": "true"})
    assert (s.world, s.reshard_after_forward, s.offload_params) == (8, False, True)
    v1 = sharding.from_launch({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2",
                               "FSDP_RESHARD_AFTER_FORWARD": "shard_grad_op"})
    assert v1.reshard_after_forward is False and not v1.offload_params


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cond, out, dynamic, *extra, sets=()):
    acc = Path(sys.executable).parent / "accelerate"
    cmd = [str(acc), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp-rl.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "onereward_cli.cli", "rl",
           str(cond), "--out", str(out)] + (["--dynamic"] if dynamic else []) + list(extra)
    cmd += sum([["--set", s] for s in SET + list(sets)], [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _one_process(cond, dynamic, steps, sets=()):
    """What 2-rank data parallelism computes, in one process: per step, rank 0's and rank 1's batches
    (one shape and t, as under FSDP), the gradients of their mean loss, one AdamW step."""
    r = _recipe(*sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched rank (OMP_NUM_THREADS=1): another blocking rounds otherwise
    try:
        tr = rl.Trainer(r, rl.load_conditions(r, cond), r.models.reward, dynamic=dynamic)
        tr.one_shape = True
        for s in range(steps):
            for rank in (0, 1):  # backward before the next rank's rollout: the dynamic reference swaps weights in
                loss, *_ = tr.step(s, rank)
                tr.backward(loss / 2)
            tr.update()
    finally:
        torch.set_num_threads(threads)
    return tr


def _folder_weights(folder):
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dynamic, sets", [(False, ["rl.gradient_checkpointing=true"]), (True, [])],
                         ids=["static-checkpointed", "dynamic"])
def test_fsdp_two_processes_match_one_process(two_shapes, zoo, tmp_path, dynamic, sets):
    """FSDP2 over 2 gloo processes == one process averaging both ranks' gradients (static, with gradient
    checkpointing as the paper recipes: the sharded frozen reference and its lock-step reference cache;
    dynamic: the sharded EMA as the reference). The outputs are plain diffusers transformer folders.
    Guards the gradient averaging (with FSDP's gradient sync turned off this fails) and the sharded
    EMA/reference."""
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "fsdp"
    _launch(two_shapes, out, dynamic, sets=sets)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["sharding"].startswith("FSDP2")
    ck = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ck.glob("policy*.safetensors")) == ["policy.rank00.safetensors",
                                                                     "policy.rank01.safetensors"]
    ref = _one_process(two_shapes, dynamic, steps=4, sets=sets)
    base = _folder_weights(zoo / "flux-fill" / "transformer")
    for folder, want in (("policy", {n: p.detach() for n, p in ref.policy.trainable.items()}),
                         ("ema", ref.policy.ema)):
        got = _folder_weights(out / folder)
        assert set(got) == set(want)
        moved = max(float((want[n] - base[n]).abs().max()) for n in want)
        diff = max(float((got[n] - want[n]).abs().max()) for n in want)
        # fp32, one thread each: measured max difference 1.2e-7 to 9.8e-7 (it depends on the reward VLM's
        # weights: three versions of the shipped one) against a change of 4e-4 after 4 steps at lr 1e-4;
        # 1.3e-5 (static, checkpointed) with the retrained generator (2026-12-03), hence 0.1 of the change.
        # AdamW's first steps move every weight by ~lr whatever the gradient's size, so a rounding
        # difference in a near-zero gradient shows up amplified; a wrong gradient shows as ~lr. Without FSDP's gradient reduction
        # (each rank keeping its own) the difference is the update itself, 10x over this bound.
        assert moved > 5e-5, (folder, moved)  # the EMA (tau 0.9) trails the policy
        print(f"fsdp parity {folder}: max diff {diff:.3g}, change {moved:.3g}")
        assert diff < 1e-1 * moved, (folder, diff, moved)
    m = FluxTransformer2DModel.from_pretrained(str(out / "policy"))  # loads as a plain diffusers model
    assert type(m).__name__ == "FluxTransformer2DModel"


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly(two_shapes, zoo, tmp_path):
    """Dynamic full fine-tuning under FSDP with bf16 all-gathers over fp32 masters (rl.mixed_precision
    bf16), killed after step 2 (simulated: the step-2 checkpoint is all that is left), resumed with
    --resume: the same bytes as the uninterrupted run. Guards the sharded optimizer state (not loading it
    on resume fails this) and the EMA/weight shards."""
    bf16 = ["rl.mixed_precision=bf16"]
    full = tmp_path / "full"
    _launch(two_shapes, full, True, sets=bf16)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in ("policy", "ema", "checkpoints/step-000004", "run.json"):
        shutil.rmtree(cut / p, ignore_errors=True) if (cut / p).is_dir() else (cut / p).unlink()
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    p = _launch(two_shapes, cut, True, "--resume", sets=bf16)
    assert "resumed at step 2" in p.stderr
    for folder in ("policy", "ema"):
        a, b = _folder_weights(full / folder), _folder_weights(cut / folder)
        assert all(torch.equal(a[n], b[n]) for n in a), folder
    for rank in ("rank00", "rank01"):
        a = rl.load_tensors(full / "checkpoints" / "step-000004" / f"optimizer.{rank}.safetensors")
        b = rl.load_tensors(cut / "checkpoints" / "step-000004" / f"optimizer.{rank}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A resume under another launch (one process, no FSDP) is refused before anything is written.
    from onereward_cli.errors import InputError

    # (Without rl.mixed_precision here: accelerate keeps one mixed-precision setting per process.)
    with pytest.raises(InputError) as e:
        rl.run(_recipe("rl.steps=6"), two_shapes, cut, dynamic=True, resume=True)
    assert "fsdp" in str(e.value) and "processes" in str(e.value)


@pytest.mark.slow
def test_fsdp_keep_best_saves_the_selected_step(two_shapes, zoo, tmp_path):
    """rl.keep_best under FSDP2: the snapshot is sharded like the weights, checkpointed per rank and gathered
    into policy/. policy/ must equal the weights of the selected step (the base for step 0, the step-2
    checkpoint's shards joined for step 2, last/ for step 4); a policy/ gathered from the final weights, or
    a snapshot kept unsharded, fails this."""
    out = tmp_path / "kb"
    _launch(two_shapes, out, False, sets=["rl.keep_best=true", "rl.eval_every=2", "rl.heldout_n=2"])
    sel = json.loads((out / "run.json").read_text())["selected"]
    assert sel["step"] in (0, 2, 4)
    ck = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ck.glob("best*.safetensors")) == ["best.rank00.safetensors", "best.rank01.safetensors"]
    got, last = _folder_weights(out / "policy"), _folder_weights(out / "last")
    if sel["step"] == 0:
        want = _folder_weights(zoo / "flux-fill" / "transformer")
    elif sel["step"] == 4:
        want = last
    else:  # FSDP2 shards dim 0: the two ranks' pieces, in order, are the whole tensor
        a, b = (rl.load_tensors(ck / f"policy.rank0{r}.safetensors") for r in (0, 1))
        want = {n: torch.cat([a[n], b[n]]) for n in a}
    assert set(want) <= set(got)
    assert all(torch.equal(got[n].float(), want[n].float()) for n in want)
    assert any(not torch.equal(got[n], last[n]) for n in got) == (sel["step"] != 4)

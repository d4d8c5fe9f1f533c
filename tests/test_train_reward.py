"""`onereward train-reward` on the tiny zoo: eq. 3 training, exact resume, bad input, multi-process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onereward_cli import train_reward
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def make_pairs(d: Path, n: int = 2, test_same: bool = True) -> Path:
    """n bright-vs-dark pairs (the bright image wins), alternating fill/aesthetics and removal."""
    rng = np.random.default_rng(0)
    (d / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        base = rng.integers(0, 80, (56, 56, 3))
        Image.fromarray((base + 170).astype(np.uint8)).save(d / "img" / f"{i}_bright.png")
        Image.fromarray(base.astype(np.uint8)).save(d / "img" / f"{i}_dark.png")
        task, dim, prompt = ("fill", "aesthetics", "a red circle") if i % 2 == 0 else ("removal", "removal quality", "")
        recs.append({"sample_id": f"s{i}", "task": task, "dimension": dim, "prompt": prompt,
                     "winner": f"img/{i}_bright.png", "loser": f"img/{i}_dark.png", "source": "", "mask": "",
                     "annotator": "test"})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (d / "train.jsonl").write_text(text)
    if test_same:
        (d / "test.jsonl").write_text(text)
    return d


def recipe(*overrides):
    return load_recipe("tiny", ["reward.batch_size=2", "reward.eval_every=0", "reward.save_every=0", *overrides])


def test_training_memorises_pairs_and_saves_a_loadable_model(tmp_path, zoo):
    from transformers import AutoModelForImageTextToText

    from onereward_cli.reward import RewardScorer, build_query, load_image_tensor

    pairs = make_pairs(tmp_path / "pairs")
    r = recipe("reward.max_steps=36", "reward.lr=5e-3", "reward.train_vision=true", "reward.max_grad_norm=0")
    out = tmp_path / "out"
    final = train_reward.run(r, pairs, out)

    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["steps"] == 36 and run["final_loss"] < 0.3  # from log(vocab) = 5.8
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["overall"]["accuracy"] == 1.0 and acc["overall"]["symmetric_accuracy"] == 1.0
    assert acc["overall"]["winner_second"] == 1.0  # both orders memorised, not a "yes" bias
    assert json.loads((out / "accuracy_baseline.json").read_text())["overall"]["n"] == 2
    for f in ("accuracy.png", "accuracy_baseline.png", "eval_history.jsonl"):
        assert (out / f).is_file()
    assert any((out / "logs").iterdir())

    assert isinstance(AutoModelForImageTextToText.from_pretrained(final), torch.nn.Module)
    scorer = RewardScorer.load(str(final), r.reward)
    assert scorer.trained_with["query_mode"] == "full"
    assert scorer.trained_with["image_size"] == r.reward.image_size  # RewardScorer.load checks it
    assert scorer.trained_with["max_pixels"] == scorer.image_processor.max_pixels
    w, lo = load_image_tensor(pairs / "img/0_bright.png"), load_image_tensor(pairs / "img/0_dark.png")
    q = build_query(r.tasks["fill"], "aesthetics", "a red circle")
    p = scorer.p_yes(torch.stack([w, lo]), torch.stack([lo, w]), [[q], [q]])
    assert p[0].item() > 0.5 > p[1].item()


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_train_embeddings_false_keeps_the_vocabulary_matrices(tmp_path, zoo, train_embeddings):
    """reward.train_embeddings false: the LM layers train, embed_tokens and lm_head stay exactly as loaded
    and are not in the checkpoint; the default (control) moves them."""
    from onereward_cli.models.tiny import resolve_model_path

    r = recipe("reward.max_steps=2", "reward.lr=1e-3", f"reward.train_embeddings={str(train_embeddings).lower()}")
    out = tmp_path / "out"
    train_reward.run(r, make_pairs(tmp_path / "pairs"), out)
    base = load_file(str(Path(resolve_model_path(r.models.reward)) / "model.safetensors"))
    trained = _final_weights(out)
    vocab = [k for k in trained if k.endswith("embed_tokens.weight") or k.startswith("lm_head")]
    layers = [k for k in trained if ".layers." in k and "visual" not in k]
    assert vocab and layers
    assert any(not torch.equal(trained[k], base[k].to(trained[k].dtype)) for k in layers)
    moved = [not torch.equal(trained[k], base[k].to(trained[k].dtype)) for k in vocab]
    assert all(moved) if train_embeddings else not any(moved)
    ck = load_file(str(next((out / "checkpoints").glob("step-*")) / "trainable.safetensors"))
    assert any("embed_tokens" in k for k in ck) == train_embeddings


def _final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, zoo):
    pairs = make_pairs(tmp_path / "pairs", n=3, test_same=False)  # no test split: no evaluation time
    common = ["reward.lora=true", "reward.lora_rank=4", "reward.lr=1e-2", "reward.warmup_steps=3",
              "reward.save_every=2", "reward.grad_accum=1"]
    straight = tmp_path / "straight"
    train_reward.run(recipe(*common, "reward.max_steps=4"), pairs, straight)

    resumed = tmp_path / "resumed"
    train_reward.run(recipe(*common, "reward.max_steps=2"), pairs, resumed)
    assert [p.name for p in train_reward.list_checkpoints(resumed)] == ["step-00000002"]
    train_reward.run(recipe(*common, "reward.max_steps=4"), pairs, resumed, resume=True)
    run = json.loads((resumed / "run.json").read_text())
    assert run["counts"]["steps_this_run"] == 2 and run["resumed_from"].endswith("step-00000002")

    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(Path(zoo) / "qwen2.5-vl" / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # training did change the model

    # A resume with a changed training setting is refused, naming the key.
    with pytest.raises(InputError, match="reward.lr"):
        train_reward.run(recipe(*common, "reward.max_steps=6", "reward.lr=1e-3"), pairs, resumed, resume=True)


def test_resume_of_a_finished_run_does_not_repeat_its_final_evaluation(tmp_path, zoo):
    pairs = make_pairs(tmp_path / "pairs", n=2)
    out = tmp_path / "out"
    r = recipe("reward.max_steps=1")
    train_reward.run(r, pairs, out)
    before = (out / "eval_history.jsonl").read_text()
    assert [json.loads(x).get("final") for x in before.splitlines()] == [True]
    train_reward.run(r, pairs, out, resume=True)
    assert (out / "eval_history.jsonl").read_text() == before


def test_nonfinite_losses_abort_with_exit_3_and_keep_the_checkpoint(tmp_path, zoo, monkeypatch, capsys):
    from onereward_cli.cli import main

    pairs = make_pairs(tmp_path / "pairs", n=2, test_same=False)
    out = tmp_path / "out"
    real, calls = train_reward.eq3_loss, []

    def nan_after_first(*a):  # step 1 trains (and is checkpointed), then every loss is NaN
        calls.append(1)
        loss = real(*a)
        return loss if len(calls) == 1 else loss * float("nan")

    monkeypatch.setattr(train_reward, "eq3_loss", nan_after_first)
    args = ["train-reward", str(pairs), "--out", str(out), "--set", "reward.batch_size=2", "--set",
            "reward.eval_every=0", "--set", "reward.save_every=1", "--set", "reward.max_steps=5", "--set",
            "reward.max_nonfinite=2"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3
    assert err[-1].startswith(f"error: {out}: reward.max_nonfinite: training aborted at step 3: 2 non-finite")
    assert err[-1].endswith("step-00000002") and not any("Traceback" in x for x in err)
    # Step 2 was skipped (its checkpoint holds step 1's weights); nothing NaN reached a checkpoint.
    assert [p.name for p in train_reward.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert not (out / "final").exists()
    one, two = (load_file(str(out / "checkpoints" / f"step-0000000{i}" / "trainable.safetensors")) for i in (1, 2))
    assert all(torch.equal(one[k], two[k]) and torch.isfinite(two[k]).all() for k in one)
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2 and state["nonfinite"] == 1


def _cli_exit_code(args) -> int:
    """Run the CLI in-process (no interpreter start-up) and return its exit code."""
    from onereward_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


@pytest.mark.parametrize("case", ["missing_image", "unknown_dimension", "no_prompt", "split_yes", "not_empty",
                                  "lora_targets"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, zoo, case, capsys):
    pairs = make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    extra = []
    lines = (pairs / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    if case == "missing_image":
        (pairs / "img" / "1_dark.png").unlink()
    elif case == "unknown_dimension":
        rec["dimension"] = "sharpness"
    elif case == "no_prompt":
        rec.update(task="fill", dimension="text alignment", prompt="")
    elif case == "split_yes":
        from test_reward import _split_yes_checkpoint

        bad = _split_yes_checkpoint(Path(zoo) / "qwen2.5-vl", tmp_path / "bad-ckpt")
        extra = ["--set", f"models.reward={bad}"]
    elif case == "lora_targets":
        extra = ["--set", "reward.lora=true", "--set", "reward.lora_targets=[qproj]"]
    elif case == "not_empty":
        out.mkdir()
        (out / "something.txt").write_text("x")
    (pairs / "train.jsonl").write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    assert _cli_exit_code(["train-reward", str(pairs), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    if case == "not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["something.txt"]
    else:
        assert not out.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_configs_and_7b_recipe_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp", "fsdp", "fsdp-rl", "deepspeed_zero2", "deepspeed_zero3"):
        cfg = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
        kinds[name] = cfg.distributed_type.value
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp-rl": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                     "deepspeed_zero3": "DEEPSPEED"}
    assert load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp-rl.yaml")).fsdp_config["fsdp_version"] == 2
    r = load_recipe(str(ROOT / "recipes" / "reward-qwen2.5-vl-7b.yaml"))
    assert (r.models.reward, r.reward.lr, r.reward.query_mode) == ("Qwen/Qwen2.5-VL-7B-Instruct", 1e-6, "full")


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, zoo):
    """DDP on 2 CPU processes (gloo) with bf16 autocast, grad accumulation and activation checkpointing."""
    pairs = make_pairs(tmp_path / "pairs", n=3)
    out = tmp_path / "out"
    accelerate = Path(sys.executable).parent / "accelerate"
    # recipes/accelerate/ddp.yaml uses accelerate's torchrun launcher; with the recipe's device: cpu
    # the two processes form a gloo (MULTI_CPU) group. (`accelerate launch --cpu` would start ONE
    # process unless run under mpirun.)
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "onereward_cli.cli", "train-reward", str(pairs), "--out", str(out),
           "--set", "reward.max_steps=2", "--set", "reward.batch_size=1", "--set", "reward.grad_accum=2",
           "--set", "reward.mixed_precision=bf16", "--set", "reward.gradient_checkpointing=true",
           "--set", "reward.save_every=1", "--set", "reward.lora=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["processes"] == 2 and run["counts"]["steps"] == 2
    assert run["effective_batch_pairs"] == 4
    assert run["distributed_type"] == "MULTI_CPU" and run["replicas_in_sync"] is True
    assert run["mixed_precision"] == "bf16"
    assert [p.name for p in train_reward.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert {p.name for p in (train_reward.list_checkpoints(out)[-1]).iterdir()} >= {
        "rng_0.safetensors", "rng_1.safetensors", "trainable.safetensors", "optimizer.safetensors", "state.json"}
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "accuracy.json").read_text())["overall"]["n"] == 3


def _trained_delta(pairs, out, zoo, *extra, dtype=torch.float32):
    """Change of every trained weight after 2 full fine-tuning steps at lr 1e-4 (from the checkpoint)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process-wide singleton: another mixed_precision needs a fresh one
    train_reward.run(recipe("reward.max_steps=2", "reward.lr=1e-4", "reward.max_grad_norm=0", *extra), pairs, out)
    got = load_file(str(train_reward.list_checkpoints(out)[-1] / "trainable.safetensors"))
    from transformers import AutoModelForImageTextToText

    base = dict(AutoModelForImageTextToText.from_pretrained(Path(zoo) / "qwen2.5-vl").named_parameters())
    # The masters start from the weights as loaded: rounded to the recipe's dtype.
    return {k: v.float() - base[k].detach().to(dtype).float() for k, v in got.items()}, {v.dtype for v in got.values()}


def test_bf16_recipe_trains_fp32_master_weights(tmp_path, zoo):
    pairs = make_pairs(tmp_path / "pairs", test_same=False)
    ref, _ = _trained_delta(pairs, tmp_path / "fp32", zoo)
    got, dtypes = _trained_delta(pairs, tmp_path / "bf16", zoo, "dtype=bfloat16", "reward.mixed_precision=bf16",
                                 dtype=torch.bfloat16)
    assert dtypes == {torch.float32}  # the optimizer stepped fp32 masters
    ref, got = torch.cat([ref[k].flatten() for k in ref]), torch.cat([got[k].flatten() for k in ref])
    # (Almost) every weight moves, by about as much and the same way as in fp32; in bf16 weights most
    # of these ~1e-4 steps would be rounded away (see tests/test_rl.py, plain bf16 AdamW).
    moved = ref != 0  # rows of unused token embeddings get no gradient in either run
    assert (got[moved] == 0).float().mean() < 0.01
    assert abs(got.norm() / ref.norm() - 1) < 0.1
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.9
    # The final model is saved in the recipe's dtype.
    final = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {v.dtype for v in final.values()} == {torch.bfloat16}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # leave the default (no mixed precision) to the next test


def test_float16_training_is_refused(tmp_path, zoo):
    pairs = make_pairs(tmp_path / "pairs")
    with pytest.raises(InputError, match="dtype: training in float16 needs loss scaling"):
        train_reward.run(recipe("dtype=float16"), pairs, tmp_path / "out")
    assert not (tmp_path / "out").exists()

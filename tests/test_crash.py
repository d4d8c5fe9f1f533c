"""kill -9: a stage SIGKILLed in the middle of its work, then re-run (or --resume), ends with exactly the
outputs of an uninterrupted run — line for line, byte for byte, tensor for tensor — and no temp files.

Stages: generate, train-reward, rl (static and dynamic), eval, curate, and the tiny-world pretraining;
each killed at several points (between checkpoints, in a checkpoint write, in the final save) in turn.
The kill is placed deterministically (no timing): a forked child process wraps one function so that
it SIGKILLs itself at the chosen call, then runs the real CLI."""
import json
import os
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onereward_cli import cli
from onereward_cli.artifacts import _STALE_TEMP
from test_rl import SET as RL_SHAPE, conditions  # noqa: F401 (conditions: a fixture)


def _arm(how: str, where):
    """In the child: make the process SIGKILL itself at the chosen point. "replace": on the N-th
    `os.replace` (the last step of every atomic write: its temp file is written, not renamed). "rename":
    right after a folder got the final name `where` (`Path.rename`: checkpoints, policy folders).
    "renaming": right before a folder gets the final name `where` (the last moment its old content may be
    gone). "call" / "after": on the N-th call of `where` = "module:attr:N", before it runs / once it returned."""
    import importlib
    import pathlib

    calls = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if how == "replace":
        real = os.replace

        def replace(src, dst, *a, **k):
            calls[0] += 1
            if calls[0] == int(where):
                die()
            return real(src, dst, *a, **k)
        os.replace = replace
    elif how in ("rename", "renaming"):
        real = pathlib.Path.rename

        def rename(self, dst):
            if how == "renaming" and pathlib.Path(dst).name == where:
                die()
            out = real(self, dst)
            if pathlib.Path(dst).name == where:
                die()
            return out
        pathlib.Path.rename = rename
    else:
        name, attr, n = where.split(":")
        mod = importlib.import_module(name)
        real = getattr(mod, attr)

        def hooked(*a, **k):
            calls[0] += 1
            if how == "call" and calls[0] == int(n):
                die()
            out = real(*a, **k)
            if how == "after" and calls[0] == int(n):
                die()
            return out
        setattr(mod, attr, hooked)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module, parent and forked children alike. libgomp's thread pool does
    not survive fork: a child's first parallel region waits forever for pool threads that exist only in
    the parent (seen: CI hung in the first kill test). The same thread count on both sides also keeps
    the uninterrupted and the resumed runs' numerics identical."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def killed(how: str, where, argv: list[str], main=None):
    """Run the command line (`onereward ...`, or `main(argv)`) in a forked child that SIGKILLs itself at
    the chosen point; fail unless it died so. Forked, the child starts with this process's imports
    (a fresh interpreter spends ~20 s importing torch and diffusers here) and a real SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if how:  # None: `main` places its own kill
                _arm(how, where)
            (main or cli.main)(argv)
        except BaseException:  # noqa: BLE001 - reported through the exit status and stderr
            traceback.print_exc()
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed: wait status {status}"


def in_process(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code in (0, None)


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def differing(a: Path, b: Path, skip=("run.json",)) -> list[str]:
    """Files of folder `a` that `b` lacks, has extra or holds differently: safetensors compared tensor
    for tensor and by metadata (the safetensors writer orders a multi-key metadata header differently
    in each process), everything else byte for byte."""
    from safetensors import safe_open

    ta, tb = ({k: v for k, v in tree(d).items() if k not in skip} for d in (a, b))
    out = sorted(set(ta) ^ set(tb))
    for k in sorted(set(ta) & set(tb)):
        if k.endswith(".safetensors"):
            fa, fb = (safe_open(str(d / k), "pt") for d in (a, b))
            if fa.metadata() != fb.metadata() or not weights_equal(a / k, b / k):
                out.append(k)
        elif ta[k] != tb[k]:
            out.append(k)
    return out


def temps(d: Path) -> list[str]:
    return [str(p) for p in d.rglob("*") if _STALE_TEMP.match(p.name)]


GEN_SET = ["--set", "generate.steps=[2,3]", "--set", "generate.batch_size=4"]


def test_generate_killed_mid_write_resumes_to_identical_outputs(synth_pool, tmp_path, zoo):
    args = ["generate", str(synth_pool / "manifest.jsonl"), "--candidates", "3", "--limit", "6", *GEN_SET]
    full, part = tmp_path / "full", tmp_path / "part"
    in_process(args + ["--out", str(full)])
    # 6 samples x (source, mask, 3 candidates) PNGs + 1 record each: die in the 2nd sample's images
    killed("replace", 8, args + ["--out", str(part)])
    assert temps(part), "the kill should leave a temp file behind"
    in_process(args + ["--out", str(part)])
    assert not temps(part)
    a, b = tree(full), tree(part)
    a.pop("run.json"), b.pop("run.json")  # timings and resume counts differ
    assert a.keys() == b.keys()
    assert (part / "candidates.jsonl").read_text().splitlines() == (full / "candidates.jsonl").read_text().splitlines()
    assert [k for k in a if a[k] != b[k]] == []


TR_SET = ["--set", "reward.batch_size=2", "--set", "reward.eval_every=2", "--set", "reward.save_every=2",
          "--set", "reward.max_steps=4", "--set", "reward.lora=true", "--set", "reward.lora_rank=4",
          "--set", "reward.lr=1e-2"]


def test_train_reward_killed_at_a_checkpoint_resumes_to_identical_weights(tmp_path, zoo):
    from test_train_reward import make_pairs

    pairs = make_pairs(tmp_path / "pairs", n=3)
    full, part = tmp_path / "full", tmp_path / "part"
    in_process(["train-reward", str(pairs), "--out", str(full), *TR_SET])
    killed("rename", "step-00000002", ["train-reward", str(pairs), "--out", str(part), *TR_SET])
    assert not (part / "final").exists()
    in_process(["train-reward", str(pairs), "--out", str(part), "--resume", *TR_SET])
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [(full / "eval_history.jsonl").read_text().splitlines(),
               (part / "eval_history.jsonl").read_text().splitlines()]
    assert history[0] == history[1] and len(history[0]) == 2  # step 2, and the final one at step 4
    assert json.loads((full / "accuracy.json").read_text()) == json.loads((part / "accuracy.json").read_text())
    assert not temps(part)


def _tr_resume_replaying_step_4(argv):
    """`onereward train-reward ... --resume` that resumes from step 2 although step 4 is saved (as rl and
    pretraining resumed at their last step save it again), SIGKILLed at its final evaluation: after the
    step-4 checkpoint was due, or right after a replaced step-4 folder was deleted (before the rename)."""
    import shutil

    from onereward_cli import train_reward

    real_list, real_rmtree = train_reward.list_checkpoints, shutil.rmtree
    first = [True]

    def older_first(out):
        cks = real_list(out)
        if first[0]:
            first[0] = False
            cks = [c for c in cks if c.name != "step-00000004"]
        return cks

    def rmtree(path, *a, **k):
        real_rmtree(path, *a, **k)
        if Path(path).name == "step-00000004":
            os.kill(os.getpid(), signal.SIGKILL)

    _arm("renaming", "step-00000004")  # or renamed away, the new one not yet in place

    def evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    train_reward.list_checkpoints, shutil.rmtree, train_reward.evaluate = older_first, rmtree, evaluate
    cli.main(argv)


def test_train_reward_saving_a_checkpoint_again_or_its_final_model_killed_resumes_to_identical_weights(tmp_path, zoo):
    """Killed while re-saving a step that is saved already, and right before final/ gets its name (first
    run, and a resume of a finished run): never a run without its newest checkpoint, never a run.json
    (the mark of a finished run) without a complete final/; --resume then equals an uninterrupted run."""
    from test_train_reward import make_pairs

    from onereward_cli.reward import REWARD_META
    from onereward_cli.train_reward import list_checkpoints

    pairs = make_pairs(tmp_path / "pairs", n=3)
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["train-reward", str(pairs), *TR_SET]
    in_process(args + ["--out", str(full)])

    def final_ok(d):
        return (d / "final" / REWARD_META).is_file() and (d / "final" / "model.safetensors").is_file()

    killed("renaming", "final", args + ["--out", str(part)])  # the first run, trained and evaluated
    assert not (part / "run.json").exists() and not (part / "final").exists()
    in_process(args + ["--out", str(part), "--resume"])
    assert final_ok(part) and (part / "run.json").is_file()
    killed("renaming", "final", args + ["--out", str(part), "--resume"])  # a finished run resumed
    assert not (part / "run.json").exists()
    killed(None, None, args + ["--out", str(part), "--resume"], main=_tr_resume_replaying_step_4)
    assert [c.name for c in list_checkpoints(part)] == ["step-00000002", "step-00000004"]
    assert not (part / "run.json").exists()
    in_process(args + ["--out", str(part), "--resume"])
    assert final_ok(part) and json.loads((part / "run.json").read_text())["resumed_from"].endswith("step-00000004")
    assert weights_equal(full / "final" / "model.safetensors", part / "final" / "model.safetensors")
    states = [[{k: v for k, v in json.loads((c / "state.json").read_text()).items() if k != "time"}
               for c in list_checkpoints(d)] for d in (full, part)]
    assert states[0] == states[1]
    assert differing(full / "checkpoints", part / "checkpoints",
                     skip=[f"{c}/state.json" for c in ("step-00000002", "step-00000004")]) == []
    history = [(d / "eval_history.jsonl").read_text().splitlines() for d in (full, part)]
    assert history[0] == history[1] and len(history[0]) == 2
    assert json.loads((full / "accuracy.json").read_text()) == json.loads((part / "accuracy.json").read_text())
    assert not temps(part)


def weights_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def latest_step(out: Path) -> int:
    return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]


# steps 5, checkpoints at 2 and 4, the final one at 5, then policy/, ema/, reward curves and run.json
RL_SET = [x for kv in (*RL_SHAPE, "rl.steps=5", "rl.save_every=2", "rl.lr_warmup=3") for x in ("--set", kv)]


@pytest.mark.parametrize("mode, kills", [
    # (how, where, the checkpoint a resume then starts from, a torn leftover to expect)
    # Alg. 1: killed between checkpoints (step 3 trained, not logged); right after the step-4 folder got its
    # name, latest.json still naming step 2; with policy/ final and ema/ not yet written.
    ("static", [("call", "onereward_cli.rl:append_jsonl:3", 2, None), ("rename", "step-000004", 2, None),
                ("rename", "policy", 5, None)]),
    # Alg. 2: killed among the step-4 folder's files (the 9th atomic write: 5 files + latest.json for step 2,
    # then policy, ema, optimizer); right after the final checkpoint; with policy/ and ema/ written but
    # not the reward curves and run.json.
    ("dynamic", [("replace", 9, 2, ".step-000004.tmp"), ("after", "onereward_cli.rl:save_checkpoint:2", 5, None),
                 ("after", "onereward_cli.rl:save_policy_dir:2", 5, None)]),
])
def test_rl_killed_anywhere_resumes_to_identical_weights_and_log(conditions, zoo, tmp_path, mode, kills):
    args = ["rl", str(conditions), *RL_SET, *(["--dynamic"] if mode == "dynamic" else [])]
    full, part = tmp_path / "full", tmp_path / "part"
    in_process(args + ["--out", str(full)])
    for i, (how, where, resumes_at, leftover) in enumerate(kills):
        killed(how, where, args + ["--out", str(part)] + (["--resume"] if i else []))
        assert latest_step(part) == resumes_at  # never a torn or unnamed checkpoint
        assert not (part / "run.json").exists()
        assert leftover is None or (part / "checkpoints" / leftover).is_dir()
    in_process(args + ["--out", str(part), "--resume"])
    for d in ("policy", "ema"):
        f = Path(d) / "pytorch_lora_weights.safetensors"
        assert weights_equal(full / f, part / f), d
    log = [(d / "log.jsonl").read_text().splitlines() for d in (full, part)]
    assert log[0] == log[1] and len(log[0]) == 5
    assert not temps(part)


def _save_rl(out: Path, step: int):
    from types import SimpleNamespace

    from onereward_cli import checkpointing, rl

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w])
    pol = SimpleNamespace(state_tensors=lambda: {"w": w.detach()}, ema_tensors=lambda: {"w": w.detach().clone()},
                          cfg=SimpleNamespace(lr_warmup=0, lr_schedule="constant", steps=step))
    rl.save_checkpoint(out, step, pol, opt, checkpointing.make_scheduler(opt, 0), {}, {})
    return out / "checkpoints"


def _save_pretrain(out: Path, step: int):
    from onereward_cli.pretrain import loop

    w = torch.nn.Parameter(torch.ones(2))
    loop.save_checkpoint(out, step, {"w": w}, torch.optim.AdamW([w]))
    return out / "checkpoints"


@pytest.mark.parametrize("save", [_save_rl, _save_pretrain])
def test_saving_the_latest_checkpoint_again_never_unnames_it(save, tmp_path, monkeypatch):
    """A run resumed at its last step saves that step again (rl, pretraining). A kill between deleting
    the old folder and renaming the new one into place would leave latest.json naming nothing."""
    ckd = save(tmp_path, 4)
    import pathlib

    def killed_before_rename(self, dst):
        raise KeyboardInterrupt  # the state a SIGKILL here leaves: nothing cleans up after it

    monkeypatch.setattr(pathlib.Path, "rename", killed_before_rename)
    try:
        save(tmp_path, 4)
    except KeyboardInterrupt:
        pass
    name = json.loads((ckd / "latest.json").read_text())["path"]
    assert (ckd / name / "state.json").is_file()


def test_a_discarded_folder_is_never_half_deleted_under_its_name(tmp_path, monkeypatch):
    """train-reward's old checkpoints and final/ go through `discard_folder`: killed while the files are
    deleted, the folder has left its name already (a torn one never looks complete); the next run's
    stale-temp cleanup removes what is left."""
    import shutil

    from onereward_cli.artifacts import discard_folder, remove_stale_temps

    ck = tmp_path / "checkpoints" / "step-00000004"
    ck.mkdir(parents=True)
    for f in ("trainable.safetensors", "state.json"):
        (ck / f).write_text("x")

    real = shutil.rmtree

    def killed_deleting(path, *a, **k):
        if not Path(path).exists():
            return real(path, *a, **k)
        next(Path(path).iterdir()).unlink()  # one file deleted, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_deleting)
    with pytest.raises(KeyboardInterrupt):
        discard_folder(ck)
    monkeypatch.undo()
    assert not ck.exists() and temps(tmp_path)
    assert remove_stale_temps(tmp_path) == 1 and list((tmp_path / "checkpoints").iterdir()) == []


def test_random_zoo_build_killed_leaves_a_leftover_the_next_build_removes(tmp_path):
    """A SIGKILLed `build_zoo` leaves its `.NAME.building-PID` folder (the model built, not yet renamed into
    place); the next build removes those of dead processes, keeps a live one's (a concurrent build) and
    builds the model as a clean build does."""
    from onereward_cli.models.tiny import build_zoo

    zoo, clean = tmp_path / "zoo", tmp_path / "clean"
    killed("replace", 1, [], main=lambda argv: build_zoo(zoo, only=["open-clip"]))
    left = [p.name for p in zoo.iterdir()]
    assert len(left) == 1 and left[0].startswith(".open-clip.building-") and not (zoo / "open-clip").exists()
    live = zoo / f".qwen2.5-vl.building-{os.getppid()}"  # this test's parent: a build still running
    live.mkdir()
    build_zoo(zoo, only=["open-clip"])
    assert sorted(p.name for p in zoo.iterdir()) == [live.name, "open-clip"]
    build_zoo(clean, only=["open-clip"])
    assert tree(zoo / "open-clip") == tree(clean / "open-clip")


def untimed(x):
    """`x` without its "seconds" fields (how long a metric took differs from run to run)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k != "seconds"}
    return [untimed(v) for v in x] if isinstance(x, list) else x


EVAL_SET = ["--set", "eval.steps=2", "--set", "eval.batch_size=2"]


def test_eval_killed_mid_generation_and_mid_scoring_resumes_to_identical_results(synth_pool, zoo, tmp_path):
    from test_evaluate import _write_bench

    bench = _write_bench(synth_pool, tmp_path / "bench")
    args = ["eval", "--policy", "zoo:flux-fill", "--compare", "zoo:flux-fill", "--benchmark", str(bench), *EVAL_SET]
    full, part = tmp_path / "full", tmp_path / "part"
    in_process(args + ["--out", str(full)])
    # 4 samples: 8 input PNGs, the prompt-embedding cache (identity.json, one shard), then the edits:
    # die writing the 2nd edit's PNG
    killed("replace", 12, args + ["--out", str(part)])
    assert temps(part) and len((part / "edits.jsonl").read_text().splitlines()) == 1
    # re-run: 7 edits to make, then the scores (metrics, then reward-model judgements): die before the 3rd score
    killed("call", "onereward_cli.evaluate:append_jsonl:10", args + ["--out", str(part)])
    assert len((part / "scores.jsonl").read_text().splitlines()) == 2 and not (part / "metrics.json").exists()
    in_process(args + ["--out", str(part)])
    assert not temps(part)
    for f in ("edits.jsonl", "scores.jsonl"):
        assert (part / f).read_text().splitlines() == (full / f).read_text().splitlines(), f
    assert untimed(json.loads((part / "metrics.json").read_text())) == \
        untimed(json.loads((full / "metrics.json").read_text()))
    a, b = tree(full / "images"), tree(part / "images")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


CURATE_SET = ["--select", "7", "--set", "curate.shard_size=4", "--set", "curate.mode=hierarchical",
              "--set", "curate.num_workers=0"]


def test_curate_killed_among_the_embedding_shards_resumes_to_identical_outputs(synth_pool, zoo, tmp_path):
    args = ["curate", str(synth_pool / "manifest.jsonl"), *CURATE_SET]
    full, part = tmp_path / "full", tmp_path / "part"
    in_process(args + ["--out", str(full)])
    shards = lambda: sorted(p.name for p in (part / "embeddings").glob("shard-*"))  # noqa: E731
    # 16 images in 4 shards: die before the 3rd shard is written, then while writing it (its temp file
    # written, not renamed), then before curated.jsonl (rejected.jsonl written, then curated.jsonl)
    killed("call", "onereward_cli.curate:_write_shard:3", args + ["--out", str(part)])
    assert shards() == ["shard-000000.safetensors", "shard-000001.safetensors"]
    killed("replace", 1, args + ["--out", str(part)])
    assert shards() == ["shard-000000.safetensors", "shard-000001.safetensors"] and temps(part)
    killed("call", "onereward_cli.curate:write_jsonl:2", args + ["--out", str(part)])
    assert len(shards()) == 4 and not (part / "curated.jsonl").exists()
    in_process(args + ["--out", str(part)])
    assert not temps(part)
    assert differing(full, part) == []  # run.json aside: timings and reuse counts differ


def test_pretraining_killed_anywhere_resumes_to_the_same_zoo(zoo_random, tmp_path):
    from onereward_cli.pretrain import main

    def untimed_log(d: Path) -> list[dict]:
        return [untimed(json.loads(x)) for x in (d / "log.jsonl").read_text().splitlines()]

    part, work = tmp_path / "zoo", tmp_path / "zoo.work"
    full, full_work = tmp_path / "full", tmp_path / "full.work"
    args = ["--scale", "0.004"]  # steps: vae 10 (checkpoints at 5, 10), flux 7 (3, 6, 7), vlm 6, clip 2
    assert main([str(part), *args]) == 0
    part.rename(full), work.rename(full_work)  # the model configs name the folder they came from
    # vae between its checkpoints (before step 8); flux right after its first checkpoint folder got its
    # name, before latest.json names it; vlm trained and saved, before its result.json; OUT assembled
    # but not yet renamed into place (its manifest is written inside the temporary folder).
    killed("call", "onereward_cli.pretrain.loop:lr_factor:8", [str(part), *args], main)
    assert latest_step(work / "vae") == 5
    killed("rename", "step-0000003", [str(part), *args], main)
    assert (work / "flux" / "checkpoints" / "step-0000003").is_dir()
    assert not (work / "flux" / "checkpoints" / "latest.json").exists()
    killed("call", "onereward_cli.pretrain:_finish:2", [str(part), *args], main)
    assert (work / "vlm" / "model").is_dir() and not (work / "vlm" / "result.json").exists()
    killed("call", "onereward_cli.models.tiny:write_trained_manifest:1", [str(part), *args], main)
    assert not part.exists()  # never a zoo folder without its manifest
    assert main([str(part), *args]) == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (full, part))
    assert a["files"] == b["files"]  # the sha256 of every file of the zoo
    assert untimed(a["training"]) == untimed(b["training"])
    for stage in ("vae", "flux", "vlm", "clip"):
        assert untimed_log(work / stage) == untimed_log(full_work / stage), stage
    assert not temps(work)


def test_pretraining_checkpoint_between_log_lines_keeps_the_losses_since_the_last_one(tmp_path):
    """A checkpoint at step 3 with a log line every 2 steps: the step-4 line of a resumed run averages
    the losses of steps 3 and 4, as the uninterrupted run's does."""
    from onereward_cli.pretrain import loop

    def train(work: Path, stop_at=None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(2, 1)

        def loss_fn(step):
            if step == stop_at:
                raise KeyboardInterrupt  # killed: checkpoint 3 is the latest
            _, g = loop.step_rng(0, "toy", step)
            x = torch.randn(4, 2, generator=g)
            return (lin(x) - x.sum(1, keepdim=True)).pow(2).mean(), {}
        cfg = loop.LoopConfig(steps=6, lr=0.1, warmup=1, save_every=3, log_every=2)
        return [untimed(r) for r in loop.train("toy", work, {"lin": lin}, cfg, loss_fn, seed=0)]

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "part", stop_at=4)
    assert train(tmp_path / "part") == train(tmp_path / "full")

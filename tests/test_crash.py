"""kill -9: a stage SIGKILLed in the middle of its work, then re-run (or --resume), ends with exactly the
outputs of an uninterrupted run — line for line, byte for byte, tensor for tensor — and no temp files.

The kill is placed deterministically (no timing): the child process wraps one function so that it
SIGKILLs itself at the chosen call, then runs the real CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onereward_cli import cli
from onereward_cli.artifacts import _STALE_TEMP

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: `os.replace` (the last step of every atomic write) or `Path.rename` (a checkpoint
# folder made final) kills the process at the chosen call.
CHILD = r"""
import os, pathlib, signal, sys
what, target = sys.argv[1], sys.argv[2]
calls = [0]
if what == "replace":  # die on the N-th atomic write, its temp file written but not renamed
    real = os.replace
    def replace(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == int(target):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    os.replace = replace
else:  # die right after a checkpoint folder got its final name
    real = pathlib.Path.rename
    def rename(self, dst):
        out = real(self, dst)
        if pathlib.Path(dst).name == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    pathlib.Path.rename = rename
from onereward_cli import cli
cli.main(sys.argv[3:])
"""


def killed(what: str, target, argv: list[str]):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", CHILD, what, str(target), *argv], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])


def in_process(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code in (0, None)


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


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

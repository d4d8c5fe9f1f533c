"""The command line: help, version, exit codes (0 ok, 2 bad input or usage, 1 unexpected failure)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onereward_cli import __version__, cli

COMMANDS = ["tiny-models", "synth", "curate", "generate", "annotate", "export-pairs", "train-reward", "rl",
            "eval", "demo"]


def stage_argv(command: str, tmp: Path) -> list[str]:
    """The smallest valid argument list for each stage command (inputs need not exist: the recipe
    is resolved before anything is read)."""
    inp, out = str(tmp / "in"), str(tmp / "out")
    return {
        "synth": ["synth", out],
        "curate": ["curate", inp, "--out", out],
        "generate": ["generate", inp, "--out", out],
        "annotate": ["annotate", inp, "--out", str(tmp / "out" / "a.jsonl")],
        "export-pairs": ["export-pairs", inp, "--out", out],
        "train-reward": ["train-reward", inp, "--out", out],
        "rl": ["rl", inp, "--out", out],
        "eval": ["eval", "--policy", "zoo:flux-fill", "--benchmark", inp, "--out", out],
        "demo": ["demo", "--out", out],
    }[command]


STAGES = [c for c in COMMANDS if c != "tiny-models"]


def cli_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("onereward")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onereward_cli.cli"]


def run_cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(cli_cmd() + list(args), capture_output=True, text=True, env=env, timeout=300, **kw)


def run_main(argv, capsys):
    """cli.main in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


def test_help_lists_every_command():
    res = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for c in COMMANDS:
        assert c in res.output, c


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_example(command):
    res = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Example" in res.output
    assert "onereward " + command in res.output  # the example runs this very command


def test_version_via_console_script():
    res = run_cli(["--version"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"onereward {__version__}"


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "onereward_cli.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"onereward {__version__}"


def test_unknown_set_key_subprocess_is_one_line_exit_2(tmp_path):
    res = run_cli(stage_argv("synth", tmp_path) + ["--set", "no.such.key=1"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "no.such.key" in lines[0] and "unknown key" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("command", STAGES)
def test_unknown_set_key_every_stage(command, tmp_path, capsys):
    code, out, err = run_main(stage_argv(command, tmp_path) + ["--set", "no.such.key=1"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--set no.such.key" in lines[0] and "unknown key" in lines[0]
    assert not (tmp_path / "out").exists()


def test_set_typo_gets_a_suggestion(tmp_path, capsys):
    code, _, err = run_main(stage_argv("rl", tmp_path) + ["--set", "rl.lamda=0.5"], capsys)
    assert code == 2
    assert "rl.lamda" in err and "did you mean 'lambda'" in err


def test_unknown_recipe_name_suggests_a_bundled_one(tmp_path):
    res = run_cli(stage_argv("synth", tmp_path) + ["--recipe", "flux-fill-onereward-dynamc"])
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "did you mean 'flux-fill-onereward-dynamic'" in res.stderr


def test_unknown_recipe_name_in_process(tmp_path, capsys):
    code, _, err = run_main(stage_argv("curate", tmp_path) + ["-r", "tinyy"], capsys)
    assert code == 2
    assert "did you mean 'tiny'" in err and "--recipe" in err


def test_missing_argument_is_usage_error(capsys):
    code, out, err = run_main(["synth"], capsys)
    assert code == 2
    assert "Missing argument" in out + err


def test_unknown_option_is_usage_error(tmp_path, capsys):
    code, out, err = run_main(["synth", str(tmp_path), "--no-such-option"], capsys)
    assert code == 2


def test_bad_input_from_a_stage_exits_2(tmp_path, capsys):
    code, _, err = run_main(["synth", str(tmp_path / "pool"), "--n", "0"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--n" in err
    assert not (tmp_path / "pool").exists()


def test_unexpected_exception_exits_1(tmp_path, capsys, monkeypatch):
    from onereward_cli import synth

    def boom(*a, **kw):
        raise RuntimeError("boom in synth")

    monkeypatch.setattr(synth, "run", boom)
    code, _, err = run_main(["synth", str(tmp_path / "pool"), "--n", "1"], capsys)
    assert code == 1
    assert "unexpected failure: RuntimeError: boom in synth" in err


def test_success_exits_0(tmp_path, capsys):
    code, _, _ = run_main(["synth", str(tmp_path / "pool"), "--n", "2", "--seed", "1"], capsys)
    assert code == 0
    assert (tmp_path / "pool" / "manifest.jsonl").exists()


def test_error_text_is_not_read_as_markup(tmp_path, capsys):
    """Paths and values with square brackets are printed as they are."""
    missing = tmp_path / "[bold]" / "r.yaml"
    code, _, err = run_main(["synth", str(tmp_path / "p"), "--recipe", str(missing)], capsys)
    assert code == 2
    assert str(missing) in err


def test_unexpected_failure_message_is_not_read_as_markup(tmp_path, capsys, monkeypatch):
    from onereward_cli import synth

    def boom(*a, **kw):
        raise RuntimeError("bad file data/[test]/x.png")

    monkeypatch.setattr(synth, "run", boom)
    code, _, err = run_main(["synth", str(tmp_path / "pool")], capsys)
    assert code == 1
    assert "RuntimeError: bad file data/[test]/x.png" in err

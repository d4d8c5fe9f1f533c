"""Install hygiene: the wheel builds without setuptools' "is absent from the `packages` configuration"
warnings, holds every bundled recipe, static file and trained-zoo file, and `onereward demo --help` runs
from it in a fresh venv (its dependencies borrowed from this interpreter's site-packages, so nothing is
downloaded and nothing of the source tree is on the path)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _data_files() -> set[str]:
    """Wheel paths every package-data file of the source tree must have."""
    want = set()
    for d, under in ((ROOT / "onereward_cli" / "static", "onereward_cli/static"),
                     (ROOT / "onereward_cli" / "zoo", "onereward_cli/zoo"),
                     (ROOT / "recipes", "onereward_cli/recipes")):
        if d.is_dir():
            want |= {f"{under}/{p.relative_to(d).as_posix()}" for p in d.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    return want


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("onereward_cli", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    # --no-build-isolation: the build uses this venv's setuptools, so the test needs no network.
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                          "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = dist.glob("onereward-*.whl")
    return whl, res.stdout + res.stderr


def test_wheel_builds_quietly_and_is_complete(wheel):
    """Guards: no setuptools package-data warnings (static/ and zoo/ are data folders), and every recipe,
    static file and zoo file is inside the wheel."""
    whl, log = wheel
    assert "is absent from the `packages` configuration" not in log
    assert "SetuptoolsDeprecationWarning" not in log and "_Warning" not in log
    names = set(zipfile.ZipFile(whl).namelist())
    want = _data_files()
    assert {"onereward_cli/static/annotate.js", "onereward_cli/recipes/tiny.yaml",
            "onereward_cli/recipes/eval-onereward-release.yaml",
            "onereward_cli/recipes/accelerate/ddp.yaml"} <= want
    assert not want - names, sorted(want - names)[:10]


def test_demo_help_runs_from_the_wheel_in_a_fresh_venv(wheel, tmp_path):
    whl, _ = wheel
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # The dependencies (torch, diffusers, ...) come from this interpreter's site-packages, after the
    # fresh venv's own: its onereward_cli is the wheel's. (.pth lines do not run that directory's .pth
    # files, so an editable install there stays out.)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ONEREWARD_TRAINED_ZOO")}
    res = subprocess.run([str(env_dir / "bin" / "onereward"), "demo", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--replicate" in res.stdout
    probe = ("import onereward_cli, pathlib; from onereward_cli.recipe import load_recipe; "
             "from onereward_cli.annotate import STATIC_DIR; load_recipe('tiny'); load_recipe('eval-onereward-release'); "
             "print(pathlib.Path(onereward_cli.__file__).resolve()); print((STATIC_DIR / 'annotate.js').is_file())")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    where, static = out.stdout.split()
    assert Path(where).is_relative_to(env_dir.resolve()) and static == "True"

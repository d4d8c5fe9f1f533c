"""Shared fixtures. Everything runs offline: the tiny zoo is built once per session (or reused from
$ONEREWARD_ZOO / the cache) and every stage loads it through the same code as real checkpoints."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Path of the tiny zoo (flux-fill/, qwen2.5-vl/, open-clip/), built once and shared."""
    from onereward_cli.models.tiny import build_zoo, default_zoo_dir

    if "ONEREWARD_ZOO" not in os.environ:
        os.environ["ONEREWARD_ZOO"] = str(default_zoo_dir())
    return build_zoo()


@pytest.fixture(scope="session")
def tiny_recipe(zoo):
    from onereward_cli.recipe import load_recipe

    return load_recipe("tiny")


@pytest.fixture(scope="session")
def synth_pool(tmp_path_factory, tiny_recipe):
    """A small synthetic pool (manifest.jsonl + images/)."""
    from onereward_cli import synth

    d = tmp_path_factory.mktemp("pool")
    synth.run(tiny_recipe, d, n=16, seed=0)
    return d

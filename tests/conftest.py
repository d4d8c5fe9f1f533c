"""Shared fixtures. Everything runs offline. `zoo` is the trained tiny zoo that `zoo:NAME` resolves to
(shipped in the package, or $ONEREWARD_TRAINED_ZOO); `zoo_random` is the random-init build of the same
architectures (cached under $ONEREWARD_ZOO), which `zoo-random:NAME` resolves to. Every stage loads
either through the same code as real checkpoints."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def zoo_random(tmp_path_factory):
    """Path of the random-init zoo (flux-fill/, qwen2.5-vl/, open-clip/), built once and shared."""
    from onereward_cli.models.tiny import build_zoo, default_zoo_dir

    if "ONEREWARD_ZOO" not in os.environ:
        os.environ["ONEREWARD_ZOO"] = str(default_zoo_dir())
    return build_zoo()


@pytest.fixture(scope="session")
def zoo(zoo_random):
    """Path of the trained zoo (flux-fill/, qwen2.5-vl/, open-clip/), its files checked against the manifest."""
    from onereward_cli.models.tiny import TRAINED_ONLY, ZOO_MODELS, trained_zoo_dir, verify_trained

    for name in ZOO_MODELS + TRAINED_ONLY:
        verify_trained(name)
    return trained_zoo_dir()


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

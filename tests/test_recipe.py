"""Recipes: bundled ones load and hold their values; bad keys, types and values are errors naming the key."""
import dataclasses

import pytest
import yaml

from onereward_cli.errors import InputError
from onereward_cli.recipe import RECIPES_DIR, Recipe, load_recipe, replace, to_plain

PAPER = ["flux-fill-onereward", "flux-fill-onereward-dynamic"]


def error_of(overrides, name="tiny") -> str:
    with pytest.raises(InputError) as exc:
        load_recipe(name, overrides)
    return str(exc.value)


def test_tiny_loads():
    r = load_recipe("tiny")
    assert isinstance(r, Recipe)
    assert r.models.policy == "zoo:flux-fill" and r.models.reward == "zoo:qwen2.5-vl"
    assert r.models.clip == "zoo:open-clip"
    assert r.device == "cpu" and r.dtype == "float32"
    assert set(r.tasks) == {"fill", "extend", "extend_no_prompt", "removal"}
    assert r.source.endswith("tiny.yaml")


def test_every_bundled_recipe_validates():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"tiny", *PAPER} <= set(names)
    for name in names:
        load_recipe(name)


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_hold_the_paper_values(name):
    r = load_recipe(name)
    assert r.models.policy == "black-forest-labs/FLUX.1-Fill-dev"
    assert r.models.reward == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (r.models.clip, r.models.clip_pretrained) == ("ViT-L-14", "openai")
    assert (r.device, r.dtype) == ("cuda", "bfloat16")
    # §5.1: reward model batch 16, lr 1e-6; policy batch 8, lr 5e-6
    assert (r.reward.batch_size, r.reward.lr) == (16, 1e-6)
    assert (r.rl.batch_size, r.rl.lr) == (8, 5e-6)
    # Flux Fill task mix 35/35/30, extend split into with/without a user prompt
    p = {k: t.probability for k, t in r.tasks.items()}
    assert p["fill"] == pytest.approx(0.35)
    assert p["extend"] + p["extend_no_prompt"] == pytest.approx(0.35)
    assert p["removal"] == pytest.approx(0.30)
    assert r.tasks["removal"].fixed_prompt == "remove"
    assert r.tasks["removal"].dimensions == ("removal quality",)
    assert r.tasks["extend_no_prompt"].fixed_prompt == "high-definition, perfect composition"
    assert r.tasks["fill"].dimensions == ("text alignment", "consistency", "structure", "aesthetics")
    # 100k curated subset, hierarchical K-means
    assert (r.curate.select, r.curate.mode) == (100000, "hierarchical")
    # our choices stay inside what the pipeline can run
    assert r.rl.t1 <= r.rl.t2 < r.rl.rollout_steps
    assert r.rl.resolution % 16 == 0 and r.generate.resolution % 16 == 0 and r.eval.resolution % 16 == 0
    assert r.rl.mixed_precision == "bf16" and r.rl.gradient_checkpointing
    assert r.rl.reward_activation_checkpointing and not load_recipe("tiny").rl.reward_activation_checkpointing
    assert r.rl.lora and (r.rl.lora_rank, r.rl.lora_alpha) == (64, 128)
    assert r.eval.steps == 50


def test_paper_recipes_only_differ_in_comments():
    """YAML has no include: the dynamic recipe duplicates the static one and must stay in step."""
    a, b = (load_recipe(n) for n in PAPER)
    assert a.to_dict() == b.to_dict()


def test_paper_recipe_choices_are_documented():
    for name in PAPER:
        text = (RECIPES_DIR / f"{name}.yaml").read_text()
        for key in ("t1", "lambda", "tau", "rollout_steps", "resolution", "guidance", "true_cfg"):
            rl = text.split("\nrl:\n", 1)[1].split("\neval:\n", 1)[0]
            lines = rl.splitlines()
            i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{key}:"))
            context = "\n".join(lines[max(0, i - 4):i + 1])
            assert "our choice:" in context, (name, key)


# --- unknown keys and wrong types -------------------------------------------------------------
def test_unknown_key_close_match():
    msg = error_of(["rl.lamda=0.5"])
    assert "rl.lamda" in msg and "did you mean 'lambda'" in msg


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rl:\n  lerning_rate: 1.0\n")
    with pytest.raises(InputError) as exc:
        load_recipe(str(p))
    assert str(p) in str(exc.value) and "rl.lerning_rate" in str(exc.value)


def test_unknown_section():
    msg = error_of(["no.such.key=1"])
    assert "no.such.key" in msg and "unknown key" in msg


@pytest.mark.parametrize("override, fragment", [
    ("rl.lr=abc", "expected a number"),
    ("rl.steps=1.5", "expected an integer"),
    ("rl.lora=maybe", "expected true/false"),
    ("generate.steps=[1, 2, 3]", "expected 2 values"),
    ("generate.steps=5", "expected a list"),
    ("generate.masks=3", "expected a mapping"),
    ("seed=[1]", "expected an integer"),
    ("rl.lr_warmup=2.5", "expected an integer"),
])
def test_wrong_type(override, fragment):
    msg = error_of([override])
    assert fragment in msg
    assert override.split("=")[0] in msg


def test_wrong_type_inside_a_list_names_the_element():
    msg = error_of(["generate.steps=[a, 2]"])
    assert "--set generate.steps[0]" in msg and "expected an integer" in msg
    assert "tiny.yaml" not in msg  # the bad value came from --set, not from the file


@pytest.mark.parametrize("overrides, key, fragment", [
    (["tasks.fill.probability=0.5"], "tasks", "sum to 1"),
    (["tasks.fill.probability=1.5"], "tasks.fill.probability", "[0, 1]"),
    (["rl.t1=3", "rl.t2=1"], "rl.t1", "t1 <= t2"),
    (["rl.lr=-1e-5"], "rl.lr", "positive"),
    (["reward.lr=0"], "reward.lr", "positive"),
    (["rl.t2=4"], "rl.t2", "rollout_steps"),
    (["rl.resolution=50"], "rl.resolution", "multiple of 16"),
    (["generate.resolution=72"], "generate.resolution", "multiple of 16"),
    (["eval.resolution=0"], "eval.resolution", "multiple of 16"),
    (["rl.lambda=1.5"], "rl.lambda", "(0, 1]"),
    (["rl.tau=1.0"], "rl.tau", "[0, 1)"),
    (["generate.candidates=1"], "generate.candidates", "at least 2"),
    (["generate.steps=[5, 2]"], "generate.steps", "lower bound"),
    (["curate.mode=spectral"], "curate.mode", "flat or hierarchical"),
    (["device=tpu"], "device", "auto, cpu or cuda"),
    (["reward.image_size=50"], "reward.image_size", "multiple of 28"),
    (["synth.min_objects=0"], "synth.min_objects", "min_objects"),
    (["synth.min_objects=4", "synth.max_objects=2"], "synth.min_objects", "min_objects"),
    (["rl.lr_warmup=-1"], "rl.lr_warmup", ">= 0"),
    (["rl.mixed_precision=fp16"], "rl.mixed_precision", "loss scaling"),
    (["reward.mixed_precision=fp16"], "reward.mixed_precision", "loss scaling"),
    (["rl.lr_schedule=exponential"], "rl.lr_schedule", "constant, cosine, linear"),
])
def test_impossible_values(overrides, key, fragment):
    msg = error_of(overrides)
    assert key in msg and fragment in msg


def test_unknown_task_key_suggests():
    msg = error_of(["tasks.fil.probability=0.35"])
    assert "tasks.fil" in msg and "did you mean 'fill'" in msg


def test_unknown_dimension_suggests():
    msg = error_of(["tasks.fill.dimensions=[text alignment, consistancy]"])
    assert "tasks.fill.dimensions" in msg and "consistancy" in msg and "did you mean 'consistency'" in msg


def test_text_alignment_on_prompt_free_task():
    msg = error_of(["tasks.removal.dimensions=[removal quality, text alignment]"])
    assert "tasks.removal.dimensions" in msg and "text alignment" in msg


def test_impossible_value_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rl:\n  t1: 5\n  t2: 2\n")
    with pytest.raises(InputError) as exc:
        load_recipe(str(p))
    assert str(p) in str(exc.value) and "rl.t1" in str(exc.value)


# --- overrides ----------------------------------------------------------------------------------
def test_set_overrides_nested_keys_and_lists():
    r = load_recipe("tiny", [
        "rl.lr=1e-5",  # no dot: PyYAML reads it as a string; still a number here
        "rl.lambda=0.5",
        "generate.steps=[3, 5]",
        "generate.negative_prompts=[\"\", blurry, low quality]",
        "generate.masks.removal_dilate=2",
        "tasks.fill.dimensions=[consistency, structure]",
        "models.policy=/some/local/dir",
        "eval.metrics.oracle=false",
    ])
    assert r.rl.lr == 1e-5 and r.rl.lambda_ == 0.5
    assert r.generate.steps == (3, 5)
    assert r.generate.negative_prompts == ("", "blurry", "low quality")
    assert r.generate.masks.removal_dilate == 2
    assert r.generate.masks.fill_min_frac == load_recipe("tiny").generate.masks.fill_min_frac
    assert r.tasks["fill"].dimensions == ("consistency", "structure")
    assert r.tasks["fill"].probability == 0.35  # the rest of the task stays
    assert r.models.policy == "/some/local/dir"
    assert r.eval.metrics.oracle is False


def test_set_whole_section_mapping():
    r = load_recipe("tiny", ["rl={lr: 0.5, steps: 3}"])
    assert (r.rl.lr, r.rl.steps) == (0.5, 3)
    assert "--set rl.lr" in error_of(["rl={lr: abc}"])


def test_set_without_equals_sign():
    assert "--set" in error_of(["rl.lr"])


def test_set_into_a_scalar():
    msg = error_of(["seed.x=1"])
    assert "seed" in msg


def test_float_strings_in_yaml_files(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rl:\n  lr: 1e-6\n")
    assert load_recipe(str(p)).rl.lr == 1e-6


def test_frozen():
    r = load_recipe("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.rl.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tasks["fill"].probability = 1.0


def test_replace_validates():
    r = load_recipe("tiny")
    assert replace(r, seed=5).seed == 5
    with pytest.raises(InputError):
        replace(r, rl=dataclasses.replace(r.rl, t1=10))


@pytest.mark.parametrize("name", ["tiny", *PAPER])
def test_to_dict_yaml_round_trip(name, tmp_path):
    r = load_recipe(name, ["rl.lambda=0.75"] if name == "tiny" else [])
    d = r.to_dict()
    assert "lambda" in d["rl"] and "lambda_" not in d["rl"] and "source" not in d
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    back = load_recipe(str(p))
    assert back == r
    assert back.to_dict() == d
    assert to_plain(back) == d


# --- resolving names ----------------------------------------------------------------------------
def test_missing_recipe_file(tmp_path):
    with pytest.raises(InputError) as exc:
        load_recipe(str(tmp_path / "nope.yaml"))
    assert "not found" in str(exc.value)


def test_unknown_bundled_name_lists_the_bundled_ones():
    with pytest.raises(InputError) as exc:
        load_recipe("flux-fill-onerewrd")
    assert "did you mean 'flux-fill-onereward'" in str(exc.value) and "tiny" in str(exc.value)


def test_a_folder_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny").source.endswith("tiny.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: 0\nrl:\n  lr: [1, 2\n")
    with pytest.raises(InputError) as exc:
        load_recipe(str(p))
    assert str(p) in str(exc.value) and "invalid YAML" in str(exc.value)
    assert exc.value.line is not None


def test_recipe_must_be_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(InputError):
        load_recipe(str(p))


def test_unreadable_recipe_file(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError) as exc:
        load_recipe(str(p))
    assert str(p) in str(exc.value)


def _float_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _float_keys(v, key + ".")
        elif isinstance(v, float):
            yield key


def test_every_float_key_must_be_finite():
    """Audit: no recipe number means anything infinite or NaN, whichever key it is."""
    from onereward_cli.errors import InputError

    keys = list(_float_keys(load_recipe("tiny").to_dict()))
    assert "rl.lr" in keys and "tasks.fill.probability" in keys and len(keys) > 20
    for key in keys:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(InputError, match="finite") as e:
                load_recipe("tiny", [f"{key}={bad}"])
            assert e.value.field == f"--set {key}", key

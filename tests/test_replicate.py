"""`onereward demo --replicate` at a toy size: every phase runs, the report's rows come from where the paper
says they do, and RL selects on the validation set, never on the benchmark it reports."""
import json

import pytest

from onereward_cli import replicate
from onereward_cli.recipe import load_recipe

TOY = ["synth.n=16", "curate.select=12", "generate.candidates=2", "reward.epochs=1", "reward.eval_every=0",
       "reward.save_every=0", "rl.steps=2", "rl.eval_every=1", "rl.heldout_n=2", "rl.save_every=0",
       "replicate.benchmark_per_task=1", "replicate.validation_per_task=1", "replicate.seeds=1"]


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory, zoo):
    out = tmp_path_factory.mktemp("rep")
    md = replicate.run(load_recipe("replicate", TOY), out)
    return out, md


def test_every_phase_runs_and_the_report_is_written(one_seed):
    out, md = one_seed
    phases = json.loads((out / "seed-0" / "phases.json").read_text())
    assert list(phases) == ["synth", "curate", "generate", "annotate", "export-pairs", "benchmark", "validation",
                            "train-reward (none)", "train-reward (task)", "train-reward (full)",
                            "fixed query (Table 4)", "rl-static", "rl-dynamic", "eval", "ground truth"]
    text = md.read_text()
    for row in replicate.ROWS:
        assert replicate.ROW_LABELS[row] in text
    assert (out / "accuracy.png").exists() and (out / "reward_curves.png").exists()


def test_table4_fixed_row_is_the_full_model_asked_the_fixed_query(one_seed):
    """Paper Table 4: the trained OneReward model, every test pair asked as removal / removal quality; no
    model is trained on the fixed query. Guards against reporting a separately trained model there."""
    out, _ = one_seed
    seed = out / "seed-0"
    assert not (seed / "reward-fixed").exists()
    rep = json.loads((seed / "reward-full" / "accuracy_fixed_query.json").read_text())
    assert rep["mode"] == "fixed"
    rows = replicate.accuracy_cells(seed, "symmetric_accuracy")
    assert rows["fixed"] == {(c["task"], c["dimension"]): c["symmetric_accuracy"] for c in rep["cells"]}


def test_rl_selects_on_the_validation_set_not_the_benchmark(one_seed):
    out, _ = one_seed
    seed = out / "seed-0"
    val = [json.loads(x) for x in (seed / "validation" / "validation.jsonl").read_text().splitlines()]
    bench = [json.loads(x) for x in (seed / "benchmark" / "benchmark.jsonl").read_text().splitlines()]
    assert len(val) == len(bench) == 4  # one per task each
    src = lambda d, recs: [(d / r["source"]).read_bytes() for r in recs]  # noqa: E731
    assert not set(src(seed / "validation", val)) & set(src(seed / "benchmark", bench))  # other scenes
    for name in ("rl-static", "rl-dynamic"):
        man = json.loads((seed / name / "run.json").read_text())
        assert man["inputs"]["validation"]["path"].endswith("validation/validation.jsonl")
        sel = man["selected"]
        assert 0 <= sel["step"] <= 2 and (seed / name / "last").is_dir()
        _, held = replicate.curves(seed, name)
        assert held[0] == (0, sel["start_heldout_oracle"]) and [s for s, _ in held] == [0, 1, 2]


def test_seed_mean_curve_averages_seeds_that_log_a_key_on_different_steps():
    """Each seed logs a task's reward only on the steps that drew that task, and the steps differ by seed:
    the Fig. 4 curve must still cover the run (the plot that intersected the steps across seeds was empty)."""
    from onereward_cli.replicate import seed_mean_curve

    a = {1: 0.0, 3: 1.0, 5: 1.0}
    b = {2: 0.5, 4: 0.5, 6: 0.5}
    xs, ys = seed_mean_curve([a, b], window=2)
    assert xs == [2, 3, 4, 5, 6]  # from the first step where both seeds have a value to the last
    assert ys[0] == pytest.approx((0.0 + 0.5) / 2)  # step 2: a's mean of {0.0}, b's {0.5}
    assert ys[1] == pytest.approx((0.5 + 0.5) / 2)  # step 3: a's last two {0.0, 1.0}
    assert ys[-1] == pytest.approx((1.0 + 0.5) / 2)


def test_sweep_builds_a_seeds_data_without_reward_training_and_runs_dynamic_rl(tmp_path, zoo):
    """benchmarks/replicate_sweep.py --build-data runs only the phases that need no reward model (an RL sweep
    against zoo:onereward then trains none), and a setting with the bare word `dynamic` runs Alg. 2.
    Guards the data/model split of run_seed and the sweep's dynamic switch (run.json's mode says which)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "replicate_sweep", Path(__file__).resolve().parent.parent / "benchmarks" / "replicate_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    seed = tmp_path / "seed-3"
    sets = [f"--set={k}" for k in TOY]
    assert sweep.main([str(seed), "--out", str(tmp_path / "sw"), "--build-data", "--reward-model", "zoo:onereward",
                       "--rl", "dynamic,rl.steps=1", *sets]) == 0
    phases = json.loads((seed / "phases.json").read_text())
    assert list(phases) == ["synth", "curate", "generate", "annotate", "export-pairs", "benchmark", "validation"]
    assert (seed / "data" / "rl_conditions.jsonl").exists() and not list(seed.glob("reward-*"))
    man = json.loads((tmp_path / "sw" / "rl-0" / "run.json").read_text())
    assert man["mode"] == "dynamic (Alg. 2)"

    # benchmarks/label_agreement.py on the same seed: on a removal pair the only dimension is removal
    # quality, so both dimension-blind oracles must agree with its label (a swapped winner/loser gives 0).
    spec = importlib.util.spec_from_file_location(
        "label_agreement", Path(__file__).resolve().parent.parent / "benchmarks" / "label_agreement.py")
    la = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(la)
    cells = la.agreement(seed, load_recipe("replicate", TOY).tasks)
    assert cells[("removal", "removal quality")]["n"] > 0
    assert cells[("removal", "removal quality")]["blind"] == cells[("removal", "removal quality")]["removal"] == 1.0
    assert all(0.0 <= c[k] <= 1.0 for c in cells.values() for k in ("blind", "removal"))


def test_jobs_runs_each_seed_in_its_own_process_and_aggregates_them(tmp_path, zoo):
    """replicate.jobs > 1: every seed's phases run in a child process (its recipe and log in its folder),
    and the parent aggregates all of them. Guards the child entry point and the recipe round trip."""
    out = tmp_path / "rep"
    md = replicate.run(load_recipe("replicate", TOY + ["replicate.seeds=2", "replicate.jobs=2"]), out)
    for s in (0, 1):
        d = out / f"seed-{s}"
        assert "ground truth" in json.loads((d / "phases.json").read_text())
        assert load_recipe(str(d / "recipe.yaml")).seed == s and (d / "replicate.log").exists()
    assert "seed-0, seed-1" in md.read_text()


def test_jobs_a_failing_seed_is_one_error_naming_its_log(tmp_path, zoo):
    """A child that fails on bad input exits 2 and the parent raises one InputError naming the seed's log."""
    from onereward_cli.errors import InputError

    r = load_recipe("replicate", TOY + ["replicate.seeds=2", "replicate.jobs=2", "models.policy=/nonexistent/flux"])
    with pytest.raises(InputError, match=r"seed-0 \(exit 2, see .*seed-0/replicate.log\)"):
        replicate.run(r, tmp_path / "rep")


def test_jobs_interrupted_leaves_no_child_running(tmp_path, zoo, monkeypatch):
    """Ctrl-C in the parent terminates every child seed at once (a re-run resumes them): none is left running
    or waited out. Fails if the parent only waits for its children."""
    import subprocess

    started, real = [], subprocess.Popen

    def popen(*a, **k):
        started.append(real(*a, **k))
        return started[-1]

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(replicate.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        replicate.run(load_recipe("replicate", TOY + ["replicate.seeds=2", "replicate.jobs=2"]), tmp_path / "rep")
    assert len(started) == 2 and all(p.poll() is not None and p.returncode < 0 for p in started)  # terminated

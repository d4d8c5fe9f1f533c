"""The demo chain, end to end, at an even smaller size than `make demo`."""
import json

from onereward_cli import demo
from onereward_cli.recipe import load_recipe

SMALL = ["synth.n=12", "curate.select=8", "generate.candidates=3", "generate.steps=[2,2]", "reward.epochs=1",
         "rl.steps=2", "rl.save_every=0", "rl.resolution=32", "eval.resolution=32", "eval.steps=2",
         "generate.resolution=32", "reward.image_size=28"]


def test_demo_runs_the_whole_chain(zoo, tmp_path):
    out = tmp_path / "demo"
    demo.run(load_recipe("tiny", SMALL), out)
    for f in ["pool/manifest.jsonl", "curated/curated.jsonl", "candidates/candidates.jsonl",
              "candidates/annotations.jsonl", "data/pairs/train.jsonl", "data/pairs/test.jsonl",
              "reward/final/config.json", "reward/accuracy.json", "rl-static/policy/onereward_policy.json",
              "rl-dynamic/ema/onereward_policy.json", "rl-static/reward_curves.png", "eval/report.html",
              "eval/metrics.json"]:
        assert (out / f).exists(), f
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(m["policies"]) == 3  # static vs base vs dynamic
    assert json.loads((out / "rl-dynamic" / "run.json").read_text())["mode"].startswith("dynamic")


def test_demo_refuses_a_foreign_folder_and_replaces_its_own(zoo, tmp_path):
    import pytest

    from onereward_cli.errors import InputError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(InputError):
        demo.run(load_recipe("tiny", SMALL), foreign)
    assert (foreign / "keep.txt").exists()


def test_demo_with_keep_best_selects_on_world_validation_not_the_benchmark(zoo, tmp_path):
    """rl.keep_best in the demo must select on its own validation triplets: selecting on data/benchmark.jsonl
    (what eval reports) would make the reported held-out score a training signal."""
    out = tmp_path / "demo"
    demo.run(load_recipe("tiny", SMALL + ["rl.keep_best=true", "rl.eval_every=1", "rl.heldout_n=4"]), out)
    val = out / "data" / "validation" / "validation.jsonl"
    assert len(val.read_text().splitlines()) == 4  # one world triplet per task
    for name in ("rl-static", "rl-dynamic"):
        man = json.loads((out / name / "run.json").read_text())
        assert man["inputs"]["validation"]["path"] == str(val.resolve())
        assert 0 <= man["selected"]["step"] <= 2 and (out / name / "last").is_dir()


def test_demo_reports_on_world_triplets_and_optimises_the_judge_it_is_given(zoo, tmp_path):
    """demo.benchmark_per_task: eval's held-out benchmark is world triplets (with ground truth) apart from
    the pool; demo.rl_reward_model: both RL runs (and eval's reward-model Good-Same-Bad) use that judge,
    while train-reward still trains and reports its own."""
    out = tmp_path / "demo"
    at_112 = [s for s in SMALL if not s.startswith("reward.image_size")]  # the judge was trained at 112 px
    demo.run(load_recipe("tiny", at_112 + ["demo.benchmark_per_task=1", "demo.rl_reward_model=zoo:onereward"]), out)
    bench = out / "data" / "benchmark" / "benchmark.jsonl"
    recs = [json.loads(x) for x in bench.read_text().splitlines()]
    assert sorted(r["task"] for r in recs) == ["extend", "extend_no_prompt", "fill", "removal"]
    assert all("target" in r for r in recs)
    for name in ("rl-static", "rl-dynamic"):
        assert json.loads((out / name / "run.json").read_text())["inputs"]["reward_model"]["path"] == "zoo:onereward"
    assert (out / "reward" / "final" / "config.json").exists()
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert sum(o["oracle"]["n"] for o in (v[m["policies"][0]["label"]] for v in m["summary"].values())) == 4

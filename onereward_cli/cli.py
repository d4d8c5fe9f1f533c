"""The `onereward` command line. Each subcommand is thin: resolve the recipe, call the stage.

Exit codes: 0 success, 2 bad input or usage (one line naming file, line and field), 3 training aborted on
non-finite losses (the last good checkpoint is kept), 1 unexpected failure.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click import exceptions as cx  # typer (>= 0.29) vendors click: its usage errors are these

from . import __version__
from .errors import InputError, TrainingAborted

console = Console(stderr=True)
app = typer.Typer(
    name="onereward",
    help="OneReward end to end: curate -> generate -> annotate -> export-pairs -> train-reward -> rl -> eval.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

RecipeOpt = typer.Option("tiny", "--recipe", "-r", help="Bundled recipe name (tiny, flux-fill-onereward, ...) or a YAML path.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key, e.g. --set rl.lr=1e-5 (repeatable).")


def _recipe(name: str, overrides: Optional[List[str]]):
    from .recipe import load_recipe

    return load_recipe(name, overrides or [])


def _out(path: Path, field: str = "--out", file: bool = False):
    from .artifacts import check_out_dir

    check_out_dir(path, field, file=file)


def _version_cb(value: bool):
    if value:
        typer.echo(f"onereward {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True,
                                       help="Print the version and exit.")):
    """OneReward: one VLM reward model, multi-task reward feedback learning for mask-guided generation."""


@app.command("tiny-models")
def tiny_models(
    out: Path = typer.Argument(None, help="Directory for the zoo (default: --trained prints where it is installed; "
                                          "--random builds into the cache, $ONEREWARD_ZOO)."),
    trained: bool = typer.Option(True, "--trained/--random",
                                 help="The trained zoo shipped with the package (zoo:NAME), or a random-init build "
                                      "of the same architectures (zoo-random:NAME)."),
    seed: int = typer.Option(0, help="--random: seed for the weights (same seed, same bytes)."),
    force: bool = typer.Option(False, help="Overwrite models that already exist in OUT."),
):
    """The offline tiny zoo (FLUX Fill, Qwen2.5-VL, open_clip) in the real HF formats.

    Example: onereward tiny-models ./zoo            (a copy of the trained zoo, hashes checked)
             onereward tiny-models ./zoo --random   (random init; retrain with python -m onereward_cli.pretrain)
    """
    from .models.tiny import ZOO_MODELS, build_zoo, copy_trained_zoo, trained_zoo_dir

    if out is not None:
        _out(out, "OUT")
    if trained:
        d = copy_trained_zoo(out, force=force) if out is not None else trained_zoo_dir()
    else:
        d = build_zoo(out, seed=seed, force=force)
    for name in ZOO_MODELS:
        console.print(f"[green]{'trained' if trained else 'random'}[/] {d / name}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output directory for the image pool."),
    n: int = typer.Option(None, "--n", help="Number of images (default: recipe synth.n)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default: recipe seed)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Write a synthetic image pool (shapes on textured backgrounds, captions, object boxes) + manifest.jsonl.

    Example: onereward synth ./pool --n 200 --seed 0
    """
    r = _recipe(recipe, set_)
    _out(out, "OUT")
    from . import synth as stage

    stage.run(r, out, n=n if n is not None else r.synth.n, seed=seed if seed is not None else r.seed)


@app.command()
def curate(
    pool: Path = typer.Argument(..., help="Image folder (recursive) or JSONL manifest with a 'path' field."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    select: int = typer.Option(None, "--select", "-n", help="Target subset size (default: recipe curate.select)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Embed a pool with CLIP and pick a diverse, representative subset with K-means (paper §5.1).

    Example: onereward curate ./pool --out ./curated --select 32
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import curate as stage

    stage.run(r, pool, out, select=select if select is not None else r.curate.select)


@app.command()
def generate(
    input: Path = typer.Argument(..., help="curated.jsonl, an image folder, or a JSONL of triplets (id, source, mask, prompt, task)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (candidates.jsonl + images/)."),
    candidates: int = typer.Option(None, "--candidates", "-k", help="Candidates per sample (default: recipe generate.candidates)."),
    limit: int = typer.Option(0, help="Use only the first N inputs (0 = all)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Build task triplets and generate N candidates each with randomised inference parameters.

    Example: onereward generate ./curated/curated.jsonl --out ./cands --candidates 4
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import generate as stage

    stage.run(r, input, out, candidates=candidates if candidates is not None else r.generate.candidates, limit=limit)


@app.command()
def annotate(
    candidates_dir: Path = typer.Argument(..., help="A `generate` output directory."),
    annotator: str = typer.Option("anonymous", help="Annotator name recorded with every label."),
    host: str = typer.Option("127.0.0.1", help="Address to bind the labelling page to."),
    port: int = typer.Option(8765, help="Port for the labelling page."),
    import_: Path = typer.Option(None, "--import", help="Import labels from our JSONL or a CSV (sample_id, dimension, best, worst)."),
    oracle: bool = typer.Option(False, "--oracle", help="Label with the synthetic oracle annotator (demo, tests)."),
    out: Path = typer.Option(None, "--out", "-o", help="Annotations file (default: CANDIDATES_DIR/annotations.jsonl)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Best-of-N / Worst-of-N labelling per evaluation dimension: a local web page, an import, or the oracle.

    Example: onereward annotate ./cands --annotator alice   (then open http://127.0.0.1:8765)
    """
    r = _recipe(recipe, set_)
    from . import annotate as stage

    target = out or candidates_dir / "annotations.jsonl"
    _out(target, "--out", file=True)
    if oracle and import_:
        raise InputError("choose one of --oracle and --import", field="--oracle")
    if not 0 <= port <= 65535:
        raise InputError(f"must be in 0..65535, got {port}", field="--port")
    if oracle:
        stage.annotate_with_oracle(r, candidates_dir, target)
    elif import_:
        stage.import_annotations(r, candidates_dir, import_, target, annotator=annotator)
    else:
        stage.serve(r, candidates_dir, target, annotator=annotator, host=host, port=port)


@app.command("export-pairs")
def export_pairs(
    annotations: Path = typer.Argument(..., help="annotations.jsonl (its folder must hold candidates.jsonl) or the candidates folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; writes pairs/train.jsonl and pairs/test.jsonl."),
    test_fraction: float = typer.Option(None, "--test-fraction", help="Share of samples held out (default: recipe pairs.test_fraction)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Turn best/worst picks into winner/loser pairs, split by sample.

    Example: onereward export-pairs ./cands/annotations.jsonl --out ./data --test-fraction 0.2
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import pairs as stage

    stage.run(r, annotations, out, test_fraction=test_fraction if test_fraction is not None else r.pairs.test_fraction)


@app.command("train-reward")
def train_reward(
    pairs_dir: Path = typer.Argument(..., help="Directory with train.jsonl and test.jsonl (or its parent holding pairs/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the reward model."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Fine-tune the VLM reward model with eq. 3 and report accuracy per task x dimension (Table 1).

    Example: onereward train-reward ./data/pairs --out ./reward
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import train_reward as stage

    stage.run(r, pairs_dir, out, resume=resume)


@app.command()
def rl(
    data: Path = typer.Argument(..., help="Conditions: a JSONL of triplets, a generate output folder, or curated.jsonl."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (checkpoints, policy, EMA, logs)."),
    reward_model: str = typer.Option(None, "--reward-model", help="Reward model path or hub id (default: recipe models.reward)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Alg. 2: the EMA model is the reference."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the last checkpoint in OUT."),
    validation: Path = typer.Option(None, "--validation", help="Held-out triplets (JSONL) whose oracle score is logged "
                                                               "every rl.eval_every steps and that rl.keep_best selects "
                                                               "on (default: the training conditions)."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Multi-task reward feedback learning (Alg. 1; --dynamic for Alg. 2).

    Example: onereward rl ./cands --reward-model ./reward/final --out ./rl-static
             onereward rl ./cands --validation ./val.jsonl --set rl.eval_every=10 --set rl.keep_best=true --out ./rl
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import rl as stage

    stage.run(r, data, out, reward_model=reward_model, dynamic=dynamic, resume=resume, heldout=validation)


@app.command("eval")
def eval_(
    policy: str = typer.Option(None, "--policy", "-p", help="Base model id/path, an `rl` output, a transformer or LoRA "
                                                          "folder, or a hub subfolder (owner/repo/folder); default: "
                                                          "recipe eval.policy."),
    benchmark: Path = typer.Option(..., "--benchmark", "-b", help="JSONL of triplets or a generate-style folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (metrics, GSB, report.html)."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", "-c", help="Other policies to compare against "
                                                                              "(repeatable; default: recipe eval.compare)."),
    reward_model: str = typer.Option(None, "--reward-model", help="Reward model for Good-Same-Bad (default: recipe models.reward)."),
    human: Path = typer.Option(None, "--human", help="Human ratings (CSV/JSONL: sample, model, dimension, value) for Table 3."),
    recipe: str = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Generate with fixed seeds, score with the paper's metrics, compare policies (GSB), write report.html.

    Example: onereward eval --policy ./rl-static/policy --compare zoo:flux-fill --benchmark ./bench.jsonl --out ./eval
             onereward eval --recipe eval-onereward-release --benchmark ./bench.jsonl --out ./eval
    """
    r = _recipe(recipe, set_)
    _out(out)
    from . import evaluate as stage

    stage.run(r, policy=policy, benchmark=benchmark, out=out, compare=compare or None, reward_model=reward_model,
              human=human)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where every artifact goes."),
    replicate: bool = typer.Option(False, "--replicate", help="Run the miniature replication instead: Tables 1/4, Fig. 4, Table 2, Fig. 7 over seeds (resumes)."),
    recipe: str = typer.Option("demo", "--recipe", "-r", help="Bundled recipe name or a YAML path (default: demo; "
                                                               "replicate with --replicate)."),
    set_: Optional[List[str]] = SetOpt,
):
    """Run the whole pipeline on the embedded default (tiny zoo + synthetic data) and summarise it.

    Example: onereward demo --out demo-out
    """
    if replicate and recipe == "demo":
        recipe = "replicate"  # the same tiny zoo with more data and steps, so the ablations can separate
        console.print("--replicate: using recipe 'replicate' (recipes/replicate.yaml)")
    r = _recipe(recipe, set_)
    _out(out)
    from . import demo as stage

    stage.run(r, out, replicate=replicate)


def _usage_line(e) -> str:
    """A usage error as `<field>: <problem>`: the option it is about, else the command."""
    if isinstance(e, cx.BadParameter) and not isinstance(e, cx.MissingParameter) and e.param is not None:
        text = f"{e.param.get_error_hint().replace(chr(39), '')}: {e.message}"
    else:
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "onereward"
        text = f"{where}: {e.format_message()}"
    return " ".join(text.split())  # one line, whatever click wrapped


def _error(text: str, code: int):
    # escape: a path or value like "data/[test]/x" is text, not rich markup
    console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # not standalone: usage errors come here, to be printed as one line like every other bad input
        rv = app(args=argv, standalone_mode=False)
    except cx.NoArgsIsHelpError as e:  # bare `onereward` / `onereward rl`: the help text
        e.show()
        sys.exit(2)
    except cx.ClickException as e:
        _error(_usage_line(e), 2)
    except typer.Abort:
        console.print("[yellow]aborted[/]")
        sys.exit(1)
    except InputError as e:
        _error(str(e), 2)
    except TrainingAborted as e:
        _error(str(e), 3)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        console.print_exception(show_locals=False, max_frames=8)
        console.print(f"[red]unexpected failure:[/] {e.__class__.__name__}: {escape(str(e))}", highlight=False,
                      soft_wrap=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) comes back as its code


if __name__ == "__main__":
    main()

"""How good the trained tiny zoo is, against the random zoo of the same architectures (issue 12).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zoo_quality.py [--out DIR] [--per-task 40] [--quick]

On held-out synthetic data (seeds no pretraining stage draws from):
- VAE: reconstruction PSNR (dB) of whole scenes, trained vs random;
- generator: oracle score per task x dimension of full rollouts (the eval path: fixed seeds, the
  tiny recipe's eval settings) for the trained zoo, the random zoo, and the ground truth (the
  ceiling the world's renderer knows);
- VLM: greedy answer accuracy per question kind (`model.generate`), trained vs random;
- CLIP: image -> caption retrieval top-1 among the held-out scenes (chance = 1 / n);
- generate: the share of "no difference" oracle labels (Best-of-N / Worst-of-N spread below the
  margin) for candidates of the random zoo and of the trained zoo, same pool, same parameters.
Writes DIR/zoo_quality.json and prints markdown tables (BENCHMARKS.md has the last run).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onereward_cli.tasks import ALL_DIMENSIONS  # noqa: E402

DIMS = {"fill": ALL_DIMENSIONS[:4], "extend": ALL_DIMENSIONS[:4], "extend_no_prompt": ALL_DIMENSIONS[1:4],
        "removal": ("removal quality",)}


def generator_scores(pipe_dir: str, triplets, steps: int, guidance: float, max_len: int) -> dict:
    from diffusers import FluxFillPipeline

    from onereward_cli.pretrain import flux
    from onereward_cli.synth import oracle_scores

    pipe = FluxFillPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    images = flux.sample(pipe, triplets, steps=steps, guidance=guidance, max_sequence_length=max_len)
    return per_dimension(triplets, images, oracle_scores)


def per_dimension(triplets, images, oracle_scores) -> dict:
    from PIL import Image

    out: dict = {}
    for t, im in zip(triplets, images):
        if torch.is_tensor(im):
            im = Image.fromarray((im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        for d, v in oracle_scores(t.source, t.mask, im, DIMS[t.task], t.user_prompt).items():
            out.setdefault(t.task, {}).setdefault(d, []).append(v)
    return {k: {d: float(np.mean(v)) for d, v in dims.items()} for k, dims in out.items()}


def no_difference_share(policy_spec: str, n: int, work: Path) -> dict:
    from onereward_cli import annotate, generate, synth
    from onereward_cli.artifacts import read_jsonl
    from onereward_cli.recipe import load_recipe

    r = load_recipe("tiny", [f"models.policy={policy_spec}"])
    synth.run(r, work / "pool", n=n, seed=4242)
    generate.run(r, work / "pool" / "manifest.jsonl", work / "cands", candidates=r.generate.candidates)
    annotate.annotate_with_oracle(r, work / "cands", work / "cands" / "annotations.jsonl")
    labels = [v for rec in read_jsonl(work / "cands" / "annotations.jsonl") for v in rec["labels"].values()]
    none = sum(v == annotate.NO_DIFFERENCE for v in labels)
    return {"labels": len(labels), "no_difference": none, "share": none / max(1, len(labels))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/zoo_quality"))
    p.add_argument("--per-task", type=int, default=40)
    p.add_argument("--pool", type=int, default=48, help="pool size for the no-difference share")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test runs this)")
    a = p.parse_args(argv)
    if a.quick:
        a.per_task, a.pool = 2, 4
    from onereward_cli.models.clip import load_clip
    from onereward_cli.models.tiny import resolve_model_path
    from onereward_cli.pretrain import clip as clip_stage
    from onereward_cli.pretrain import vae as vae_stage
    from onereward_cli.pretrain import vlm as vlm_stage
    from onereward_cli.pretrain import world
    from onereward_cli.recipe import load_recipe

    torch.manual_seed(0)
    r = load_recipe("tiny")
    cfg = world.WorldConfig.from_recipe(r)
    zoos = {"trained": "zoo", "random": "zoo-random"}
    res: dict = {"per_task": a.per_task}
    t0 = time.perf_counter()

    from diffusers import AutoencoderKL
    held = vae_stage.heldout_images(cfg, max(4, a.per_task))
    res["vae_psnr"] = {k: vae_stage.psnr(AutoencoderKL.from_pretrained(resolve_model_path(f"{z}:flux-fill"),
                                                                       subfolder="vae"), held)
                       for k, z in zoos.items()}

    triplets = []
    for task in DIMS:
        rng = random.Random(f"zoo-quality:{task}")
        triplets += [world.triplet(task, rng, cfg) for _ in range(a.per_task)]
    from onereward_cli.synth import oracle_scores
    res["generator"] = {k: generator_scores(resolve_model_path(f"{z}:flux-fill"), triplets, r.eval.steps,
                                            r.eval.guidance, r.eval.max_sequence_length) for k, z in zoos.items()}
    res["generator"]["ground truth"] = per_dimension(triplets, [t.target for t in triplets], oracle_scores)

    from transformers import AutoModelForImageTextToText, AutoProcessor
    qa = vlm_stage.heldout(cfg, max(2, a.per_task))
    res["vlm_accuracy"] = {}
    for k, z in zoos.items():
        path = resolve_model_path(f"{z}:qwen2.5-vl")
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        res["vlm_accuracy"][k] = vlm_stage.accuracy(model, AutoProcessor.from_pretrained(path), qa)

    pairs = clip_stage.heldout(cfg, max(4, 2 * a.per_task))
    res["clip_top1"] = {"chance": 1 / len(pairs)}
    for k, z in zoos.items():
        m, pre, tok = load_clip(f"{z}:open-clip")
        res["clip_top1"][k] = clip_stage.retrieval_top1(m, pre, tok, pairs)

    with tempfile.TemporaryDirectory() as tmp:
        res["no_difference"] = {k: no_difference_share(f"{z}:flux-fill", a.pool, Path(tmp) / k)
                                for k, z in zoos.items()}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "zoo_quality.json").write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = ["| | trained | random |", "|---|---|---|",
             f"| VAE PSNR (dB) | {res['vae_psnr']['trained']:.2f} | {res['vae_psnr']['random']:.2f} |",
             f"| CLIP retrieval top-1 (chance {res['clip_top1']['chance']:.3f}) | {res['clip_top1']['trained']:.3f} | "
             f"{res['clip_top1']['random']:.3f} |",
             f"| no-difference labels | {res['no_difference']['trained']['share']:.1%} | "
             f"{res['no_difference']['random']['share']:.1%} |", ""]
    g = res["generator"]
    lines += ["| task | dimension | random zoo | trained zoo | ground truth |", "|---|---|---|---|---|"]
    for task, dims in g["ground truth"].items():
        for d in dims:
            lines.append(f"| {task} | {d} | {g['random'][task][d]:.3f} | {g['trained'][task][d]:.3f} | "
                         f"{g['ground truth'][task][d]:.3f} |")
    lines += ["", "| question kind | random | trained |", "|---|---|---|"]
    for kind, v in res["vlm_accuracy"]["trained"].items():
        lines.append(f"| {kind} | {res['vlm_accuracy']['random'][kind]:.1%} | {v:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Pretraining the tiny zoo on the synthetic world: the starting point the paper takes for granted.

    python -m onereward_cli.pretrain OUT [--work DIR] [--seed 0] [--scale 1.0] [--only vae,flux,vlm,clip] [--jobs 2]

The paper fine-tunes a *pretrained* FLUX.1-Fill-dev with a reward model built on a *pretrained*
Qwen2.5-VL. At toy size nothing pretrained exists, so this module makes it: it builds the random zoo
(`models/tiny.py`, the same architectures), trains each model with its own objective on `synth.py`'s
world, and writes OUT/{flux-fill, qwen2.5-vl, open-clip} in the same HF formats plus manifest.json
(every file's sha256 and the training summary). The package ships such an OUT as onereward_cli/zoo/,
which `zoo:NAME` resolves to.

    vae.py    AutoencoderKL: reconstruction + KL; latent shift/scale from its statistics
    flux.py   FluxTransformer2DModel (+ CLIP/T5 text encoders): rectified flow on fill / extend /
              removal triplets, the condition exactly as FluxFillPipeline builds it; guidance distilled
    vlm.py    Qwen2.5-VL: a vision warm-up (a max-pooled shape head), then visual question answering
              through its LM head and chat template
    clip.py   open_clip: image-caption contrastive loss

Every stage is seeded per step and checkpoints (WORK/<stage>/checkpoints); a re-run resumes where
a killed one stopped, and a finished stage is skipped. Same seed, same machine: same bytes.
`--jobs 2` runs the VLM and CLIP stages in a second process beside VAE -> flux (they share nothing),
each process at one thread: the same bytes as one process at OMP_NUM_THREADS=1, in less wall time
(the shipped budget: 27 min 54 s on a 2-core CPU, ~33 min one stage after another; BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("vae", "flux", "vlm", "clip")


@dataclass(frozen=True)
class Budget:
    """Steps, batches, learning rates and evaluation sizes of the shipped zoo (timed in BENCHMARKS.md).

    `scaled(s)` multiplies the step counts; below s = 0.05 (tests) batches and evaluations shrink too."""
    vae_steps: int = 2500
    vae_lr: float = 2e-3
    vae_batch: int = 16
    flux_steps: int = 1800
    flux_lr: float = 1e-3
    flux_batch: int = 16
    flux_ema: float = 0.995
    flux_mask_weight: float = 4.0  # pretrain.flux.token_mask_weights; 0 = the plain mean (A/B in BENCHMARKS.md)
    vit_steps: int = 2000  # the VLM's vision warm-up (vlm.vit_warmup), before the question answering
    vit_lr: float = 3e-3
    vit_head: str = "tokens"  # the warm-up's probe: "tokens" (each token's own object) or "shape" (max-pooled)
    vlm_token_aux: float = 0.0  # weight of the per-token loss kept beside question answering (vlm.run)
    vlm_steps: int = 2600
    vlm_lr: float = 1e-3
    vlm_batch: int = 32
    clip_steps: int = 400
    clip_lr: float = 2e-3
    clip_batch: int = 64
    max_sequence_length: int = 32
    eval_n: int = 16  # held-out items per evaluation (x2 for the VAE, x5 for CLIP; per question kind for the VLM)
    evaluations: int = 4  # evaluations (and checkpoints) per stage

    def scaled(self, s: float) -> "Budget":
        from dataclasses import replace

        b = replace(self, **{k: max(2, int(round(getattr(self, k) * s)))
                             for k in ("vae_steps", "flux_steps", "vit_steps", "vlm_steps", "clip_steps")})
        if s < 0.05:
            b = replace(b, vae_batch=4, flux_batch=4, vlm_batch=4, clip_batch=8, eval_n=2, evaluations=2)
        return b


def _loop(steps: int, lr: float, budget: Budget, ema: float = 0.0):
    from .loop import LoopConfig

    save = max(1, steps // budget.evaluations)
    return LoopConfig(steps=steps, lr=lr, warmup=min(100, max(1, steps // 10)), save_every=save,
                      log_every=max(1, min(25, save)), ema=ema)


def _done(d: Path) -> dict | None:
    f = d / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _finish(d: Path, result: dict):
    from ..artifacts import write_json

    write_json(d / "result.json", result)


def run(out, work=None, *, seed: int = 0, scale: float = 1.0, only=STAGES, console=None, jobs: int = 1) -> Path:
    import os
    import subprocess
    import sys

    import torch
    from diffusers import AutoencoderKL, FluxFillPipeline
    from rich.console import Console
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..errors import InputError
    from ..models import clip as clip_loader
    from ..models.tiny import build_zoo
    from . import clip as clip_stage
    from . import flux as flux_stage
    from . import vae as vae_stage
    from . import vlm as vlm_stage
    from .world import WorldConfig

    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", path=out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    budget = Budget().scaled(scale) if scale != 1.0 else Budget()
    cfg = WorldConfig()
    torch.manual_seed(seed)
    base = build_zoo(work / "base", seed=seed)
    results: dict = {}

    def stage(name, fn):
        d = work / name
        prev = _done(d)
        if prev is not None:
            console.print(f"pretrain {name}: done earlier ({prev.get('seconds', 0):.0f} s)")
            results[name] = prev
            return
        t = time.perf_counter()
        res = fn(d)
        res["seconds"] = round(time.perf_counter() - t, 1)
        _finish(d, res)
        results[name] = res
        console.print(f"pretrain {name}: {json.dumps({k: v for k, v in res.items() if k != 'log'})}")

    def do_vae(d):
        vae = AutoencoderKL.from_pretrained(base / "flux-fill", subfolder="vae")
        res = vae_stage.run(vae, d, cfg, _loop(budget.vae_steps, budget.vae_lr, budget), seed=seed,
                            batch=budget.vae_batch, console=console, eval_n=2 * budget.eval_n)
        vae.save_pretrained(d / "model")
        return res

    def do_flux(d):
        pipe = FluxFillPipeline.from_pretrained(base / "flux-fill")
        pipe.vae = AutoencoderKL.from_pretrained(work / "vae" / "model")
        pipe.set_progress_bar_config(disable=True)
        res = flux_stage.run(pipe, d, cfg, _loop(budget.flux_steps, budget.flux_lr, budget, ema=budget.flux_ema),
                             seed=seed, batch=budget.flux_batch, max_sequence_length=budget.max_sequence_length,
                             console=console, eval_n=budget.eval_n, mask_weight=budget.flux_mask_weight)
        for sub in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(pipe, sub).save_pretrained(d / "model" / sub)
        return res

    def do_vlm(d):
        model = AutoModelForImageTextToText.from_pretrained(base / "qwen2.5-vl")
        processor = AutoProcessor.from_pretrained(base / "qwen2.5-vl")
        res = vlm_stage.run(model, processor, d, cfg, _loop(budget.vlm_steps, budget.vlm_lr, budget), seed=seed,
                            batch=budget.vlm_batch, console=console, eval_per_kind=budget.eval_n,
                            vit_loop=_loop(budget.vit_steps, budget.vit_lr, budget), vit_head=budget.vit_head,
                            token_aux=budget.vlm_token_aux)
        model.save_pretrained(d / "model")
        return res

    def do_clip(d):
        model, preprocess, tokenizer = clip_loader.load_clip(str(base / "open-clip"))
        res = clip_stage.run(model, preprocess, tokenizer, d, cfg, _loop(budget.clip_steps, budget.clip_lr, budget),
                             seed=seed, batch=budget.clip_batch, console=console, eval_n=5 * budget.eval_n)
        from safetensors.torch import save_file

        (d / "model").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(d / "model" / "open_clip_model.safetensors"))
        return res

    fns = {"vae": do_vae, "flux": do_flux, "vlm": do_vlm, "clip": do_clip}
    side = [s for s in ("vlm", "clip") if s in only and _done(work / s) is None]
    child = None
    if jobs > 1 and side and any(s in only for s in ("vae", "flux")):
        # The random build is complete on disk, so the child only reads it; one thread each (2 cores).
        torch.set_num_threads(1)
        cmd = [sys.executable, "-m", "onereward_cli.pretrain", str(out), "--work", str(work), "--seed", str(seed),
               "--scale", repr(scale), "--only", ",".join(side)]
        child = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        console.print(f"pretrain: {', '.join(side)} in a second process (pid {child.pid}), one thread each")
    try:
        for name in STAGES:
            if name in only and not (child and name in side):
                stage(name, fns[name])
        if child:
            if child.wait() != 0:
                raise InputError(f"the second process ({', '.join(side)}) exited with {child.returncode}; "
                                 f"re-run to resume it", path=work)
            for name in side:
                results[name] = _done(work / name)
                if results[name] is None:
                    raise InputError(f"the second process left no result for stage {name}", path=work / name)
    finally:
        if child and child.poll() is None:
            child.terminate()
            child.wait()
    if set(only) != set(STAGES):
        return work
    _assemble(base, work, out, {"seed": seed, "training": results, "budget": budget.__dict__,
                                "total_seconds": round(sum(r.get("seconds", 0) for r in results.values()), 1),
                                "jobs": jobs, "wall_seconds_this_run": round(time.perf_counter() - started, 1)})
    console.print(f"pretrain: trained zoo -> {out}")
    return out


def _assemble(base: Path, work: Path, out: Path, info: dict):
    """OUT = the random build's folders (configs, tokenizers, processors) with the trained weights, and
    manifest.json. All of it is assembled under a temporary name, so an OUT that exists is complete."""
    from ..models.tiny import write_trained_manifest

    tmp = out.with_name(f".{out.name}.assembling")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("flux-fill", "qwen2.5-vl", "open-clip"):
        shutil.copytree(base / name, tmp / name, ignore=shutil.ignore_patterns(".complete"))
    for sub in ("vae",):
        shutil.rmtree(tmp / "flux-fill" / sub)
        shutil.copytree(work / "vae" / "model", tmp / "flux-fill" / sub)
    for sub in ("transformer", "text_encoder", "text_encoder_2"):
        shutil.rmtree(tmp / "flux-fill" / sub)
        shutil.copytree(work / "flux" / "model" / sub, tmp / "flux-fill" / sub)
    for f in (work / "vlm" / "model").iterdir():
        shutil.copy2(f, tmp / "qwen2.5-vl" / f.name)
    shutil.copy2(work / "clip" / "model" / "open_clip_model.safetensors",
                 tmp / "open-clip" / "open_clip_model.safetensors")
    write_trained_manifest(tmp, info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> int:
    from rich.console import Console

    from ..errors import InputError

    p = argparse.ArgumentParser(prog="python -m onereward_cli.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="Where the trained zoo goes (flux-fill/, qwen2.5-vl/, open-clip/, manifest.json).")
    p.add_argument("--work", type=Path, default=None, help="Checkpoints and stage outputs (default: OUT.work).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="Multiply every stage's step count (tests: 0.01).")
    p.add_argument("--only", default=",".join(STAGES), help="Comma-separated stages to run (all: assemble OUT).")
    p.add_argument("--jobs", type=int, default=1,
                   help="2: the VLM and CLIP stages in a second process beside VAE -> flux, one thread each.")
    a = p.parse_args(argv)
    console = Console(stderr=True)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in STAGES]
    try:
        if bad:
            raise InputError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}", field="--only")
        if not a.scale > 0:
            raise InputError("must be > 0", field="--scale")
        if a.jobs not in (1, 2):
            raise InputError("must be 1 or 2", field="--jobs")
        run(a.out, a.work, seed=a.seed, scale=a.scale, only=only, console=console, jobs=a.jobs)
    except InputError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 2
    return 0

"""The training loop every zoo model shares: seeded steps, warmup + cosine LR, checkpoint/resume.

Exact resume: the batch of step s is a pure function of (seed, model name, s) (see `step_rng`), so a
checkpoint holds only the trainable weights, the optimizer state and the step. A checkpoint is a
folder written under a temporary name and renamed into place; `latest.json` is written last, so a
kill at any moment leaves the previous checkpoint as the one a resume picks up.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..artifacts import append_jsonl, load_tensors, read_jsonl, save_tensors, strip_meta, write_json, write_jsonl
from ..checkpointing import names_latest, optimizer_from_files, optimizer_to_files
from ..errors import InputError


def step_rng(seed: int, name: str, step: int) -> tuple[random.Random, torch.Generator]:
    """The Python and torch generators of one training step (str seeds hash stably with sha512)."""
    r = random.Random(f"{seed}:{name}:{step}")
    return r, torch.Generator().manual_seed(r.randrange(2**62))


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `floor` of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    save_every: int = 200
    log_every: int = 25
    max_grad_norm: float = 1.0
    # EMA of the weights (0 = none). With one, the EMA is what evaluation sees and what ships.
    ema: float = 0.0


def _named_trainable(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{m}.{n}": p for m, mod in modules.items() for n, p in mod.named_parameters() if p.requires_grad}


def _checkpoint_dir(work: Path) -> Path:
    return work / "checkpoints"


def save_checkpoint(work: Path, step: int, params: dict, opt, extra: dict | None = None, ema: dict | None = None):
    ckd = _checkpoint_dir(work)
    ck = ckd / f"step-{step:07d}"
    if names_latest(ckd, ck.name):  # resumed at this step: nothing new to save
        return
    tmp = ckd / f".{ck.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "weights.safetensors", {k: p.detach() for k, p in params.items()})
    if ema:
        save_tensors(tmp / "ema.safetensors", ema)
    ot, ometa = optimizer_to_files(opt)
    save_tensors(tmp / "optimizer.safetensors", ot or {"_empty": torch.zeros(1)})
    write_json(tmp / "state.json", {"step": step, "optimizer": ometa, **(extra or {})})
    shutil.rmtree(ck, ignore_errors=True)
    tmp.rename(ck)
    write_json(ckd / "latest.json", {"step": step, "path": ck.name})
    for old in sorted(ckd.glob("step-*"))[:-2]:  # keep the newest two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, params: dict, opt, ema: dict | None = None) -> tuple[int, dict]:
    latest = _checkpoint_dir(work) / "latest.json"
    if not latest.is_file():
        return 0, {}
    info = json.loads(latest.read_text())
    ck = _checkpoint_dir(work) / info["path"]
    state = json.loads((ck / "state.json").read_text())
    w = load_tensors(ck / "weights.safetensors")
    missing = set(params) - set(w)
    if missing:
        raise InputError(f"checkpoint lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]}); "
                         "was it made with another zoo version?", path=ck)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(w[k])
        if ema:
            e = load_tensors(ck / "ema.safetensors")
            for k in ema:
                ema[k].copy_(e[k])
    ot = {k: v for k, v in load_tensors(ck / "optimizer.safetensors").items() if k != "_empty"}
    opt.load_state_dict(optimizer_from_files(ot, state["optimizer"]))
    return int(state["step"]), state


def train(name: str, work: Path, modules: dict[str, torch.nn.Module], cfg: LoopConfig,
          loss_fn: Callable[[int], tuple[torch.Tensor, dict]], *, seed: int, resume: bool = True,
          evaluate: Callable[[], dict] | None = None, eval_every: int = 0, console=None) -> list[dict]:
    """Run `cfg.steps` optimizer steps of `loss_fn(step)` over the trainable parameters of `modules`.

    Returns the loss log (one record per `log_every` steps, plus evaluations)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    work.mkdir(parents=True, exist_ok=True)
    params = _named_trainable(modules)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: p.detach().clone() for k, p in params.items()} if cfg.ema > 0 else None
    start, state = load_checkpoint(work, params, opt, ema) if resume else (0, {})
    log = work / "log.jsonl"
    if start and log.exists():  # drop lines past the checkpoint: a resumed log has no duplicates
        write_jsonl(log, [strip_meta(r) for r in read_jsonl(log, tolerate_torn_tail=True) if r["step"] <= start])
    elif log.exists():
        log.unlink()
    for m in modules.values():
        m.train()
    t0 = time.perf_counter()
    # the losses since the last log line: a checkpoint between two log lines carries them
    window: list[float] = list(state.get("window", []))
    cols = [TextColumn(f"[bold]pretrain {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=True) as prog:
        bar = prog.add_task(name, total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
            loss, parts = loss_fn(step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"pretrain {name}: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for k, p in params.items():
                        ema[k].lerp_(p.detach(), 1.0 - cfg.ema)
            window.append(loss.item())
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": sum(window) / len(window), "lr": opt.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - t0, 2), **{k: float(v) for k, v in parts.items()}}
                window = []
                if evaluate is not None and eval_every and (done % eval_every == 0 or done == cfg.steps):
                    for m in modules.values():
                        m.eval()
                    with swapped(params, ema):
                        rec.update(evaluate())
                    for m in modules.values():
                        m.train()
                append_jsonl(log, rec)
                prog.update(bar, info=f"loss {rec['loss']:.4f}")
            prog.advance(bar)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save_checkpoint(work, done, params, opt, {"window": window}, ema=ema)
    for m in modules.values():
        m.eval()
    save_checkpoint(work, cfg.steps, params, opt, {"finished": True}, ema=ema)
    if ema is not None:  # what ships is the EMA
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ema[k])
    return read_jsonl(log, tolerate_torn_tail=True) if log.exists() else []


@contextlib.contextmanager
def swapped(params: dict, ema: dict | None):
    """The EMA weights in place of the trained ones for the duration (nothing without an EMA)."""
    if ema is None:
        yield
        return
    stash = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(stash[k])

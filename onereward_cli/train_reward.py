"""`onereward train-reward`: fine-tune the VLM judge with eq. 3 and report Table 1 accuracy.

Every training pair (x_w, x_l, q) contributes both orders: "yes" for (x_w, x_l, q) and "no" for
(x_l, x_w, q), as one-token cross-entropy over the full vocabulary (`reward.eq3_loss`). The two
orders share one ViT pass. Full fine-tuning or LoRA (language model only), ViT and merger frozen or
trained, accelerate for mixed precision / gradient accumulation / multi-GPU (DDP; FSDP and ZeRO via
the configs in recipes/accelerate/).

OUT/
  accuracy_baseline.{json,png}  the untuned model on the test split (Table 1, first row)
  accuracy.{json,png}           after training
  eval_history.jsonl            periodic test-split evaluations
  checkpoints/step-NNNNNNNN/    resumable: trainable.safetensors, optimizer.safetensors + .json,
                                rng_<rank>.safetensors + .json, state.json (written last)
  logs/                         TensorBoard
  final/                        save_pretrained model (LoRA merged) + processor + onereward_reward.json
  run.json

Batch semantics: reward.batch_size pairs per process per micro-step; the effective batch is
batch_size x grad_accum x processes pairs (2x that many sequences, one per order).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from .checkpointing import (check_fingerprint, make_scheduler, optimizer_from_files, optimizer_to_files,
                            rng_from_files, rng_to_files)
from .errors import InputError, TrainingAborted
from .reward import (REWARD_META, ImageCache, RewardScorer, accuracy_report, accuracy_table, build_query,
                     eq3_loss, load_pairs, pair_batch_inputs, save_accuracy, score_pairs, yes_no_logprobs)

# Keys that may change between a run and its --resume (they do not change the math done so far).
_RESUMABLE_KEYS = {"max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every", "max_nonfinite"}
CKPT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def find_pairs_files(pairs_dir) -> tuple[Path, Path | None]:
    """train.jsonl (required) and test.jsonl (optional) in PAIRS_DIR or PAIRS_DIR/pairs."""
    d = Path(pairs_dir)
    if d.is_file() and d.name.endswith(".jsonl"):
        d = d.parent
    for cand in (d, d / "pairs"):
        if (cand / "train.jsonl").is_file():
            test = cand / "test.jsonl"
            return cand / "train.jsonl", test if test.is_file() else None
    raise InputError("no train.jsonl here or in its pairs/ folder (make one with `onereward export-pairs`)",
                     path=d)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(r, train_path: Path, world: int) -> dict:
    """What a checkpoint must agree with to be resumed."""
    from .recipe import to_plain

    reward = {k: v for k, v in to_plain(r.reward).items() if k not in _RESUMABLE_KEYS}
    if reward.get("train_embeddings") is True:
        del reward["train_embeddings"]  # the default: checkpoints from before the key (0.2.x) still resume
    return {"models.reward": r.models.reward, "seed": r.seed, "dtype": r.dtype, "tasks": to_plain(r.tasks),
            "reward": reward, "train_sha256": _sha256(train_path), "processes": world}


def _check_fingerprint(saved: dict, now: dict, ckpt: Path):
    check_fingerprint(saved, now, ckpt, ["reward." + k for k in _RESUMABLE_KEYS])


# ----------------------------------------------------------------------------------------------
# Model setup
# ----------------------------------------------------------------------------------------------
def _lora_target_regex(targets) -> str:
    # Full-match regex over module names: only the language model's projections. The ViT has
    # gate_proj/up_proj/down_proj too, and those stay frozen unless reward.train_vision is set.
    return r".*language_model.*\.(" + "|".join(sorted(set(targets))) + r")"


def setup_trainable(model, w):
    """Apply LoRA or unfreeze the LLM; then the ViT/merger flags. Returns the (maybe PEFT) model."""
    from .models.qwen_vl import unwrap

    model.requires_grad_(False)
    if w.lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=w.lora_rank, lora_alpha=w.lora_alpha, lora_dropout=w.lora_dropout,
                         target_modules=_lora_target_regex(w.lora_targets), bias="none")
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:  # no module matched the targets
            raise InputError(f"LoRA: {str(e).splitlines()[0]}", field="reward.lora_targets") from None
    else:
        base = unwrap(model)
        base.model.language_model.requires_grad_(True)
        base.lm_head.requires_grad_(True)
        if not w.train_embeddings:  # tied or untied, both vocabulary matrices stay as loaded
            base.get_input_embeddings().requires_grad_(False)
            base.lm_head.requires_grad_(False)
    visual = unwrap(model).model.visual
    visual.requires_grad_(w.train_vision)
    visual.merger.requires_grad_(w.train_merger)
    # fp32 master weights for everything trained (a no-op in a float32 recipe; peft already keeps LoRA
    # in fp32): AdamW's ~lr steps would round away in bf16 weights. The forward runs under autocast.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if w.gradient_checkpointing:
        base = unwrap(model)
        fn = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        fn()
    model.train()
    return model


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON; nothing pickled)
# ----------------------------------------------------------------------------------------------
def list_checkpoints(out: Path) -> list[Path]:
    d = out / CKPT_DIR
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------
def batch_indices(n: int, seed: int, epoch: int, k: int, batch: int, world: int, rank: int) -> list[int]:
    """Indices of micro-batch k of `epoch` for `rank`: a seeded permutation per epoch, global batches
    of batch*world split by rank; the last batch wraps around so every process gets a full one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    start = k * batch * world + rank * batch
    return [perm[(start + j) % n] for j in range(batch)]


# ----------------------------------------------------------------------------------------------
# Evaluation across processes
# ----------------------------------------------------------------------------------------------
def evaluate(accelerator, scorer, pairs, r, *, progress=None) -> dict | None:
    """Table 1 report on `pairs`, each process scoring an equal-length shard (same number of
    forwards everywhere, as DDP/FSDP collectives need), gathered on every process."""
    from accelerate.utils import gather_object

    if not pairs:
        return None
    w = r.reward
    world, rank = accelerator.num_processes, accelerator.process_index
    per = math.ceil(len(pairs) / world)
    mine = [rank + world * i for i in range(per)]
    shard = [pairs[i] if i < len(pairs) else pairs[0] for i in mine]
    was_training = scorer.model.training
    scorer.model.eval()
    probs = score_pairs(scorer, shard, r.tasks, w.query_mode, bold=w.bold, batch_size=w.batch_size,
                        progress=progress)
    if was_training:
        scorer.model.train()
    rows = [(i, p) for i, p in zip(mine, probs) if i < len(pairs)]
    if world > 1:
        rows = gather_object(rows)
    rows = sorted(rows)
    return accuracy_report(pairs, [p for _, p in rows], r.tasks, mode=w.query_mode, normalise=scorer.normalise)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(r, pairs_dir, out, *, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from rich.console import Console

    from .artifacts import (RunManifest, discard_folder, load_tensors, read_jsonl, remove_stale_temps, save_tensors,
                            write_json, write_jsonl)

    w = r.reward
    out = Path(out)
    console = Console()
    if r.dtype == "float16":
        raise InputError("training in float16 needs loss scaling, which train-reward does not implement: use "
                         "bfloat16 or float32 (with reward.mixed_precision: bf16)", field="dtype")

    # -- validate everything before anything is written ---------------------------------------
    train_path, test_path = find_pairs_files(pairs_dir)
    train = load_pairs(train_path, r.tasks)
    test = load_pairs(test_path, r.tasks) if test_path else []
    if not train:
        raise InputError("no training pairs", path=train_path)
    queries = [build_query(r.tasks[p["task"]], p["dimension"], p["prompt"], w.query_mode, w.bold) for p in train]
    checkpoints = list_checkpoints(out) if resume else []
    if not resume and out.exists() and any(out.iterdir()):
        raise InputError("output directory is not empty: pass --resume to continue that run, or choose "
                         "another --out", path=out)

    accelerator = Accelerator(cpu=(r.device == "cpu"), mixed_precision=w.mixed_precision,
                              gradient_accumulation_steps=w.grad_accum)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and w.lora:
        raise InputError("LoRA training runs under DDP (recipes/accelerate/ddp.yaml); FSDP/DeepSpeed are for "
                         "full fine-tuning", field="reward.lora")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No dataloader goes through prepare(), so DeepSpeed cannot infer these itself.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = w.batch_size
        ds["gradient_accumulation_steps"] = w.grad_accum
        ds["gradient_clipping"] = w.max_grad_norm
    fingerprint = _fingerprint(r, train_path, world)
    ckpt = checkpoints[-1] if checkpoints else None
    state = None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        _check_fingerprint(state["fingerprint"], fingerprint, ckpt)

    manifest = RunManifest("train-reward", out, r, inputs={"train": train_path, "test": test_path or ""})
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    with manifest.timed("load"):
        scorer = RewardScorer.load(r.models.reward, w, device=accelerator.device, dtype=r.dtype, trainable=True)
    processor = scorer.processor
    # LoRA starts as an exact no-op (B = 0) and freezing changes no output, so the baseline
    # evaluation below still measures the untuned model.
    model = setup_trainable(scorer.model, w)
    if scorer.model_dtype == torch.bfloat16 or w.mixed_precision == "bf16":
        scorer.autocast_dtype = torch.bfloat16  # fp32 masters next to bf16 frozen weights, baseline eval too
    named = trainable_named(model)
    if not named:
        raise InputError("nothing to train: enable LoRA, full fine-tuning, train_vision or train_merger",
                         field="reward")
    from .models.qwen_vl import Judge

    scorer.model, scorer.judge = model, Judge(model)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        # run.json marks a finished run: a resumed one is not finished until it writes its own, last
        (out / "run.json").unlink(missing_ok=True)
        if world == 1:  # temp files and half-assembled checkpoints of a killed run
            remove_stale_temps(out)
    accelerator.wait_for_everyone()

    def progress_bar():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not main, console=Console(stderr=True), transient=False)

    def run_eval(label: str):
        with progress_bar() as bar:
            t = bar.add_task(label, total=math.ceil(len(test) / world), info="")
            return evaluate(accelerator, scorer, test, r, progress=lambda n: bar.advance(t, n))

    # -- baseline (Table 1, "no finetune" row) -----------------------------------------------
    baseline = None
    base_file = out / "accuracy_baseline.json"
    if test:
        if base_file.is_file():
            baseline = json.loads(base_file.read_text())
        else:
            with manifest.timed("eval_baseline"):
                baseline = run_eval("baseline eval")
            if main:
                save_accuracy(baseline, out, "accuracy_baseline")
        if main:
            console.print(accuracy_table(baseline, title=f"Before training ({len(test)} test pairs, "
                                                         f"query {w.query_mode}, P(yes) {w.normalise})"))

    # -- trainable model, optimizer, schedule --------------------------------------------------
    optimizer = torch.optim.AdamW([p for _, p in named], lr=w.lr, weight_decay=w.weight_decay)
    scheduler = make_scheduler(optimizer, w.warmup_steps)
    micro = 0
    if state is not None and not sharded:
        weights = load_tensors(ckpt / "trainable.safetensors", device=str(accelerator.device))
        missing = [n for n, _ in named if n not in weights]
        if missing:
            raise InputError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})", path=ckpt)
        with torch.no_grad():
            for n, p in named:
                p.copy_(weights[n])
        optimizer.load_state_dict(optimizer_from_files(load_tensors(ckpt / "optimizer.safetensors"),
                                                       json.loads((ckpt / "optimizer.json").read_text())))
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
        micro = state["micro"]

    judge, optimizer = accelerator.prepare(scorer.judge, optimizer)
    scorer.judge = judge
    if state is not None:
        if sharded:
            accelerator.load_state(str(ckpt / "accelerate"))
        if state.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        rng_file = ckpt / f"rng_{rank}.safetensors"
        if rng_file.is_file():
            rng_from_files(load_tensors(rng_file), json.loads((ckpt / f"rng_{rank}.json").read_text()))

    per_epoch = math.ceil(len(train) / (w.batch_size * world))
    total_steps = w.max_steps or math.ceil(w.epochs * per_epoch / w.grad_accum)
    step = micro // w.grad_accum
    start_step = step
    params = [p for _, p in named]

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "logs"), purge_step=step if state is not None else None)
    history_path = out / "eval_history.jsonl"
    kept = []
    if main and history_path.is_file():  # drop evaluations made after the checkpoint we resume from
        kept = [{k: v for k, v in h.items() if not k.startswith("_")}
                for h in read_jsonl(history_path, tolerate_torn_tail=True) if h.get("step", 0) <= step]
        write_jsonl(history_path, kept)

    def log_eval(report, at_step, final=False):
        if not main or report is None:
            return
        if final and any(h.get("final") and h.get("step") == at_step for h in kept):
            return  # a resume of a finished run: its final evaluation is in the history already
        from .artifacts import append_jsonl

        append_jsonl(history_path, {"step": at_step, "overall": report["overall"],
                                    "cells": {f"{c['task']}/{c['dimension']}": c["accuracy"] for c in report["cells"]},
                                    **({"final": True} if final else {})})
        writer.add_scalar("eval/accuracy", report["overall"]["accuracy"], at_step)
        writer.add_scalar("eval/symmetric_accuracy", report["overall"]["symmetric_accuracy"], at_step)
        writer.add_scalar("eval/position_bias", report["overall"]["position_bias"], at_step)
        for c in report["cells"]:
            writer.add_scalar(f"eval_accuracy/{c['task']}/{c['dimension']}", c["accuracy"], at_step)

    def save_checkpoint(at_step: int):
        ckdir = out / CKPT_DIR
        tmp = ckdir / f".step-{at_step:08d}.tmp"
        final = ckdir / f"step-{at_step:08d}"
        # A complete checkpoint of this step (its state.json, written last, is there) holds exactly this
        # state: keep it. Replacing it would leave, between its deletion and the rename, no checkpoint of
        # this step (a kill there resumes from an older one, or from none) or a half-deleted one that
        # still looks complete. Every rank sees the same answer: nothing renames before the barriers below.
        if (final / "state.json").is_file():
            return
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if sharded:  # FSDP / ZeRO shards: accelerate's own format (note: loads with weights_only)
            accelerator.save_state(str(tmp / "accelerate"))
        elif main:
            save_tensors(tmp / "trainable.safetensors", {n: p for n, p in trainable_named(model)})
            tensors, meta = optimizer_to_files(optimizer)
            save_tensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
        rt, rm = rng_to_files()
        save_tensors(tmp / f"rng_{rank}.safetensors", rt)
        write_json(tmp / f"rng_{rank}.json", rm)
        accelerator.wait_for_everyone()
        if main:
            write_json(tmp / "state.json", {
                "step": at_step, "micro": micro, "epoch": micro // per_epoch, "loss": last_loss,
                "nonfinite": nonfinite,
                "fingerprint": fingerprint,
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            discard_folder(final)  # a folder without state.json: never a checkpoint
            tmp.rename(final)
            for old in list_checkpoints(out)[:-w.keep_checkpoints]:
                discard_folder(old)  # renamed away first: a kill never leaves it half-deleted
        accelerator.wait_for_everyone()

    # -- train ---------------------------------------------------------------------------------
    images = ImageCache()
    loss_acc, n_acc = 0.0, 0
    last_loss = state.get("loss") if state is not None else None
    nonfinite = state.get("nonfinite", 0) if state is not None else 0
    stepped = False  # did this accumulation window update the weights (not every micro-batch was NaN)?
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("train-reward", total=total_steps, completed=step, info="")
        while step < total_steps:
            epoch, k = divmod(micro, per_epoch)
            idx = batch_indices(len(train), r.seed, epoch, k, w.batch_size, world, rank)
            chunk = [train[i] for i in idx]
            with accelerator.accumulate(judge):
                tensors, seqs = pair_batch_inputs(chunk, [queries[i] for i in idx], images)
                lp = yes_no_logprobs(scorer.logits(tensors, seqs), scorer.yes_id, scorer.no_id)
                loss = eq3_loss(lp[0::2], lp[1::2])
                finite = _all_finite(loss, world)
                grad_norm = None
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and w.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, w.max_grad_norm)
                    optimizer.step()
                    stepped |= accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
                optimizer.zero_grad(set_to_none=True)  # at a window end: also drops a skipped window
            micro += 1
            if not finite:  # skipped, like rl: a few NaN batches are noise, many mean a diverged run
                nonfinite += 1
                console.print(f"[yellow]warning:[/] step {step + 1}: non-finite loss, batch skipped "
                              f"({nonfinite}/{w.max_nonfinite})")
                if nonfinite >= w.max_nonfinite:
                    kept_ck = list_checkpoints(out)
                    raise TrainingAborted(f"training aborted at step {step + 1}: {nonfinite} non-finite losses; "
                                          + (f"last good checkpoint {kept_ck[-1]}" if kept_ck else
                                             "no checkpoint was saved yet"), path=out, field="reward.max_nonfinite")
            else:
                loss_acc += float(loss.detach())
                n_acc += 1
            if not accelerator.sync_gradients:
                continue
            if stepped:
                scheduler.step()
            stepped = False
            step += 1
            if n_acc:
                mean_loss = torch.tensor(loss_acc / n_acc, device=accelerator.device)
                last_loss = float(accelerator.reduce(mean_loss, reduction="mean")) if world > 1 else float(mean_loss)
            loss_acc, n_acc = 0.0, 0
            if main and (step % w.log_every == 0 or step == total_steps):
                writer.add_scalar("train/loss", last_loss, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/epoch", micro / per_epoch, step)
                if grad_norm is not None:
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
            bar.update(task, completed=step, info=f"loss {last_loss:.4f}  epoch {micro / per_epoch:.2f}")
            if test and w.eval_every and step % w.eval_every == 0 and step < total_steps:
                log_eval(evaluate(accelerator, scorer, test, r), step)
            # The last step is always saved, so a finished run can be extended (--resume, more steps).
            if (w.save_every and step % w.save_every == 0) or step == total_steps:
                save_checkpoint(step)
    train_time = time.perf_counter() - t0

    # -- final evaluation, model, report -------------------------------------------------------
    final_report = None
    if test:
        with manifest.timed("eval_final"):
            final_report = run_eval("final eval")
        log_eval(final_report, step, final=True)
    final_dir = out / "final"
    unwrapped = accelerator.unwrap_model(judge).model
    full_state = accelerator.get_state_dict(judge) if sharded else None
    # DDP keeps replicas identical by averaging gradients; check it did (cheap, catches a broken sync).
    checksum = float(sum(p.detach().double().sum() for p in params)) if not sharded else 0.0
    in_sync = len({round(c, 9) for c in _gather(accelerator, checksum)}) == 1
    if main:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if sharded:
            base = scorer_base_for_save(unwrapped)
            base.save_pretrained(tmp, state_dict={k.removeprefix("model."): v for k, v in full_state.items()})
        else:
            merged = unwrapped.merge_and_unload() if w.lora else unwrapped
            merged.to(scorer.model_dtype).save_pretrained(tmp)  # the masters are saved in the model's dtype
        processor.save_pretrained(tmp)
        write_json(tmp / REWARD_META, {"base": r.models.reward, "query_mode": w.query_mode, "bold": w.bold,
                                       "normalise": w.normalise, "yes_token": w.yes_token, "no_token": w.no_token,
                                       "image_size": w.image_size, "max_pixels": scorer.image_processor.max_pixels,
                                       "steps": step, "lora_merged": w.lora})
        # The old final/ (a resumed finished run) is renamed away, never half-deleted in place; run.json,
        # the mark of a finished run, was removed when this run started and is written last.
        discard_folder(final_dir)
        tmp.rename(final_dir)
        if final_report is not None:
            save_accuracy(final_report, out, "accuracy", baseline=baseline)
            console.print(accuracy_table(final_report, title=f"After training ({step} steps)", baseline=baseline))
        writer.close()
        manifest.count(train_pairs=len(train), test_pairs=len(test), steps=step, steps_this_run=step - start_step,
                       processes=world,
                       trainable_params=sum(p.numel() for _, p in named))
        manifest.set(effective_batch_pairs=w.batch_size * w.grad_accum * world, final_loss=last_loss,
                     distributed_type=str(accelerator.distributed_type.value), replicas_in_sync=in_sync,
                     mixed_precision=accelerator.mixed_precision,
                     normalise=w.normalise, query_mode=w.query_mode, resumed_from=str(ckpt) if ckpt else None,
                     model=scorer.path, final_model=str(final_dir),
                     baseline_accuracy=baseline and baseline["overall"],
                     final_accuracy=final_report and final_report["overall"])
        manifest.data["timings_s"]["train"] = round(train_time, 3)
        manifest.write()
        console.print(f"[green]reward model[/] {final_dir}  ({step} steps, last loss "
                      f"{'n/a' if last_loss is None else format(last_loss, '.4f')})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def _all_finite(loss, world: int) -> bool:
    """Whether every rank's loss is finite: all ranks skip a batch together, or DDP's all-reduce hangs."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() == 1)


def _gather(accelerator, value) -> list:
    from accelerate.utils import gather_object

    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def scorer_base_for_save(model):
    """The HF model whose save_pretrained writes a full checkpoint from a gathered state dict."""
    from .models.qwen_vl import unwrap

    return unwrap(model)

"""`onereward rl`: multi-task reward feedback learning (paper §4.4-4.5, Alg. 1 and Alg. 2).

One iteration, per sample of the batch (Alg. 1 lines 4-13):
  task k ~ p_k, condition c ~ D_k; noises eps_1, eps_2; t ~ U{t1..t2}
  x_ref   = vae_decode(pi_ref full rollout from eps_1)                 (no grad)
  x_t     = pi_theta rollout from eps_2 down to step t                 (no grad)
  x_theta = vae_decode(x_t - sigma_t * v_theta(x_t))                   (grad: one transformer call + decode)
  J       = mean_{e in E_k} max(0, lambda - P(yes | x_theta, x_ref, q_e))   (eq. 5)
then an optimizer step on theta and pi_ema <- tau pi_ema + (1 - tau) pi_theta.
Static (Alg. 1): pi_ref is the initial model (with LoRA: the base with adapters disabled, no copy).
Dynamic (Alg. 2, --dynamic): pi_ref is the EMA model; no separate frozen reference exists.

Exact resume: every random draw of step s comes from generators seeded by (seed, s, rank), so a
checkpoint only needs weights, EMA, optimizer, scheduler and the step counter.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifacts import (RunManifest, append_jsonl, load_tensors, open_image, read_jsonl, remove_stale_temps,
                        save_tensors, write_json)
from .checkpointing import (check_fingerprint, file_sha256, make_scheduler, names_latest, optimizer_from_files,
                            optimizer_to_files)
from .errors import InputError, TrainingAborted
from .recipe import resolve_device, torch_dtype
from .sharding import Sharder, from_launch, gathered, is_dtensor, like, local, save_transformer_folder
from .tasks import TASK_KEYS, check_mask, fit_size, task_prompt
from .text_cache import TextCache, cache_root

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                "proj_mlp", "proj_out"]


# ----------------------------------------------------------------------------------------------
# Data: the task-specific condition sets D_k
# ----------------------------------------------------------------------------------------------
@dataclass
class Condition:
    id: str
    task: str
    prompt: str  # what the generator sees (fixed prompt for prompt-free tasks)
    user_prompt: str  # what the reward's text-alignment query quotes
    image: torch.Tensor  # (3, H, W) in [0, 1]
    mask: torch.Tensor  # (1, H, W) in {0, 1}


def _resolve_data_file(data: Path) -> Path:
    data = Path(data)
    if data.is_dir():
        for name in ("candidates.jsonl", "triplets.jsonl", "benchmark.jsonl"):
            if (data / name).exists():
                return data / name
        raise InputError("folder holds no candidates.jsonl (run `onereward generate` first) or triplets.jsonl",
                         path=data)
    return data


def load_conditions(recipe, data) -> list[Condition]:
    """Read a generate output (candidates.jsonl) or a JSONL of triplets (id, source, mask, prompt, task)."""
    from PIL import Image
    import numpy as np

    f = _resolve_data_file(data)
    schema = {"id": ((str, int), True), "task": (str, True), "source": (str, True), "mask": (str, True),
              "prompt": (str, False), "user_prompt": (str, False)}
    recs = read_jsonl(f, schema)
    if not recs:
        raise InputError("no conditions", path=f)
    res = recipe.rl.resolution
    seen, out = set(), []
    for rec in recs:
        line = rec["_line"]
        sid = str(rec["id"])
        if sid in seen:
            raise InputError(f"duplicate sample id '{sid}'", path=f, line=line, field="id")
        seen.add(sid)
        task = rec["task"]
        if task not in TASK_KEYS:
            raise InputError(f"unknown task '{task}'", path=f, line=line, field="task")
        if task not in recipe.tasks:
            continue  # the recipe does not train this task
        user_prompt = rec.get("user_prompt", rec.get("prompt")) or ""
        tcfg = recipe.tasks[task]
        if tcfg.fixed_prompt is None and not user_prompt.strip():
            raise InputError(f"task '{task}' needs a prompt", path=f, line=line, field="prompt")
        img = open_image(f.parent / rec["source"], where=f, line=line, field="source")
        msk = open_image(f.parent / rec["mask"], mode="L", where=f, line=line, field="mask")
        if msk.size != img.size:
            raise InputError(f"mask is {msk.size[0]}x{msk.size[1]}, image is {img.size[0]}x{img.size[1]}",
                             path=f, line=line, field="mask")
        size = fit_size(*img.size, res)  # about res**2 pixels at the condition's own aspect ratio (as generate)
        m = np.asarray(msk.resize(size, Image.NEAREST)) >= 128
        check_mask(m.astype(np.uint8), task, path=f, line=line)
        x = torch.from_numpy(np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0)
        out.append(Condition(sid, task, task_prompt(tcfg, user_prompt), user_prompt if tcfg.fixed_prompt is None else "",
                             x.permute(2, 0, 1).contiguous(), torch.from_numpy(m.astype(np.float32))[None]))
    if not out:
        raise InputError("no condition belongs to a task of the recipe", path=f)
    return out


def task_distribution(recipe, by_task: dict[str, list[int]]):
    """p_k over the tasks that have data, renormalised (a task without data cannot be sampled)."""
    keys = [k for k, t in recipe.tasks.items() if t.probability > 0 and by_task.get(k)]
    if not keys:
        raise InputError("no condition belongs to a task with positive probability", field="tasks")
    z = sum(recipe.tasks[k].probability for k in keys)
    return keys, [recipe.tasks[k].probability / z for k in keys]


def step_rng(seed: int, step: int, rank: int = 0) -> tuple[random.Random, torch.Generator]:
    """All randomness of one step derives from (seed, step, rank): resume needs no RNG state."""
    s = (seed * 1_000_003 + step * 9_176 + rank * 7_919_111) % (2**63 - 1)
    return random.Random(s), torch.Generator().manual_seed(s)


def sample_batch(recipe, conds, by_task, step: int, rank: int = 0, one_shape: bool = False):
    """Alg. 1 lines 4-6: tasks by p_k, conditions uniformly within D_k, a stop step t in [t1, t2].

    one_shape (FSDP): every rank's batch has the same image shape and the same t, so every rank calls the
    sharded blocks equally often (each call is a collective). The step's shape is that of one condition
    drawn as usual by a rank-independent generator; each sample is then drawn from the conditions of that
    shape with their usual weights p_k / |D_k|. Over steps every sample still has the unconditional
    distribution: P(c) = P(shape of c) * P(c | shape)."""
    rng, gen = step_rng(recipe.seed, step, rank)
    keys, probs = task_distribution(recipe, by_task)
    if one_shape:
        shared, _ = step_rng(recipe.seed, step, 0)
        k = shared.choices(keys, weights=probs, k=1)[0]
        shape = tuple(conds[shared.choice(by_task[k])].image.shape)
        pool = [i for key in keys for i in by_task[key] if tuple(conds[i].image.shape) == shape]
        weight = {key: p / len(by_task[key]) for key, p in zip(keys, probs)}
        idx = rng.choices(pool, weights=[weight[conds[i].task] for i in pool], k=recipe.rl.batch_size)
        return idx, shared.randint(recipe.rl.t1, recipe.rl.t2), gen
    idx = []
    for _ in range(recipe.rl.batch_size):
        k = rng.choices(keys, weights=probs, k=1)[0]
        idx.append(rng.choice(by_task[k]))
    t = rng.randint(recipe.rl.t1, recipe.rl.t2)
    return idx, t, gen


# ----------------------------------------------------------------------------------------------
# Loss (eq. 5) and EMA
# ----------------------------------------------------------------------------------------------
def refl_loss(p_yes: list[torch.Tensor], lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 5 averaged over each sample's dimensions (Alg. 1 line 13), then over the batch."""
    per_sample = [F.relu(lam - p).mean() for p in p_yes]
    return torch.stack(per_sample).mean(), per_sample


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], tau: float):
    """pi_ema <- tau * pi_ema + (1 - tau) * pi_theta (Alg. 1 line 14)."""
    for k, p in params.items():
        ema[k].mul_(tau).add_(p.detach().to(ema[k].dtype), alpha=1.0 - tau)


# ----------------------------------------------------------------------------------------------
# The policy: LoRA adapters (default) or the full transformer
# ----------------------------------------------------------------------------------------------
class Policy:
    """Owns the trainable transformer, its EMA and the reference rollout weights.

    LoRA: reference = the same transformer with adapters disabled (static) or with the EMA adapter
    weights swapped in (dynamic); the EMA covers only adapter weights. Full: the reference is a frozen
    copy (static) or the EMA copy itself (dynamic).
    """

    def __init__(self, transformer, rl_cfg, dynamic: bool, seed: int = 0, shard=None):
        self.cfg, self.dynamic = rl_cfg, dynamic
        self.transformer = transformer
        self.lora = rl_cfg.lora
        if self.lora:
            from peft import LoraConfig

            present = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()}
            names = [t for t in LORA_TARGETS if t.split(".")[-1] in present or "." in t]
            transformer.requires_grad_(False)
            with torch.random.fork_rng(devices=[]):  # the adapter init is a function of the recipe seed
                torch.manual_seed(seed)
                transformer.add_adapter(LoraConfig(r=rl_cfg.lora_rank, lora_alpha=rl_cfg.lora_alpha,
                                                   init_lora_weights="gaussian", target_modules=names))
        else:
            transformer.requires_grad_(True)
        self.reference = None
        if not self.lora and not dynamic:  # copied before the upcast: the frozen reference stays in `dtype`
            self.reference = copy.deepcopy(transformer).requires_grad_(False).eval()
            if shard is not None:
                shard(self.reference)
        # fp32 master weights: AdamW's steps (~lr) are below half a bf16 ulp for most weights and would be
        # rounded away. The forward runs under autocast in the recipe's dtype (Trainer.autocast).
        if shard is not None:  # FSDP2: upcast block by block as each is sharded (sharding.Sharder)
            shard(transformer, upcast=True)
        else:
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        # Under FSDP these are DTensors (this rank's shard); the EMA clones them and is sharded alike.
        self.trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.ema = {n: p.detach().clone().float() for n, p in self.trainable.items()}

    @contextlib.contextmanager
    def reference_transformer(self):
        """Yield the transformer that plays pi_ref for this step."""
        if self.lora and not self.dynamic:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
        elif self.dynamic:
            with self.swapped_in_ema():
                yield self.transformer
        else:
            yield self.reference

    @contextlib.contextmanager
    def swapped_in_ema(self):
        """Temporarily load the EMA weights into the trainable parameters (no extra model copy)."""
        with self.swapped_in(self.ema):
            yield

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights, placed like them (the early-stopping candidate)."""
        return {n: p.detach().clone().float() for n, p in self.trainable.items()}

    @contextlib.contextmanager
    def swapped_in(self, weights: dict[str, torch.Tensor]):
        """Temporarily load `weights` (EMA or a snapshot) into the trainable parameters."""
        stash = {n: p.detach().clone() for n, p in self.trainable.items()}
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(weights[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(stash[n])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable weights (under FSDP: this rank's shards)."""
        return {n: local(p.detach()) for n, p in self.trainable.items()}

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        return {n: local(e) for n, e in self.ema.items()}

    def load_state_tensors(self, params: dict, ema: dict):
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(like(params[n], p))
                self.ema[n].copy_(like(ema[n], self.ema[n]))


# ----------------------------------------------------------------------------------------------
# Saving outputs FluxFillPipeline can load directly
# ----------------------------------------------------------------------------------------------
def policy_settings(recipe) -> dict:
    """The inference settings the policy was trained with, for onereward_policy.json (eval/generate
    default to them)."""
    from .models.flux_fill import inference_record

    q = recipe.rl
    return inference_record(q.rollout_steps, q.guidance, q.true_cfg, q.negative_prompt, q.resolution,
                            {k: t.fixed_prompt for k, t in recipe.tasks.items() if t.fixed_prompt is not None})


def lora_metadata(transformer) -> dict:
    """The trained adapter's peft LoraConfig as a dict (what diffusers' training scripts save)."""
    return transformer.peft_config["default"].to_dict()


@contextlib.contextmanager
def stored_in(module, dtype):
    """Temporarily hold every floating parameter in `dtype` (to save fp32 masters in the model's dtype)."""
    stash = {}
    for p in module.parameters():
        if p.dtype != dtype and p.is_floating_point():
            stash[p] = p.data
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in stash.items():
            p.data = data


def save_policy_dir(pipe_cls, transformer, out_dir: Path, base: str, lora: bool, extra: dict | None = None,
                    dtype=None, state: dict | None = None):
    """`state`: the full transformer weights gathered from FSDP shards (written instead of the module's own)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora:
        from peft.utils import get_peft_model_state_dict

        # The adapter config (rank, alpha, targets) goes into the safetensors header: without it
        # load_lora_weights assumes alpha = rank and reloads a different function.
        pipe_cls.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=lora_metadata(transformer),
                                   safe_serialization=True)
    elif state is not None:
        save_transformer_folder(transformer, state, tmp)
    else:
        with stored_in(transformer, dtype) if dtype is not None else contextlib.nullcontext():
            transformer.save_pretrained(tmp, safe_serialization=True)
    write_json(tmp / "onereward_policy.json", {"base": base, "kind": "lora" if lora else "transformer", **(extra or {})})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest; nothing pickled
# ----------------------------------------------------------------------------------------------
# Keys a --resume may change: they decide how long to run and what to log, not the math done so far.
_RESUMABLE_KEYS = ("steps", "save_every", "eval_every", "heldout_n", "log_every", "max_nonfinite")


def run_fingerprint(recipe, data_file: Path, reward_spec: str, dynamic: bool, world: int, fsdp: bool = False) -> dict:
    """What a checkpoint must agree with to be resumed (stored in its state.json)."""
    from .recipe import to_plain

    w = recipe.reward  # the scorer's query and P(yes) settings shape the reward
    return {"models.policy": recipe.models.policy, "reward_model": reward_spec, "dynamic": dynamic,
            "seed": recipe.seed, "dtype": recipe.dtype, "tasks": to_plain(recipe.tasks),
            "rl": {k: v for k, v in to_plain(recipe.rl).items() if k not in _RESUMABLE_KEYS},
            "reward": {k: getattr(w, k) for k in ("query_mode", "bold", "normalise", "yes_token", "no_token",
                                                  "image_size")},
            "data_sha256": file_sha256(data_file), "processes": world, **({"fsdp": True} if fsdp else {})}


def check_resume(out: Path, fingerprint: dict):
    """--resume: the checkpoint must exist and have been trained with the same settings."""
    latest = out / "checkpoints" / "latest.json"
    if not latest.is_file():
        raise InputError("--resume: no checkpoint here (run without --resume to start)", path=out)
    try:
        ck = out / "checkpoints" / json.loads(latest.read_text())["path"]
        state = json.loads((ck / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: unreadable checkpoint ({e.__class__.__name__})", path=latest) from None
    if "fingerprint" in state:  # checkpoints written before 0.2 carry none
        check_fingerprint(state["fingerprint"], fingerprint, ck, ["rl." + k for k in _RESUMABLE_KEYS])


def _barrier(dist):
    if dist is not None:
        torch.distributed.barrier()


def _suffix(dist) -> str:
    return "" if dist is None else f".rank{dist[0]:02d}"


def save_checkpoint(out: Path, step: int, policy: Policy, opt, sched, counters: dict, fingerprint=None, dist=None,
                    best: dict | None = None):
    """dist = (rank, world) under FSDP: every rank calls this and writes its own shards (policy.rank00...,
    nothing gathered); rank 0 then publishes the folder. Without FSDP only the main process calls it.
    best: rl.keep_best's snapshot so far (its step and score are in counters)."""
    ck = out / "checkpoints" / f"step-{step:06d}"
    if names_latest(ck.parent, ck.name):  # resumed at this step: nothing new to save
        return ck
    tmp = ck.with_name(f".{ck.name}.tmp")
    rank = 0 if dist is None else dist[0]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist)
    sfx = _suffix(dist)
    save_tensors(tmp / f"policy{sfx}.safetensors", policy.state_tensors())
    save_tensors(tmp / f"ema{sfx}.safetensors", policy.ema_tensors())
    if best is not None:
        save_tensors(tmp / f"best{sfx}.safetensors", {n: local(t) for n, t in best.items()})
    ot, ometa = optimizer_to_files(opt)
    ot = {k: local(v) for k, v in ot.items()}
    save_tensors(tmp / f"optimizer{sfx}.safetensors", ot or {"_empty": torch.zeros(1)})
    save_tensors(tmp / f"rng{sfx}.safetensors", {"torch": torch.get_rng_state()})
    _barrier(dist)  # every shard is on disk before the folder is published
    if rank == 0:
        write_json(tmp / "state.json", {"step": step, "optimizer": ometa, "scheduler": sched.state_dict(),
                                        "lr_schedule": lr_record(policy.cfg), "counters": counters,
                                        "fingerprint": fingerprint, "shards": None if dist is None else dist[1]})
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)
        write_json(out / "checkpoints" / "latest.json", {"step": step, "path": ck.name})
    _barrier(dist)
    return ck


def lr_record(cfg) -> dict:
    return {"lr_warmup": cfg.lr_warmup, "lr_schedule": cfg.lr_schedule, "steps": cfg.steps}


def check_lr_record(saved: dict | None, now: dict, ck: Path):
    """Resuming under another schedule would not continue the same run: refuse it. More rl.steps
    is how a run is extended; with a decaying schedule that stretches the rest of the decay."""
    if saved is None:  # checkpoints from before the schedule keys: the old constant lr
        saved = {"lr_warmup": 0, "lr_schedule": "constant"}
    for k in ("lr_warmup", "lr_schedule"):
        if saved[k] != now[k]:
            raise InputError(f"cannot resume: the checkpoint was trained with {saved[k]!r}, the recipe says "
                             f"{now[k]!r}", path=ck, field=f"rl.{k}")
    if now["lr_schedule"] != "constant" and saved.get("steps", now["steps"]) != now["steps"]:
        import warnings

        warnings.warn(f"{ck}: rl.steps changed from {saved['steps']} to {now['steps']}: the {now['lr_schedule']} "
                      "decay is stretched over the new total from here on", UserWarning, stacklevel=3)


def load_best(out: Path, policy: Policy, dist=None) -> dict[str, torch.Tensor]:
    """rl.keep_best's snapshot from the latest checkpoint, placed like the trainable weights."""
    info = json.loads((out / "checkpoints" / "latest.json").read_text())
    f = out / "checkpoints" / info["path"] / f"best{_suffix(dist)}.safetensors"
    if not f.is_file():
        raise InputError("--resume: the checkpoint has no best.safetensors (rl.keep_best was off when it was "
                         "written)", path=f, field="rl.keep_best")
    saved = load_tensors(f)
    snap = policy.snapshot()
    with torch.no_grad():
        for n, t in snap.items():
            t.copy_(like(saved[n], t))
    return snap


def load_checkpoint(out: Path, policy: Policy, opt, sched, dist=None) -> tuple[int, dict]:
    latest = out / "checkpoints" / "latest.json"
    if not latest.exists():
        raise InputError("--resume: no checkpoint found", path=out / "checkpoints")
    info = json.loads(latest.read_text())
    ck = out / "checkpoints" / info["path"]
    state = json.loads((ck / "state.json").read_text())
    check_lr_record(state.get("lr_schedule"), lr_record(policy.cfg), ck)
    sfx = _suffix(dist)
    policy.load_state_tensors(load_tensors(ck / f"policy{sfx}.safetensors"), load_tensors(ck / f"ema{sfx}.safetensors"))
    ot = {k: v for k, v in load_tensors(ck / f"optimizer{sfx}.safetensors").items() if k != "_empty"}
    osd = optimizer_from_files(ot, state["optimizer"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, st in osd["state"].items():  # FSDP: AdamW's moments are shards placed like their parameter
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and is_dtensor(params[pid]):
                st[k] = like(v, params[pid])
    opt.load_state_dict(osd)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_tensors(ck / f"rng{sfx}.safetensors")["torch"])
    return int(state["step"]), state.get("counters", {})


# ----------------------------------------------------------------------------------------------
# Plot (paper Fig. 4)
# ----------------------------------------------------------------------------------------------
TASK_COLOURS = {"fill": "tab:blue", "extend": "tab:green", "extend_no_prompt": "tab:olive", "removal": "tab:orange"}


def plot_reward_curves(log_path: Path, png: Path, window: int = 5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_jsonl(log_path, tolerate_torn_tail=True)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in recs:
        for key, v in r.get("rewards", {}).items():
            task, dim = key.split("/", 1)
            series.setdefault((task, dim), []).append((r["step"], v))
    if not series:
        return None
    dims = sorted({d for _, d in series})
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 2.8), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        for (task, d), pts in sorted(series.items()):
            if d != dim:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            sm = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, color=TASK_COLOURS.get(task, None), label=task)
        ax.set_title(dim, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("P(yes | policy, ref)", fontsize=8)
    fig.tight_layout()
    from .artifacts import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
def shape_buckets(conds, idx) -> list[list[int]]:
    """idx split by image size, buckets in order of first appearance (a batch must share one size)."""
    buckets: dict[tuple, list[int]] = {}
    for i in idx:
        buckets.setdefault(tuple(conds[i].image.shape), []).append(i)
    return list(buckets.values())


def stack_conditions(conds, idx, device, dtype):
    images = torch.stack([conds[i].image for i in idx]).to(device, dtype)
    masks = torch.stack([conds[i].mask for i in idx]).to(device, dtype)
    return images, masks


class Trainer:
    """Holds everything one RL run needs; `step()` is Alg. 1 lines 4-14 for one batch."""

    def __init__(self, recipe, conds, reward_spec: str, dynamic: bool, accelerator=None, extra_conds=(),
                 text_cache_dir=None, shard_spec=None):
        from . import rollout
        from .models.flux_fill import load_fill_pipeline
        from .reward import RewardScorer, build_query

        self.r, self.cfg, self.dynamic = recipe, recipe.rl, dynamic
        self.rollout, self.build_query = rollout, build_query
        self.acc = accelerator
        self.device = accelerator.device if accelerator is not None else torch.device(resolve_device(recipe.device))
        self.dtype = torch_dtype(recipe.dtype)
        if self.dtype == torch.float16:
            raise InputError("training in float16 needs loss scaling, which rl does not implement: use bfloat16 "
                             "(or float32 with rl.mixed_precision: bf16)", field="dtype")
        # Trainable weights are fp32 masters; the forward computes in bf16 when the recipe asks for it
        # (dtype bfloat16 for the frozen weights, or rl.mixed_precision bf16).
        bf16 = self.dtype == torch.bfloat16 or self.cfg.mixed_precision == "bf16"
        self.compute_dtype = torch.bfloat16 if bf16 else None
        self.conds = conds
        self.by_task: dict[str, list[int]] = {}
        for i, c in enumerate(conds):
            self.by_task.setdefault(c.task, []).append(i)
        # FSDP: the transformer is loaded on the CPU and each block moves to the device as it is sharded.
        self.sharder = None
        if shard_spec is not None:
            self.sharder = Sharder(shard_spec, self.device, param_dtype=self.compute_dtype)
        self.pipe = load_fill_pipeline(recipe.models.policy, device="cpu" if self.sharder else self.device,
                                       dtype=self.dtype)
        if self.sharder is not None:
            for name in ("vae", "text_encoder", "text_encoder_2"):
                getattr(self.pipe, name).to(self.device)
        # Every rank's batch has one shared shape and t when each transformer call is a collective.
        self.one_shape = self.sharder is not None
        # Text embeddings: every distinct prompt (held-out ones too) encoded once into the on-disk cache,
        # then the text encoders are dropped; steps read only their batch's rows back (`text_embeds`).
        prompts = sorted({c.prompt for c in list(conds) + list(extra_conds)})
        if text_cache_dir is None:  # a Trainer outside `rl.run`: text_cache.dir, else a private folder
            self._tmp = None if recipe.text_cache.dir else tempfile.TemporaryDirectory(prefix="onereward-text-")
            text_cache_dir = cache_root(recipe, self._tmp.name if self._tmp else None)
        self.text = TextCache(text_cache_dir, self.pipe, self.cfg.max_sequence_length, recipe.text_cache.batch_size)
        # Rank 0 encodes, the others then find every prompt in the (shared) cache.
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            self.text.refresh()
            self.text.ensure(prompts, device=self.device)
            if self.cfg.true_cfg > 1.0:  # its own batch, as before the cache
                self.text.ensure([self.cfg.negative_prompt], device=self.device)
        self.neg = None
        if self.cfg.true_cfg > 1.0:  # one row, kept on the device
            self.neg = self.text.get([self.cfg.negative_prompt], device=self.device)
        self.pipe.text_encoder = self.pipe.text_encoder_2 = None
        self.pipe.vae.requires_grad_(False)
        if self.cfg.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
            self.pipe.vae.enable_gradient_checkpointing()
        self.policy = Policy(self.pipe.transformer, self.cfg, dynamic, seed=recipe.seed, shard=self.sharder)
        self.scorer = RewardScorer.load(reward_spec, recipe.reward, device=self.device, dtype=self.dtype)
        if self.cfg.reward_activation_checkpointing:
            self.scorer.enable_activation_checkpointing()
        self.params = list(self.policy.trainable.values())
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        self.sched = make_scheduler(self.opt, self.cfg.lr_warmup, self.cfg.lr_schedule, self.cfg.steps)
        self.ref_cache: dict[int, torch.Tensor] = {}
        self._sigmas: dict[tuple[int, int], torch.Tensor] = {}
        self.timers: dict[str, float] = {}
        # One vision pass per image pair for all of its dimension queries (False: one forward per query,
        # kept for the benchmark's naive baseline).
        self.share_vision = True

    # -- pieces ------------------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def text_embeds(self, prompts):
        """The rows of these prompts, read from the cache onto the device (nothing else is kept)."""
        return self.text.get(prompts, device=self.device)

    def _embeds(self, idx):
        return self.text_embeds([self.conds[i].prompt for i in idx])

    def _neg(self, n):
        return None if self.neg is None else self.neg.select([0] * n)

    @contextlib.contextmanager
    def _timed(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t

    def sigmas(self, hw) -> torch.Tensor:
        """The rollout schedule for images of size hw = (H, W): FLUX's shift depends on the token count."""
        hw = tuple(int(v) for v in hw)
        if hw not in self._sigmas:
            self._sigmas[hw] = self.rollout.make_sigmas(self.pipe, self.cfg.rollout_steps, *hw)
        return self._sigmas[hw]

    def _noise(self, n, gen, hw):
        return self.rollout.initial_latents(self.pipe, n, *hw, gen, self.device, self.dtype)

    @torch.no_grad()
    def _reference_rollout(self, cond, emb, eps, hw):
        sig = self.sigmas(hw)
        with self._timed("reference_rollout"), self.policy.reference_transformer() as ref:
            lat = self.rollout.denoise(ref, eps, cond, emb, sig, 0, len(sig) - 1,
                                       guidance=self.cfg.guidance, true_cfg=self.cfg.true_cfg,
                                       neg_embeds=self._neg(eps.shape[0]))
            return self.rollout.decode(self.pipe, lat, *hw)

    @torch.no_grad()
    def reference_images(self, idx, cond, gen_ref):  # idx: conditions of one shape
        """x_ref for each sample (Alg. 1 line 7).

        Static mode with rl.cache_reference: x_ref is a function of (c, eps_1) alone, so eps_1 and the
        VAE sample of the condition are drawn from a generator seeded by the condition, each one is
        rolled out on its own (batch-size independent numerics) and reused in later epochs.
        """
        hw = self.conds[idx[0]].image.shape[-2:]
        if not (self.cfg.cache_reference and not self.dynamic):
            return self._reference_rollout(cond, self._embeds(idx), self._noise(len(idx), gen_ref, hw), hw)
        misses = list(dict.fromkeys(i for i in idx if i not in self.ref_cache))
        rollouts = len(misses)
        if self.sharder is not None:  # FSDP: every rank rolls out as often as the one with most misses
            n = torch.tensor([rollouts], dtype=torch.int64, device=self.device)  # NCCL reduces device tensors
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
            rollouts = int(n.item())
        for k in range(rollouts):
            i = misses[k] if k < len(misses) else idx[0]  # beyond this rank's misses: redone, result unused
            g = torch.Generator().manual_seed(self.r.seed * 7_777 + i)
            image, mask = stack_conditions(self.conds, [i], self.device, self.dtype)
            c1 = self.rollout.prepare_condition(self.pipe, image, mask, generator=g)
            x = self._reference_rollout(c1, self._embeds([i]), self._noise(1, g, hw), hw)[0]
            self.ref_cache.setdefault(i, x)
        return torch.stack([self.ref_cache[i] for i in idx])

    def policy_images(self, idx, cond, t, gen_pol):
        """x_theta: no-grad rollout to step t, then one step with grad predicting x0, decoded with grad."""
        tr = self.policy.transformer
        emb = self._embeds(idx)
        hw = self.conds[idx[0]].image.shape[-2:]
        sig = self.sigmas(hw)
        eps = self._noise(len(idx), gen_pol, hw)
        with self._timed("policy_rollout"):
            with torch.no_grad():
                x_t = self.rollout.denoise(tr, eps, cond, emb, sig, 0, t, guidance=self.cfg.guidance,
                                           true_cfg=self.cfg.true_cfg, neg_embeds=self._neg(len(idx)))
            sigma = sig[t]
            v = self.rollout.velocity(tr, x_t.detach(), cond, emb, sigma, guidance=self.cfg.guidance,
                                      true_cfg=self.cfg.true_cfg, neg_embeds=self._neg(len(idx)))
            x0 = self.rollout.predict_x0(x_t.detach(), v, sigma)
        with self._timed("decode"):
            return self.rollout.decode(self.pipe, x0, *hw)

    def queries(self, idx):
        out = []
        for i in idx:
            c = self.conds[i]
            tcfg = self.r.tasks[c.task]
            out.append([self.build_query(tcfg, d, c.user_prompt, self.r.reward.query_mode, self.r.reward.bold)
                        for d in tcfg.dimensions])
        return out

    # -- one iteration -----------------------------------------------------------------------
    def step(self, step: int, rank: int = 0):
        with self.autocast():
            return self._step(step, rank)

    def _step(self, step: int, rank: int):
        """Returns (loss, idx, t, p_yes, x_theta): idx in shape-bucket order, p_yes per sample of idx,
        x_theta one (n, 3, H, W) tensor per bucket."""
        idx, t, gen = sample_batch(self.r, self.conds, self.by_task, step, rank, one_shape=self.one_shape)
        gen_ref = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        gen_pol = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        order, p_yes, x_thetas = [], [], []
        groups = shape_buckets(self.conds, idx)  # one bucket (the whole batch) when shapes agree
        conds, refs = [], []
        # Every bucket's reference first: the dynamic reference swaps the EMA into the trainable weights
        # in place, which must not happen while an earlier bucket's policy graph still needs them.
        for group in groups:
            images, masks = stack_conditions(self.conds, group, self.device, self.dtype)
            with torch.no_grad(), self._timed("condition"):
                conds.append(self.rollout.prepare_condition(self.pipe, images, masks, generator=gen))
            refs.append(self.reference_images(group, conds[-1], gen_ref))
        for group, cond, x_ref in zip(groups, conds, refs):
            x_theta = self.policy_images(group, cond, t, gen_pol)
            with self._timed("reward"):
                p_yes += self.scorer.p_yes(x_theta.float(), x_ref.float(), self.queries(group),
                                           share_vision=self.share_vision)
            order += group
            x_thetas.append(x_theta)
        loss, _ = refl_loss(p_yes, self.cfg.lambda_)  # mean over samples: the bucket order does not matter
        return loss, order, t, p_yes, x_thetas

    def optimizer_step(self, loss):
        self.backward(loss)
        return self.update()

    def backward(self, loss):
        with self._timed("backward"):
            loss.backward()

    def update(self) -> float:
        """Average the gradients across ranks, clip, step AdamW and the schedule, update the EMA."""
        with self._timed("backward"):
            if self.acc is not None and self.acc.num_processes > 1 and self.sharder is None:
                # Data parallel by hand: average gradients across ranks. The transformer is not wrapped
                # in DDP because the reference rollout needs the bare module (adapters off / EMA in).
                # (Under FSDP the backward has reduce-scattered the averaged gradients already.)
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.acc.num_processes
            if self.cfg.max_grad_norm > 0:
                gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            else:
                gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
            if is_dtensor(gn):  # FSDP: the norm over all shards
                gn = gn.full_tensor()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            ema_update(self.policy.ema, self.policy.trainable, self.cfg.tau)
        return float(gn)


def _rewards_by_key(trainer, idx, p_yes):
    out: dict[str, list[float]] = {}
    for i, p in zip(idx, p_yes):
        c = trainer.conds[i]
        for d, v in zip(trainer.r.tasks[c.task].dimensions, p.detach().float().tolist()):
            out.setdefault(f"{c.task}/{d}", []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


@torch.no_grad()
def heldout_oracle(trainer, conds, n: int = 4) -> float:
    """Mean oracle score of full policy rollouts on held-out conditions (fixed seeds): a reward-hacking
    alarm that does not use the reward model."""
    with trainer.autocast():
        return _heldout_oracle(trainer, conds, n)


def _heldout_oracle(trainer, conds, n: int) -> float:
    import numpy as np
    from PIL import Image

    from .synth import oracle_scores

    def to_pil(x):
        return Image.fromarray((x.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))

    scores = []
    # Evenly spaced, so a benchmark ordered by task contributes every task.
    spread = sorted({k * len(conds) // min(n, len(conds)) for k in range(min(n, len(conds)))})
    for idx in shape_buckets(conds, spread):
        hw = conds[idx[0]].image.shape[-2:]
        sig = trainer.sigmas(hw)
        images, masks = stack_conditions(conds, idx, trainer.device, trainer.dtype)
        cond = trainer.rollout.prepare_condition(trainer.pipe, images, masks,
                                                 generator=torch.Generator().manual_seed(0))
        eps = trainer._noise(len(idx), torch.Generator().manual_seed(12345), hw)
        emb = trainer.text_embeds([conds[i].prompt for i in idx])
        lat = trainer.rollout.denoise(trainer.policy.transformer, eps, cond, emb, sig, 0, len(sig) - 1,
                                      guidance=trainer.cfg.guidance, true_cfg=trainer.cfg.true_cfg,
                                      neg_embeds=trainer._neg(len(idx)))
        out = trainer.rollout.decode(trainer.pipe, lat, *hw)
        for k, i in enumerate(idx):
            c = conds[i]
            s = oracle_scores(to_pil(c.image), (c.mask[0].numpy() * 255).astype(np.uint8), to_pil(out[k]),
                              trainer.r.tasks[c.task].dimensions, c.user_prompt)
            scores.append(sum(s.values()) / len(s))
    return float(sum(scores) / len(scores))


def check_launch(cfg):
    """The launch's sharding, checked before accelerate reads it: None (one process or data parallel) or the
    FSDP settings (sharding.ShardSpec) for full fine-tuning on several processes. LoRA runs data parallel
    (the adapters are small; optimizer_step averages their gradients), DeepSpeed is not supported, FSDP on
    one process would shard nothing. Read from the launcher's environment (what `accelerate launch`
    exports from the config file) because Accelerator() itself dies with a traceback on an FSDP config
    without a GPU."""
    env = os.environ
    spec = from_launch(env)
    zero = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if spec is None and not zero:
        return None
    world = int(env.get("WORLD_SIZE", "1"))
    name = "FSDP" if spec is not None else "DeepSpeed"
    if cfg.lora:
        raise InputError(f"LoRA runs under DDP (recipes/accelerate/ddp.yaml), not {name}: the adapters are small and "
                         "rl averages their gradients itself", field="rl.lora")
    if world < 2:
        raise InputError(f"{name} shards over processes but this launch has one, so nothing would be sharded: "
                         "run without accelerate launch (or with recipes/accelerate/ddp.yaml on several GPUs)",
                         field="num_processes")
    if zero:
        raise InputError("rl does not run under DeepSpeed: shard full fine-tuning with FSDP "
                         "(recipes/accelerate/fsdp-rl.yaml)")
    return spec


@contextlib.contextmanager
def _without_accelerate_fsdp():
    """Accelerator() would build its own FSDP plugin from the environment (and fail without a GPU); rl
    shards the transformer itself (sharding.py) and uses accelerate only for the process group."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def run(recipe, data, out, reward_model: str | None = None, dynamic: bool = False, resume: bool = False,
        heldout=None):
    from accelerate import Accelerator
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    out = Path(out)
    cfg = recipe.rl
    conds = load_conditions(recipe, data)  # validate everything before any output is written
    if (out / "checkpoints" / "latest.json").exists() and not resume:
        raise InputError("output folder already holds a run; pass --resume to continue it or choose another --out",
                         path=out)
    reward_spec = reward_model or recipe.models.reward
    shard_spec = check_launch(cfg)
    with _without_accelerate_fsdp():
        acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=(recipe.device == "cpu"))
    rank = acc.process_index
    dist = (rank, acc.num_processes) if shard_spec is not None else None  # FSDP: every rank saves its shards
    fingerprint = run_fingerprint(recipe, _resolve_data_file(data), reward_spec, dynamic, acc.num_processes,
                                  fsdp=dist is not None)
    if resume:
        check_resume(out, fingerprint)
    heldout_conds = load_conditions(recipe, heldout) if heldout else conds
    trainer = Trainer(recipe, conds, reward_spec, dynamic, accelerator=acc, extra_conds=heldout_conds,
                      text_cache_dir=cache_root(recipe, out), shard_spec=shard_spec)
    man = RunManifest("rl-dynamic" if dynamic else "rl", out, recipe,
                      inputs={"data": _resolve_data_file(data), "reward_model": reward_spec,
                              **({"validation": _resolve_data_file(heldout)} if heldout else {})})
    out.mkdir(parents=True, exist_ok=True)
    if acc.num_processes == 1:  # temp files and half-assembled checkpoints of a killed run
        remove_stale_temps(out)
    start, counters = 0, {"nonfinite": 0}
    log_path = out / "log.jsonl"
    if resume:
        start, counters = load_checkpoint(out, trainer.policy, trainer.opt, trainer.sched, dist=dist)
        console.print(f"rl: resumed at step {start}")
        if acc.is_main_process:  # the log is rank 0's file
            _truncate_log(log_path, start)
    elif acc.is_main_process:
        log_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    tb = _tensorboard(out / "tensorboard") if acc.is_main_process else None
    best = None  # rl.keep_best: the snapshot with the best held-out score (step 0 = the starting model)
    if cfg.keep_best:
        if resume and "best_step" in counters:
            best = load_best(out, trainer.policy, dist)
        else:
            base = heldout_oracle(trainer, heldout_conds, n=cfg.heldout_n)
            counters.update(best_step=0, best_score=base, start_heldout=base)
            best = trainer.policy.snapshot()
            if tb is not None:
                tb.add_scalar("heldout/oracle", base, 0)
    with Progress(TextColumn("[bold]rl{}".format(" (dynamic)" if dynamic else "")), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                  disable=not acc.is_main_process) as prog:
        bar = prog.add_task("rl", total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            loss, idx, t, p_yes, _ = trainer.step(step, rank)  # under the trainer's autocast
            finite = torch.isfinite(loss.detach()).float().reshape(1)
            if acc.num_processes > 1:  # every rank skips together, or the gradient all-reduce would hang
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if finite.item() < 1:
                counters["nonfinite"] += 1
                trainer.opt.zero_grad(set_to_none=True)
                console.print(f"[yellow]warning:[/] step {step}: non-finite loss, step skipped "
                              f"({counters['nonfinite']}/{cfg.max_nonfinite})")
                if counters["nonfinite"] >= cfg.max_nonfinite:
                    raise TrainingAborted(_abort_message(out, counters["nonfinite"], step), path=out,
                                          field="rl.max_nonfinite")
                prog.advance(bar)
                continue
            lr = trainer.sched.get_last_lr()[0]  # the lr this step trains with
            gn = trainer.optimizer_step(loss)
            rewards = _rewards_by_key(trainer, idx, p_yes)
            rec = {"step": step + 1, "loss": float(loss.detach()), "t": t, "grad_norm": gn, "lr": lr,
                   "rewards": rewards, "mean_reward": float(torch.cat([p.detach().float() for p in p_yes]).mean())}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                rec["heldout_oracle"] = heldout_oracle(trainer, heldout_conds, n=cfg.heldout_n)
                if best is not None and rec["heldout_oracle"] > counters["best_score"]:
                    best = trainer.policy.snapshot()
                    counters.update(best_step=step + 1, best_score=rec["heldout_oracle"])
            if acc.is_main_process:
                append_jsonl(log_path, rec)
                if tb is not None:
                    tb.add_scalar("loss", rec["loss"], step + 1)
                    tb.add_scalar("mean_reward", rec["mean_reward"], step + 1)
                    for k, v in rewards.items():
                        tb.add_scalar(f"reward/{k}", v, step + 1)
                    if "heldout_oracle" in rec:
                        tb.add_scalar("heldout/oracle", rec["heldout_oracle"], step + 1)
            prog.update(bar, advance=1, info=f"loss {rec['loss']:.3f} reward {rec['mean_reward']:.3f}")
            saver = acc.is_main_process or dist is not None
            if saver and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out, step + 1, trainer.policy, trainer.opt, trainer.sched, counters, fingerprint, dist,
                                best=best)
            acc.wait_for_everyone()
    if dist is not None:  # FSDP: shards on every rank; policy/ and ema/ gathered (a collective) for rank 0
        save_checkpoint(out, cfg.steps, trainer.policy, trainer.opt, trainer.sched, counters, fingerprint, dist,
                        best=best)
        tr = trainer.policy.transformer
        full = gathered(tr.state_dict(), trainer.dtype, keep=acc.is_main_process)
        with trainer.policy.swapped_in_ema():
            full_ema = gathered(tr.state_dict(), trainer.dtype, keep=acc.is_main_process)
        if best is not None:
            with trainer.policy.swapped_in(best):
                full_best = gathered(tr.state_dict(), trainer.dtype, keep=acc.is_main_process)
    if acc.is_main_process:
        if dist is None:
            save_checkpoint(out, cfg.steps, trainer.policy, trainer.opt, trainer.sched, counters, fingerprint,
                            best=best)
        from diffusers import FluxFillPipeline

        tr = trainer.policy.transformer
        if best is None:
            save_policy_dir(FluxFillPipeline, tr, out / "policy", recipe.models.policy, trainer.policy.lora,
                            policy_settings(recipe), dtype=trainer.dtype, state=full if dist else None)
        else:  # early stopping: policy/ is the selected snapshot, last/ the final weights
            save_policy_dir(FluxFillPipeline, tr, out / "last", recipe.models.policy, trainer.policy.lora,
                            policy_settings(recipe), dtype=trainer.dtype, state=full if dist else None)
            with trainer.policy.swapped_in(best) if dist is None else contextlib.nullcontext():
                save_policy_dir(FluxFillPipeline, tr, out / "policy", recipe.models.policy, trainer.policy.lora,
                                policy_settings(recipe), dtype=trainer.dtype, state=full_best if dist else None)
            man.set(selected={"step": counters["best_step"], "heldout_oracle": counters["best_score"],
                              "start_heldout_oracle": counters["start_heldout"]})
        with trainer.policy.swapped_in_ema() if dist is None else contextlib.nullcontext():
            save_policy_dir(FluxFillPipeline, tr, out / "ema", recipe.models.policy, trainer.policy.lora,
                            policy_settings(recipe), dtype=trainer.dtype, state=full_ema if dist else None)
        png = plot_reward_curves(log_path, out / "reward_curves.png") if log_path.exists() else None
        if tb is not None:
            tb.close()
        man.count(steps=cfg.steps, conditions=len(conds), nonfinite=counters["nonfinite"],
                  reference_cache=len(trainer.ref_cache))
        man.set(mode="dynamic (Alg. 2)" if dynamic else "static (Alg. 1)", world_size=acc.num_processes,
                sharding="FSDP2 (fully_shard per block)" if dist else "none",
                timings_breakdown_s={k: round(v, 3) for k, v in trainer.timers.items()})
        man.write()
        console.print(f"rl: policy -> {out / 'policy'}, EMA -> {out / 'ema'}"
                      + (f", reward curves -> {png}" if png else ""))
        if best is not None:
            console.print(f"rl: keep_best: policy/ is step {counters['best_step']} (held-out oracle "
                          f"{counters['best_score']:.4f}, start {counters['start_heldout']:.4f}); last/ is step {cfg.steps}")
    acc.wait_for_everyone()
    return out


def _abort_message(out: Path, n: int, step: int) -> str:
    latest = out / "checkpoints" / "latest.json"
    kept = (f"last good checkpoint {out / 'checkpoints' / json.loads(latest.read_text())['path']}"
            if latest.is_file() else "no checkpoint was saved yet")
    return f"training aborted at step {step + 1}: {n} non-finite losses; {kept}"


def _truncate_log(log_path: Path, step: int):
    """After a resume, drop log lines past the checkpoint so the curve has no duplicates."""
    if not log_path.exists():
        return
    recs = [r for r in read_jsonl(log_path, tolerate_torn_tail=True) if r["step"] <= step]
    from .artifacts import strip_meta, write_jsonl

    write_jsonl(log_path, [strip_meta(r) for r in recs])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional at run time
        return None
    return SummaryWriter(str(path))

"""One ReFL iteration at paper scale: seconds per part, peak memory and achieved TFLOP/s.

Builds FLUX.1-Fill-dev and Qwen2.5-VL-7B-Instruct *layouts* from their released configs
(tests/real_arch.py) with random weights, saves them as the tiny zoo is saved, and times `rl`'s own
Trainer.step + Trainer.optimizer_step (one Alg. 1 / Alg. 2 iteration) for: LoRA and full fine-tuning,
static and dynamic reference, and the naive loop (reference regenerated every step, one reward
forward per dimension query) against the optimised one (static reference cached, one vision pass
per image pair). Random weights change no FLOP and no byte, so speed and memory are those of the
real checkpoints; the rewards are meaningless.

--scale ci      the reduced set of tests/real_arch.py (1 block each, narrow heads) with a narrow VAE
                (channels 32/32/64/64): the CPU smoke run
--scale 0.25    released widths, a quarter of the depth (at least one block); 1.0 = released sizes
The text encoders (CLIP-L, T5-XXL) are built with one layer at every scale: `rl` runs them once per
prompt into the on-disk cache, never inside an iteration. ViT-L-14 (curation / CLIP metrics) is not
in the iteration either; only its parameter count is reported.

    # GPU (one H200/H100 80 GB+; full fine-tuning of the 12B transformer does not fit one GPU: see the
    # memory plan in BENCHMARKS.md, the row reports "out of memory")
    python benchmarks/paper_scale.py --scale 1.0 --device cuda --resolution 512 --out bench-paper
    # CPU smoke run (what tests/test_paper_scale.py runs)
    python benchmarks/paper_scale.py --scale ci --device cpu --resolution 64 --rollout-steps 2 --out /tmp/ps

Writes <out>/paper_scale.json and <out>/paper_scale.md (the same numbers as a table).
--plan-only writes just the computed FSDP memory plan (no model is built).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import real_arch as A  # noqa: E402

RUNS = {  # name: (lora, dynamic, cache_reference (None: the recipe's), share_vision)
    "lora-static": (True, False, None, True),
    "lora-dynamic": (True, True, None, True),
    "full-static": (False, False, None, True),
    "full-dynamic": (False, True, None, True),
    "naive": (True, False, False, False),       # Alg. 1 as written: fresh reference, one forward per query
    "optimised": (True, False, True, True),     # reference cached per condition, one vision pass per pair
}
PARTS = ["condition", "reference_rollout", "policy_rollout", "decode", "reward", "backward"]
GiB = 2**30


# ----------------------------------------------------------------------------------------------
# Model sizes
# ----------------------------------------------------------------------------------------------
def configs(scale: str) -> dict:
    """The configs of each model at this scale ('ci' or a depth fraction of the released ones)."""
    if scale == "ci":  # the VAE narrowed too (4 blocks and 16 latent channels kept): a minute on 2 cores
        return dict(flux=A.FLUX_BUILT, vae={**A.VAE_BUILT, "block_out_channels": [32, 32, 64, 64]},
                    clip=A.CLIP_BUILT, t5=A.T5_BUILT,
                    text=A.QWEN_TEXT_BUILT, vision=A.QWEN_VISION_BUILT)
    s = float(scale)
    if not 0 < s <= 1:
        raise SystemExit(f"error: --scale must be 'ci' or a number in (0, 1], got {scale}")

    def depth(n, floor=1):
        return max(floor, round(n * s))

    vd = depth(A.QWEN_VISION["depth"], 2)
    # The 7B's pattern: full attention every 8th ViT block (the last block at least), windowed otherwise.
    full = [i for i in range(vd) if (i + 1) % 8 == 0] or [vd - 1]
    return dict(flux={**A.FLUX, "num_layers": depth(A.FLUX["num_layers"]),
                      "num_single_layers": depth(A.FLUX["num_single_layers"])},
                vae=A.VAE, clip={**A.CLIP_L, "num_hidden_layers": 1}, t5={**A.T5_XXL, "num_layers": 1},
                text={**A.QWEN_TEXT, "num_hidden_layers": depth(A.QWEN_TEXT["num_hidden_layers"])},
                vision={**A.QWEN_VISION, "depth": vd, "fullatt_block_indexes": full})


def build(root: Path, scale: str) -> dict:
    """Build (or reuse, when the configs match) the model folders for this scale."""
    from onereward_cli.models.tiny import resolve_model_path

    cfg = configs(scale)
    stamp = root / "configs.json"
    paths = {"policy": root / "flux-fill", "reward": root / "qwen2.5-vl"}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(cfg)) and \
            all(p.is_dir() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    A.build_flux_fill(paths["policy"], flux=cfg["flux"], vae=cfg["vae"], clip=cfg["clip"], t5=cfg["t5"])
    A.build_qwen_vl(paths["reward"], resolve_model_path("zoo:qwen2.5-vl"), text=cfg["text"], vision=cfg["vision"])
    stamp.write_text(json.dumps(cfg, indent=2))
    return paths


def count_params(scale: str = "1.0") -> dict:
    """Parameter counts of the models at this scale, built on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = configs(scale)
    out = {}
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**cfg["flux"])
        out["flux_transformer"] = sum(p.numel() for p in tr.parameters())
        blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
        out["flux_largest_block"] = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **{**cfg["vae"], "block_out_channels": tuple(cfg["vae"]["block_out_channels"])})
        out["vae"] = sum(p.numel() for p in vae.parameters())
        t = {k: v for k, v in cfg["text"].items() if k != "mrope_section"}
        q = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(**t, rope_parameters={"rope_type": "default", "mrope_section": A.QWEN_TEXT["mrope_section"],
                                                   "rope_theta": 1000000.0}),
            vision_config=dict(**cfg["vision"]), tie_word_embeddings=False))
        out["qwen2.5_vl"] = sum(p.numel() for p in q.parameters())
        try:
            import open_clip

            out["vit_l_14"] = sum(p.numel() for p in open_clip.create_model("ViT-L-14", load_weights=False).parameters())
        except Exception:  # noqa: BLE001 - optional: only reported
            out["vit_l_14"] = None
    return out


def memory_plan(params: dict, world: int = 8, batch: int = 1, resolution: int = 512, seq: int = 512,
                reward_image: int = 448, dims: int = 3, dynamic: bool = False) -> list[tuple[str, float, str]]:
    """Per-GPU bytes of full fine-tuning under FSDP (FULL_SHARD over `world` GPUs), COMPUTED from parameter
    counts, not measured: (item, GiB, how). Activations are estimates (bf16, block-level checkpointing)."""
    P, Q, V, blk = params["flux_transformer"], params["qwen2.5_vl"], params["vae"], params["flux_largest_block"]
    H, L = A.FLUX["num_attention_heads"] * A.FLUX["attention_head_dim"], A.FLUX["num_layers"] + A.FLUX["num_single_layers"]
    T = (resolution // 16) ** 2 + seq  # packed 2x2 latent tokens + T5 tokens
    rows = [("fp32 master weights (sharded)", 4 * P / world, "4 B x P / W"),
            ("fp32 gradients (sharded, reduce-scattered)", 4 * P / world, "4 B x P / W"),
            ("AdamW exp_avg + exp_avg_sq fp32 (sharded)", 8 * P / world, "8 B x P / W"),
            ("EMA fp32 (sharded like the masters)", 4 * P / world, "4 B x P / W")]
    if dynamic:  # Policy.swapped_in_ema keeps the trained weights aside while the EMA plays pi_ref
        rows.append(("trained weights set aside during the EMA rollout (sharded)", 4 * P / world, "4 B x P / W"))
    else:
        rows.append(("static reference, frozen bf16 copy (sharded)", 2 * P / world, "2 B x P / W"))
    rows += [("all-gathered bf16 blocks (current + prefetched)", 2 * 2 * blk, "2 x 2 B x largest block"),
             ("reward model Qwen2.5-VL-7B, frozen bf16 (replicated)", 2 * Q, "2 B x Q"),
             ("VAE bf16 (replicated)", 2 * V, "2 B x V"),
             ("transformer activations, est.", batch * T * H * 2 * (L + 24),
              "B x T x H x 2 B x (L checkpoints + ~24 tensors of one recomputed block)"),
             ("VAE decode with grad, est.", batch * resolution**2 * 128 * 2 * 12,
              "B x res^2 x 128 ch x 2 B x ~12 live maps (top level, checkpointed)"),
             ("reward forward+backward, est.", batch * dims * (2 * (reward_image // 28) ** 2 + 128) * 3584 * 2 * (28 + 24),
              "B x dims x tokens x 3584 x 2 B x (28 checkpoints + ~24)")]
    return [(n, b / GiB, how) for n, b, how in rows]


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in `dtype` on this device: the ceiling TFLOP/s is compared to."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def peak_bytes(device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "peak RSS (VmHWM, whole process)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss, whole process)"


def make_conditions(d: Path, res: int) -> Path:
    """One condition per task (each task's own reward dimensions)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i, task in enumerate(["fill", "extend", "extend_no_prompt", "removal"]):
        Image.fromarray((rng.random((res, res, 3)) * 255).astype(np.uint8)).save(d / f"s{i}.png")
        m = np.zeros((res, res), np.uint8)
        m[res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        recs.append({"id": f"c{i}", "task": task, "source": f"s{i}.png", "mask": f"m{i}.png",
                     "prompt": "a red circle on a wooden table" if task in ("fill", "extend") else ""})
    (d / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "c.jsonl"


def one_run(a, paths, conds_path, name, text_dir) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from onereward_cli import rl
    from onereward_cli.recipe import load_recipe

    lora, dynamic, cache, share = RUNS[name]
    t = a.t if a.t is not None else a.rollout_steps // 2
    sets = [f"models.policy={paths['policy']}", f"models.reward={paths['reward']}", f"device={a.device}",
            f"dtype={a.dtype}", f"rl.resolution={a.resolution}", f"rl.batch_size={a.batch_size}",
            f"rl.rollout_steps={a.rollout_steps}", f"rl.t1={t}", f"rl.t2={t}",  # the same work every step
            f"rl.max_sequence_length={a.max_sequence_length}", f"reward.image_size={a.reward_image_size}",
            f"rl.lora={'true' if lora else 'false'}"] + (
        [f"rl.cache_reference={'true' if cache else 'false'}"] if cache is not None else []) + list(a.set)
    r = load_recipe(a.recipe, sets)
    device = torch.device(a.device)
    conds = rl.load_conditions(r, conds_path)
    tr = None
    try:
        tr = rl.Trainer(r, conds, r.models.reward, dynamic=dynamic, text_cache_dir=text_dir)
        tr.share_vision = share
        n_trainable = sum(p.numel() for p in tr.params)
        if r.rl.cache_reference and not dynamic:  # steady state: every condition's reference already cached
            with tr.autocast():
                for i in range(len(conds)):
                    tr.reference_images([i], None, None)
        loss, *_ = tr.step(0)  # warm-up: kernels, allocator, lazily built schedules; not timed
        tr.optimizer_step(loss)
        with FlopCounterMode(display=False) as fc:  # counted on its own step: the counter slows what it counts
            loss, *_ = tr.step(1)
            tr.optimizer_step(loss)
        flops = fc.get_total_flops()
        tr.timers.clear()
        gc.collect()
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        for s in range(2, 2 + a.steps):
            loss, *_ = tr.step(s)
            tr.optimizer_step(loss)
        sync(device)
        per = (time.perf_counter() - t0) / a.steps
        peak, how = peak_bytes(device)
        return {"run": name, "lora": lora, "dynamic": dynamic, "cache_reference": bool(r.rl.cache_reference),
                "share_vision": share, "trainable_params": n_trainable, "s_per_iter": per,
                "parts_s": {k: tr.timers.get(k, 0.0) / a.steps for k in PARTS},
                "peak_memory_gib": peak / GiB, "peak_memory_kind": how, "flops_per_iter": flops,
                "tflops": flops / per / 1e12, "loss": float(loss.detach())}
    except torch.cuda.OutOfMemoryError:
        return {"run": name, "lora": lora, "dynamic": dynamic, "error": "out of memory"}
    finally:
        del tr
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"device: {m['device_name']}; torch {m['torch']}; scale {m['scale']}; {m['resolution']} px, batch "
             f"{m['batch_size']}, {m['rollout_steps']} rollout steps (stop step t = {m['t']}), {m['steps']} timed "
             f"iteration(s) after 1 warm-up and 1 FLOP-counted one; dtype {m['dtype']}",
             f"matmul ceiling ({m['ceiling_dtype']}, {m['ceiling_n']}^3): {m['ceiling_tflops']:.3f} TFLOP/s; "
             f"memory: {res['runs'][0].get('peak_memory_kind', '')}",
             f"params: FLUX transformer {m['params']['flux_transformer'] / 1e9:.3f} B, Qwen2.5-VL "
             f"{m['params']['qwen2.5_vl'] / 1e9:.3f} B, VAE {m['params']['vae'] / 1e6:.1f} M", "",
             "| run | trainable | s/iter | " + " | ".join(PARTS) + " | peak GiB | TFLOP/s | % of ceiling |",
             "|---|---|---|" + "---|" * len(PARTS) + "---|---|---|"]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | | {r['error']} |" + " |" * (len(PARTS) + 3))
            continue
        lines.append(f"| {r['run']} | {r['trainable_params'] / 1e6:.2f} M | {r['s_per_iter']:.3f} | "
                     + " | ".join(f"{r['parts_s'][k]:.3f}" for k in PARTS)
                     + f" | {r['peak_memory_gib']:.2f} | {r['tflops']:.4f} | "
                       f"{100 * r['tflops'] / m['ceiling_tflops']:.1f} |")
    if res.get("speedup_naive_over_optimised") is not None:
        lines.append(f"\nspeed-up, naive / optimised loop: {res['speedup_naive_over_optimised']:.2f}x")
    return "\n".join(lines) + "\n"


def plan_markdown(plan, world, resolution, dynamic) -> str:
    total = sum(g for _, g, _ in plan)
    lines = [f"COMPUTED, not measured: full fine-tuning ({'dynamic' if dynamic else 'static'}), FSDP FULL_SHARD "
             f"over {world} GPUs, {resolution} px, batch 1 per GPU", "", "| per GPU | GiB | from |", "|---|---|---|"]
    lines += [f"| {n} | {g:.2f} | {how} |" for n, g, how in plan]
    lines.append(f"| **total** | **{total:.1f}** | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="ci")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu (bf16 is emulated there)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "flux-fill-onereward.yaml"))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rollout-steps", type=int, default=28)
    ap.add_argument("--t", type=int, default=None, help="the stop step of every iteration (default rollout_steps // 2)")
    ap.add_argument("--max-sequence-length", type=int, default=512)
    ap.add_argument("--reward-image-size", type=int, default=448)
    ap.add_argument("--steps", type=int, default=1, help="timed iterations per run")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--set", action="append", default=[], help="extra recipe override, repeatable")
    ap.add_argument("--models", default=None, help="folder for the built models (reused when the configs match)")
    ap.add_argument("--ceiling-n", type=int, default=None)
    ap.add_argument("--world", type=int, default=8, help="GPUs of the FSDP memory plan")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    runs = [r for r in a.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"error: --runs: unknown {', '.join(bad)} (choose from {', '.join(RUNS)})")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no GPU is visible")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    plan_params = count_params("1.0")
    plans = {k: memory_plan(plan_params, a.world, resolution=a.resolution, seq=a.max_sequence_length,
                            reward_image=a.reward_image_size, dynamic=k == "dynamic") for k in ("static", "dynamic")}
    plan_md = "\n".join(plan_markdown(p, a.world, a.resolution, k == "dynamic") for k, p in plans.items())
    res = {"memory_plan_computed": {"world": a.world, "params": plan_params,
                                    **{k: [{"item": n, "gib": g, "from": h} for n, g, h in p] for k, p in plans.items()}}}
    if not a.plan_only:
        device = torch.device(a.device)
        torch.manual_seed(0)
        cdt = getattr(torch, a.dtype)
        n = a.ceiling_n or (8192 if device.type == "cuda" else 512)
        ceiling = matmul_ceiling(device, torch.bfloat16 if device.type == "cuda" else cdt, n,
                                 50 if device.type == "cuda" else 3)
        with tempfile.TemporaryDirectory(prefix="paper-scale-") as tmp:
            tmp = Path(tmp)
            paths = build(Path(a.models) if a.models else tmp / "models", a.scale)
            (tmp / "c").mkdir()
            conds = make_conditions(tmp / "c", a.resolution)
            rows = [one_run(a, paths, conds, name, tmp / "text") for name in runs]
        by = {r["run"]: r for r in rows}
        sp = None
        if "error" not in by.get("naive", {"error": 1}) and "error" not in by.get("optimised", {"error": 1}):
            sp = by["naive"]["s_per_iter"] / by["optimised"]["s_per_iter"]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        res.update(meta={"device_name": name, "torch": torch.__version__, "scale": a.scale, "resolution": a.resolution,
                         "batch_size": a.batch_size, "rollout_steps": a.rollout_steps,
                         "t": a.t if a.t is not None else a.rollout_steps // 2, "steps": a.steps, "dtype": a.dtype,
                         "ceiling_dtype": "bfloat16" if device.type == "cuda" else a.dtype, "ceiling_n": n,
                         "ceiling_tflops": ceiling, "params": count_params(a.scale)},
                   runs=rows, speedup_naive_over_optimised=sp)
    out.mkdir(parents=True, exist_ok=True)
    md = (markdown(res) + "\n" if "runs" in res else "") + plan_md
    for f, text in (("paper_scale.json", json.dumps(res, indent=2) + "\n"), ("paper_scale.md", md)):
        tmp = out / f".{f}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f)  # atomic: a reader never sees half a table
    print(md)


if __name__ == "__main__":
    main()

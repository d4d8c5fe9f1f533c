"""Does a larger tiny Qwen2.5-VL answer the compositional questions better? Pretrain a VLM of another size
from scratch with the shipped VLM stage's budget (vision warm-up, then question answering; seed 0) and
report held-out per-kind accuracy beside the shipped VLM's, and the wall time (issue 12).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_size.py OUT \
        [--width 96] [--layers 4] [--vit-depth 4] [--scale 1.0] [--vit-head shape] [--vit-steps 1000]

Unset sizes keep the random zoo's (width 64, LM 4 layers, ViT 4 blocks: the shipped VLM's architecture).
BENCHMARKS.md reports `--width 96` and `--layers 8 --vit-depth 6` against it; neither was adopted. It also
reports the binding candidates (`--vit-head tokens`, `--vit-steps`, `--vlm-steps`, `--weights`, `--token-aux`;
"Binding a colour to a shape"), whose best (tk4) is the shipped stage since 2026-12-05: the defaults
are the budget's (`pretrain.Budget`), so `--vit-head shape --vit-steps 1000 --vlm-steps 1600 --weights
'{"shape": 3, "colour": 1.5, "exists": 1, "exists_in": 0.5}'` is the stage shipped before it.

The random model is the random zoo's Qwen2.5-VL (tokenizer, processor, chat template, mrope, windowed ViT)
with only the widths and depths changed, so OUT/model is a Qwen2.5-VL folder that `reward.base` (the
recipe's `models.reward`) can point at. Writes OUT/result.json. Nothing here changes the shipped zoo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ["object_colour", "object_shape", "shape", "colour", "exists", "position", "count", "background",
         "same_background", "exists_in", "more_colour", "noisy", "which_noisy"]


def _fail(msg: str):
    """Bad input: one line on stderr, exit code 2 (as every onereward command)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def resized_config(cfg, width: int | None, layers: int | None, vit_depth: int | None):
    t, v = cfg.text_config, cfg.vision_config
    width, layers, vit_depth = width or t.hidden_size, layers or t.num_hidden_layers, vit_depth or v.depth
    # Head width stays 16: the mrope sections (2, 3, 3) cover half of it. GQA: 2 query heads per kv head.
    if width % 16 or width < 64:
        _fail(f"--width must be a multiple of 16, at least 64 (got {width})")
    heads = width // 16
    t.hidden_size, t.num_hidden_layers, t.max_window_layers = width, layers, layers
    t.layer_types = ["full_attention"] * layers
    t.intermediate_size = int(round(width * 172 / 64))
    t.num_attention_heads, t.num_key_value_heads = heads, heads // 2 if heads % 2 == 0 else heads
    v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size = width, 2 * width, heads, width
    v.depth = vit_depth
    v.fullatt_block_indexes = list(range(1, vit_depth, 2))
    return cfg


def main(argv=None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from onereward_cli.models.tiny import resolve_model_path
    from onereward_cli.pretrain import Budget, _loop
    from onereward_cli.pretrain import vlm
    from onereward_cli.pretrain.world import WorldConfig

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vit-depth", type=int, default=None)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--vit-head", default=None, choices=["shape", "tokens"],
                   help="the vision warm-up's head: tokens or shape (default: the budget's, tokens)")
    p.add_argument("--vit-steps", type=int, default=None, help="warm-up steps (default: the budget's)")
    p.add_argument("--token-aux", type=float, default=0.0, help="weight of the per-token loss kept in QA")
    p.add_argument("--vlm-steps", type=int, default=None, help="question-answering steps (default: the budget's)")
    p.add_argument("--weights", default="{}", help="re-weights the question stream (pretrain.vlm.KINDS), JSON")
    p.add_argument("--per-kind", type=int, default=48)
    a = p.parse_args(argv)
    base = resolve_model_path("zoo-random:qwen2.5-vl")
    cfg = resized_config(AutoConfig.from_pretrained(base), a.width, a.layers, a.vit_depth)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    proc = AutoProcessor.from_pretrained(base)
    n_params = sum(x.numel() for x in model.parameters())
    budget = Budget().scaled(a.scale) if a.scale != 1.0 else Budget()
    from dataclasses import replace

    if a.vit_head is not None:
        budget = replace(budget, vit_head=a.vit_head)
    if a.vit_steps is not None:
        budget = replace(budget, vit_steps=a.vit_steps)
    if a.vlm_steps is not None:
        budget = replace(budget, vlm_steps=a.vlm_steps)
    try:
        weights = json.loads(a.weights)
        known = {"is_colour", "is_shape", "has_colour", "has_shape", *vlm.KINDS}
        bad = [k for k, w in weights.items() if k not in known or not isinstance(w, (int, float)) or w < 0]
    except (ValueError, AttributeError):
        _fail(f"--weights: not a JSON object of question kind -> weight: {a.weights!r}")
    if bad:
        _fail(f"--weights: {bad[0]!r} is not a question kind with a weight >= 0 (kinds: {', '.join(sorted(known))})")
    vlm.KINDS.update(weights)
    world = WorldConfig()
    t = time.time()
    res = vlm.run(model, proc, a.out / "work", world, _loop(budget.vlm_steps, budget.vlm_lr, budget), seed=0,
                  batch=budget.vlm_batch, eval_per_kind=budget.eval_n,
                  vit_loop=_loop(budget.vit_steps, budget.vit_lr, budget), vit_head=budget.vit_head,
                  token_aux=a.token_aux)
    seconds = time.time() - t
    model.save_pretrained(a.out / "model")
    proc.save_pretrained(a.out / "model")
    held = {k: v for k, v in vlm.heldout(world, a.per_kind, seed=31_000).items() if k in KINDS}
    acc = vlm.accuracy(model, proc, held)
    shipped = AutoModelForImageTextToText.from_pretrained(resolve_model_path("zoo:qwen2.5-vl")).eval()
    ref = vlm.accuracy(shipped, AutoProcessor.from_pretrained(resolve_model_path("zoo:qwen2.5-vl")), held)
    t, v = cfg.text_config, cfg.vision_config
    out = {"width": t.hidden_size, "layers": t.num_hidden_layers, "vit_depth": v.depth, "params": n_params,
           "pretrain_seconds": round(seconds, 1), "scale": a.scale, "vit_head": budget.vit_head, "token_aux": a.token_aux,
           "vit_steps": budget.vit_steps, "vlm_steps": budget.vlm_steps,
           "weights": json.loads(a.weights), "accuracy": acc, "shipped_accuracy": ref,
           "training": res}
    (a.out / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"params {n_params}, pretraining {seconds:.0f} s")
    for k in acc:
        print(f"{k:16s} shipped {ref[k]:6.1%}   this {acc[k]:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

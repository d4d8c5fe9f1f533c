"""What limits the shipped VLM's compositional answers? Continue its question answering for a few hundred
steps with one thing changed, and compare per-kind held-out accuracy before and after against a control
run with nothing changed (issue 12).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_continue.py OUT [--weights JSON] \
        [--image-size 224] [--steps 600] [--lr 3e-4]

--weights re-weights the question stream (`pretrain.vlm.KINDS`, e.g. '{"shape": 6, "colour": 6}');
--image-size shows the 64 px scenes at that many pixels a side (112 = 16 merged vision tokens, as shipped;
224 = 64). The held-out questions (48 per kind, a seed no pretraining stage draws) are asked at the same
size before and after. Writes OUT/result.json. Nothing here changes the shipped zoo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ["object_colour", "object_shape", "shape", "colour", "exists", "position", "count", "background"]


def main(argv=None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from onereward_cli.models.tiny import resolve_model_path
    from onereward_cli.pretrain import vlm
    from onereward_cli.pretrain.loop import LoopConfig
    from onereward_cli.pretrain.world import WorldConfig

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--weights", default="{}")
    p.add_argument("--image-size", type=int, default=0, help="0 = the processor's own (112)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--per-kind", type=int, default=48)
    a = p.parse_args(argv)
    vlm.KINDS.update(json.loads(a.weights))
    path = resolve_model_path("zoo:qwen2.5-vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    if a.image_size:
        px = a.image_size ** 2
        proc.image_processor.size = {"shortest_edge": px, "longest_edge": px}
    cfg = WorldConfig()
    held = {k: v for k, v in vlm.heldout(cfg, a.per_kind, seed=31_000).items() if k in KINDS}
    t = time.time()
    before = vlm.accuracy(model, proc, held)
    vlm.run(model, proc, a.out, cfg, LoopConfig(steps=a.steps, lr=a.lr, warmup=30, save_every=a.steps, log_every=50),
            seed=7, batch=32, eval_per_kind=8)
    after = vlm.accuracy(model, proc, held)
    res = {"weights": json.loads(a.weights), "image_size": a.image_size or 112, "steps": a.steps, "lr": a.lr,
           "before": before, "after": after, "seconds": round(time.time() - t, 1)}
    (a.out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    for k in before:
        print(f"{k:14s} {before[k]:6.1%} -> {after[k]:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

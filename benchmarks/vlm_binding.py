"""Where does a tiny Qwen2.5-VL lose a colour-to-shape binding: in its vision tokens, or in the LM that reads
them? (issue 12; BENCHMARKS.md "Binding a colour to a shape")

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_binding.py [MODEL ...] [--scenes 1280]

MODEL is a Qwen2.5-VL folder or a zoo spec (default: zoo:qwen2.5-vl). Two measurements per model:

1. A per-token linear probe: the frozen merged vision tokens of `--scenes` pool scenes, each token labelled
   with the (colour, shape) of the object under it (`pretrain.vlm.token_labels`); a linear head is fitted on
   three quarters of the tokens and scored on the rest. High colour but low shape accuracy means the tokens
   do not say which shape is *here*, whatever the LM does.
2. The greedy answers to the compositional questions ("what shape is the <colour> object?", "what colour
   is the <shape>?", "is there a <colour> <shape>?", 96 each, seed "binding") by the scene's object count,
   and what a wrong answer named: another object's attribute (a binding error) or one no object has.

Prints a table and writes nothing.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def token_probe(model, processor, n_scenes: int, seed: int = 0, steps: int = 1500) -> dict[str, float]:
    import torch

    from onereward_cli import synth
    from onereward_cli.pretrain import vlm, world

    cfg, rng = world.WorldConfig(), random.Random(f"binding-probe:{seed}")
    feats, labels = [], []
    for i in range(0, n_scenes, 32):
        specs = [world.random_scene(rng, cfg) for _ in range(min(32, n_scenes - i))]
        ip = processor.image_processor(images=[synth.render_scene(s) for s in specs], return_tensors="pt")
        with torch.no_grad():
            feats.append(model.model.visual(ip["pixel_values"], grid_thw=ip["image_grid_thw"]).pooler_output)
        labels.append(vlm.token_targets(processor, ip["image_grid_thw"], specs))
    x, y = torch.cat(feats), torch.cat(labels)
    x, y = x[y != -100], y[y != -100]
    n = len(x) * 3 // 4
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-5)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], vlm.TOKEN_NONE + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x[:n]), y[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p, t = head(x[n:]).argmax(1), y[n:]
    obj = t != vlm.TOKEN_NONE
    ns = len(synth.SHAPES)
    po, to = p[obj], t[obj]
    return {"joint": float((po == to).float().mean()), "colour": float((po // ns == to // ns).float().mean()),
            "shape": float((po % ns == to % ns).float().mean()), "none": float((p[~obj] == t[~obj]).float().mean()),
            "object_tokens": int(obj.sum())}


def answers_by_count(model, processor, per_kind: int = 96) -> dict[str, dict]:
    import numpy as np

    from onereward_cli.pretrain import vlm, world

    cfg, rng, out = world.WorldConfig(), random.Random("binding"), {}
    share, vlm.LARGE_OBJECT_SHARE = vlm.LARGE_OBJECT_SHARE, 0.0
    try:
        for kind in ("shape", "colour", "exists"):
            exs, specs = [], []
            while len(exs) < per_kind:
                state = rng.getstate()
                spec = vlm._scene_image(rng, cfg)[1]  # the scene make_example draws first
                rng.setstate(state)
                ex = vlm.make_example(kind, rng, cfg)
                if ex is not None:
                    exs.append(ex)
                    specs.append(spec)
            preds = []
            for i in range(0, len(exs), 32):
                preds += vlm.answer(model, processor, exs[i:i + 32])
            by_n, wrong = collections.defaultdict(list), collections.Counter()
            key = "color" if kind == "colour" else "shape"
            for (_, _, a), pred, spec in zip(exs, preds, specs):
                by_n[len(spec["objects"])].append(pred == a)
                if pred != a and kind != "exists":
                    wrong["other object" if pred in {o[key] for o in spec["objects"]} else "no object"] += 1
            out[kind] = {"all": float(np.mean([p == a for p, (_, _, a) in zip(preds, exs)])),
                         **{f"{n} objects": float(np.mean(v)) for n, v in sorted(by_n.items())},
                         **({"wrong: another object's": wrong["other object"],
                             "wrong: no object's": wrong["no object"]} if kind != "exists" else {})}
    finally:
        vlm.LARGE_OBJECT_SHARE = share
    return out


def main(argv=None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from onereward_cli.models.tiny import resolve_model_path

    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=["zoo:qwen2.5-vl"])
    p.add_argument("--scenes", type=int, default=1280)
    p.add_argument("--per-kind", type=int, default=96)
    p.add_argument("--probe-steps", type=int, default=1500)
    a = p.parse_args(argv)
    for spec in a.models:
        path = resolve_model_path(spec) if spec.startswith("zoo") else spec
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        proc = AutoProcessor.from_pretrained(path)
        probe = token_probe(model, proc, a.scenes, steps=a.probe_steps)
        print(f"{spec}: token probe (object tokens {probe['object_tokens']}): joint {probe['joint']:.1%}, "
              f"colour {probe['colour']:.1%}, shape {probe['shape']:.1%}; 'none' tokens {probe['none']:.1%}")
        for kind, row in answers_by_count(model, proc, a.per_kind).items():
            print(f"  {kind:7s} " + ", ".join(f"{k} {v:.1%}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

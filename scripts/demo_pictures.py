"""Render README pictures from a finished `onereward demo` output.

    .venv/bin/python scripts/demo_pictures.py [demo-out] [--docs docs]

Writes docs/demo-edits.png (per task: source with the mask tinted, the synthetic ground truth where the
benchmark has one, then each policy's edit from eval/images, base first) and copies the demo's accuracy, reward-curve and oracle plots to docs/demo-*.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw


def _resolve(demo: Path, p: Path) -> Path:
    """metrics.json records the benchmark as the demo saw it (often relative to where it ran): try that,
    then the same path under the demo folder with its leading components dropped."""
    if p.is_absolute() or p.exists():
        return p
    for k in range(1, len(p.parts)):
        q = demo.joinpath(*p.parts[k:])
        if q.exists():
            return q
    raise SystemExit(f"{demo}/eval/metrics.json: benchmark {p} not found (run from the demo's folder)")


def edits_grid(demo: Path, out: Path, per_task: int = 2, scale: int = 3) -> Path:
    ev = demo / "eval"
    m = json.loads((ev / "metrics.json").read_text())
    labels = sorted((p["label"] for p in m["policies"]), key=lambda n: (n.startswith("rl-"), n))
    bench_file = _resolve(demo, Path(m["benchmark"]))
    bench = [json.loads(x) for x in bench_file.read_text().splitlines() if x.strip()]
    root = bench_file.parent
    rows, seen = [], {}
    for rec in bench:
        t = rec["task"]
        if seen.get(t, 0) >= per_task:
            continue
        seen[t] = seen.get(t, 0) + 1
        rows.append(rec)
    truth = any("target" in r for r in rows)
    cols = ["source + mask"] + (["ground truth"] if truth else []) + labels
    cell = 64 * scale
    head = 18
    grid = Image.new("RGB", (cell * len(cols), head + cell * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        d.text((j * cell + 4, 3), name[:30], fill="black")
    for i, rec in enumerate(rows):
        src = Image.open(root / rec["source"]).convert("RGB")
        mask = Image.open(root / rec["mask"]).convert("L").resize(src.size)
        src = src.resize((cell, cell * src.height // src.width), Image.NEAREST)
        mk = mask.resize(src.size, Image.NEAREST)
        tint = Image.new("RGB", src.size, (255, 0, 255))
        src = Image.composite(Image.blend(src, tint, 0.35), src, mk)
        y = head + i * cell
        grid.paste(src, (0, y))
        d.text((4, y + 2), rec["task"], fill="white")
        d.text((4, y + cell - 14), (rec.get("prompt") or "(no prompt)")[:30], fill="white")
        files = ([root / rec["target"] if "target" in rec else None] if truth else []) + [
            ev / "images" / name / f"{rec['id']}.png" for name in labels]
        for j, f in enumerate(files, start=1):
            if f is not None and f.exists():
                im = Image.open(f).convert("RGB")
                grid.paste(im.resize((cell, cell * im.height // im.width), Image.NEAREST), (j * cell, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("demo", type=Path, nargs="?", default=Path("demo-out"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    a = p.parse_args()
    print(edits_grid(a.demo, a.docs / "demo-edits.png"))
    for src, dst in (("reward/accuracy.png", "demo-accuracy.png"), ("rl-static/reward_curves.png", "demo-reward-curves.png"),
                     ("eval/metrics.png", "demo-eval-oracle.png")):
        if (a.demo / src).exists():
            shutil.copy2(a.demo / src, a.docs / dst)
            print(a.docs / dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

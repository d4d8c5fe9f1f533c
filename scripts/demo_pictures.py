"""Render README pictures from a finished `onereward demo` output.

    .venv/bin/python scripts/demo_pictures.py [demo-out] [--docs docs]

Writes docs/demo-edits.png (per task: source with the mask outlined, then each policy's edit, from
eval/images) and copies the demo's accuracy, reward-curve and oracle plots to docs/demo-*.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw


def edits_grid(demo: Path, out: Path, per_task: int = 2, scale: int = 3) -> Path:
    ev = demo / "eval"
    m = json.loads((ev / "metrics.json").read_text())
    labels = [p["label"] for p in m["policies"]]
    bench = [json.loads(x) for x in (Path(m["benchmark"])).read_text().splitlines() if x.strip()]
    root = Path(m["benchmark"]).parent
    rows, seen = [], {}
    for rec in bench:
        t = rec["task"]
        if seen.get(t, 0) >= per_task:
            continue
        seen[t] = seen.get(t, 0) + 1
        rows.append(rec)
    cell = 64 * scale
    head = 18
    grid = Image.new("RGB", (cell * (1 + len(labels)), head + cell * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    for j, name in enumerate(["source + mask"] + labels):
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
        for j, name in enumerate(labels):
            f = ev / "images" / name / f"{rec['id']}.png"
            if f.exists():
                im = Image.open(f).convert("RGB")
                grid.paste(im.resize((cell, cell * im.height // im.width), Image.NEAREST), ((j + 1) * cell, y))
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

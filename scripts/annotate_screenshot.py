"""Render docs/annotate.png: the labelling page on a synthetic fill sample, half labelled.

    .venv/bin/python scripts/annotate_screenshot.py [--out docs/annotate.png]

Needs Debian's /usr/bin/chromium and the playwright python package (dev extra). Writes nothing
but the PNG (the sample lives in a temporary directory).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from onereward_cli import annotate
from onereward_cli.recipe import load_recipe
from onereward_cli.synth import COLORS, _background, _draw_shape

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SIZE = 96


def _candidates(source: Image.Image, mask: Image.Image, box) -> list[Image.Image]:
    """Four plausible fills of the masked box for "a yellow star": right, wrong object, noisy, smudged."""
    rng = np.random.default_rng(3)
    bg = _background(SIZE, random.Random(1), "blue", "stripes")
    out = []
    for kind in ("star", "circle", "noisy", "smudge"):
        c = source.copy()
        c.paste(bg, (0, 0), mask)
        d = ImageDraw.Draw(c)
        if kind in ("star", "noisy"):
            _draw_shape(d, "star", box, COLORS["yellow"])
        if kind == "circle":
            _draw_shape(d, "circle", box, COLORS["orange"])
        if kind == "noisy":
            a = np.asarray(c).astype(np.int16)
            m = np.asarray(mask)[..., None] > 0
            a = np.where(m, a + rng.integers(-70, 70, a.shape), a)
            c = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if kind == "smudge":
            blurred = c.filter(ImageFilter.GaussianBlur(6))
            _draw_shape(ImageDraw.Draw(blurred), "star", box, (150, 140, 90))
            c.paste(blurred.filter(ImageFilter.GaussianBlur(2)), (0, 0), mask)
        out.append(c)
    return out


def build_sample(root: Path) -> Path:
    img = _background(SIZE, random.Random(1), "blue", "stripes")
    d = ImageDraw.Draw(img)
    _draw_shape(d, "circle", (8, 10, 38, 40), COLORS["red"])
    _draw_shape(d, "square", (58, 60, 86, 88), COLORS["white"])
    box = (46, 8, 86, 48)
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([box[0] - 4, box[1] - 4, box[2] + 3, box[3] + 3], fill=255)
    source = img  # FLUX Fill ignores what is under the mask; showing it helps the annotator
    rel = "images/demo-fill"
    (root / rel).mkdir(parents=True)
    source.save(root / rel / "source.png")
    mask.save(root / rel / "mask.png")
    cands = []
    for i, c in enumerate(_candidates(img, mask, box)):
        c.save(root / rel / f"cand_{i}.png")
        cands.append({"index": i, "path": f"{rel}/cand_{i}.png", "seed": i,
                      "params": {"steps": 28, "guidance": 30.0, "true_cfg": 1.0, "shift": 1.0, "negative_prompt": ""}})
    rec = {"id": "demo-fill", "task": "fill", "prompt": "a yellow star", "user_prompt": "a yellow star",
           "source": f"{rel}/source.png", "mask": f"{rel}/mask.png", "width": SIZE, "height": SIZE,
           "candidates": cands}
    lines = [json.dumps(rec)]
    for k in range(1, 24):  # more samples, so the progress bar has something to show
        lines.append(json.dumps({**rec, "id": f"demo-{k:03d}"}))
    (root / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    done = [{"sample_id": f"demo-{k:03d}", "annotator": "alice", "task": "fill", "time": "",
             "labels": {"text alignment": "no difference", "consistency": "no difference",
                        "structure": "no difference", "aesthetics": "no difference"}} for k in range(1, 10)]
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/annotate.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = build_sample(Path(tmp))
        srv = annotate.make_server(load_recipe("tiny"), root, root / "annotations.jsonl", annotator="alice", port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(srv.url + "/")
                page.wait_for_selector('body[data-ready="demo-fill"]')
                for key in ("1", "Shift+Digit2", "0", "1"):  # half labelled: shows every state
                    page.keyboard.press(key)
                png = page.screenshot()
                browser.close()
        finally:
            srv.shutdown()
            srv.server_close()
    # A 256-colour palette keeps the README image small; the UI has few colours.
    im = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    im.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()

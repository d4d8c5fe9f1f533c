"""The labelling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
label two samples with the keyboard only and check what reached annotations.jsonl."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from onereward_cli import annotate
from onereward_cli.artifacts import read_jsonl
from onereward_cli.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under --import-mode=importlib
from test_annotate import ND, make_candidates  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is not installed (pip install -e '.[dev]')")
    return sync_playwright


@pytest.fixture()
def served(tmp_path):
    cdir = make_candidates(tmp_path / "cands")
    target = cdir / "annotations.jsonl"
    srv = annotate.make_server(load_recipe("tiny"), cdir, target, annotator="kb", port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv, target
    srv.shutdown()
    srv.server_close()


def test_label_two_samples_with_keyboard_only(served):
    sync_playwright = _playwright()
    srv, target = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

            page.goto(srv.url + "/")
            ready = lambda sid: page.wait_for_selector(f'body[data-ready="{sid}"]', timeout=15000)  # noqa: E731
            ready("s0")
            assert page.inner_text("#progress-text").strip() == "0 / 3"
            assert page.inner_text("#task-key") == "fill" and "a red square" in page.inner_text("#prompt")
            assert page.locator("#dims .dim").count() == 4
            assert "seams at the mask border" in page.inner_text("#dims")  # the one-line definitions
            assert page.locator("#candidates canvas").count() == 3
            # The mask outline is drawn on the source (its yellow stroke is there).
            yellow = page.evaluate("""() => {
                const c = document.getElementById('source');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 240 && d[i + 1] > 190 && d[i + 2] < 60) n++;
                return n; }""")
            assert yellow > 100

            # Enter on an incomplete sample does nothing but say what is missing.
            page.keyboard.press("1")
            page.keyboard.press("Enter")
            assert "Still to choose" in page.inner_text("#message")
            # Zoom opens on z and closes on Escape.
            page.keyboard.press("z")
            assert page.is_visible("#zoom") and "candidate 1 of 3" in page.inner_text("#zoom-caption")
            page.keyboard.press("ArrowRight")
            assert "candidate 2 of 3" in page.inner_text("#zoom-caption")
            page.keyboard.press("Escape")
            assert not page.is_visible("#zoom")

            page.keyboard.press("s")  # skip s0; it comes back after the others
            ready("s1")
            # s1 (removal, one dimension): best 1, worst 3, submit.
            page.keyboard.press("1")
            page.keyboard.press("Shift+Digit3")
            assert page.locator(".cand.best .num").inner_text() == "1"
            page.keyboard.press("Enter")
            ready("s2")
            assert page.inner_text("#progress-text").startswith("1 / 3")
            # s2 (extend_no_prompt: consistency, structure, aesthetics). Focus moves on by itself once a
            # dimension is complete; ArrowUp goes back to fix one.
            page.keyboard.press("0")             # consistency: no difference
            page.keyboard.press("3")             # structure: best 3 ...
            page.keyboard.press("Shift+Digit1")  # ... worst 1 -> focus to aesthetics
            page.keyboard.press("n")             # aesthetics: no difference
            page.keyboard.press("ArrowUp")
            page.keyboard.press("2")             # structure: best 2 instead of 3
            assert page.locator("#dims .dim.done").count() == 3
            page.keyboard.press("Enter")
            ready("s0")
            assert page.inner_text("#progress-text").startswith("2 / 3")
            assert not problems, problems
        finally:
            browser.close()

    recs = read_jsonl(target)
    assert [(r["sample_id"], r["annotator"], r["task"]) for r in recs] == [
        ("s1", "kb", "removal"), ("s2", "kb", "extend_no_prompt")]
    assert recs[0]["labels"] == {"removal quality": {"best": 0, "worst": 2}}
    assert recs[1]["labels"] == {"consistency": ND, "structure": {"best": 1, "worst": 0}, "aesthetics": ND}
    assert json.loads(target.read_text().splitlines()[0])["time"]

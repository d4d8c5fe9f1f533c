"""The labelling page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
keyboard only: candidates shown in the annotator's shuffled order (12 of them for s0: two-digit picks),
picks mapped back to candidate indices, undo of the last submit, skip, and a server restart that resumes
where the annotator left off (skips remembered)."""
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


def _serve(cdir, target):
    srv = annotate.make_server(load_recipe("tiny"), cdir, target, annotator="kb", port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def _stop(srv):
    srv.shutdown()
    srv.server_close()


def _open(browser, url, problems):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url + "/")
    return page


def test_shuffled_order_undo_skip_and_resume_with_keyboard_only(tmp_path):
    sync_playwright = _playwright()
    cdir = make_candidates(tmp_path / "cands", n_fill=12)
    target = cdir / "annotations.jsonl"
    cands = {r["id"]: r for r in map(json.loads, (cdir / "candidates.jsonl").read_text().splitlines())}
    order = {sid: annotate.shown_order(0, "kb", sid, len(cands[sid]["candidates"])) for sid in cands}
    assert order["s0"] != list(range(12))  # the seed gives a real shuffle here
    srv = _serve(cdir, target)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _open(browser, srv.url, problems)
            ready = lambda sid: page.wait_for_selector(f'body[data-ready="{sid}"]', timeout=15000)  # noqa: E731
            ready("s0")
            assert page.inner_text("#progress-text").strip() == "0 / 3"
            assert page.inner_text("#task-key") == "fill" and "a red square" in page.inner_text("#prompt")
            assert page.locator("#dims .dim").count() == 4
            assert "seams at the mask border" in page.inner_text("#dims")  # the one-line definitions
            assert page.locator("#candidates canvas").count() == 12
            # The mask outline is drawn on the source (its yellow stroke is there).
            yellow = page.evaluate("""() => {
                const c = document.getElementById('source');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 240 && d[i + 1] > 190 && d[i + 2] < 60) n++;
                return n; }""")
            assert yellow > 100
            # Each shown position holds the candidate the server's order puts there (its painted colour).
            centres = page.evaluate("""() => [...document.querySelectorAll('#candidates canvas')].map(c => {
                const d = c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
                return [d[0], d[1], d[2]]; })""")
            from PIL import Image
            want = [list(Image.open(cdir / cands["s0"]["candidates"][i]["path"]).convert("RGB").getpixel((16, 16)))
                    for i in order["s0"]]
            assert centres == want

            # Enter on an incomplete sample does nothing but say what is missing.
            page.keyboard.press("1")
            page.keyboard.press("1")             # "1", "1": position 11 (12 candidates: two digits)
            assert page.locator(".cand.best .num").inner_text() == "11"
            page.keyboard.press("Enter")
            assert "Still to choose" in page.inner_text("#message")
            page.keyboard.press("z")             # zoom opens on z and closes on Escape
            assert page.is_visible("#zoom") and "candidate 1 of 12" in page.inner_text("#zoom-caption")
            page.keyboard.press("ArrowRight")
            assert "candidate 2 of 12" in page.inner_text("#zoom-caption")
            page.keyboard.press("Escape")
            assert not page.is_visible("#zoom")
            page.keyboard.press("Shift+Digit3")  # text alignment: worst 3 (30 > 12: taken at once)
            page.keyboard.press("0")             # consistency: no difference
            page.keyboard.press("1")
            page.keyboard.press("2")             # structure: best 12 ...
            page.keyboard.press("Shift+Digit1")  # ... worst 1 (taken when the next key comes)
            page.keyboard.press("n")             # aesthetics: no difference
            assert page.locator("#dims .dim.done").count() == 4
            page.keyboard.press("Enter")
            ready("s1")
            # s1 (removal, one dimension): best 1, worst 3.
            page.keyboard.press("1")
            page.keyboard.press("Shift+Digit3")
            page.keyboard.press("Enter")
            ready("s2")
            assert page.inner_text("#progress-text").startswith("2 / 3")
            # Undo: s1 comes back; label it differently.
            page.keyboard.press("u")
            ready("s1")
            assert page.inner_text("#progress-text").startswith("1 / 3")
            page.keyboard.press("2")
            page.keyboard.press("Shift+Digit1")
            page.keyboard.press("Enter")
            ready("s2")
            page.keyboard.press("s")             # skip s2: it is the only one left, so it comes back
            page.locator("#progress-text", has_text="1 skipped").wait_for(timeout=15000)
            assert not problems, problems
        finally:
            browser.close()
    _stop(srv)

    # A restart resumes at s2 and still knows it was skipped; finish, then undo from the "done" page.
    srv = _serve(cdir, target)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _open(browser, srv.url, problems)
            ready = lambda sid: page.wait_for_selector(f'body[data-ready="{sid}"]', timeout=15000)  # noqa: E731
            ready("s2")
            text = page.inner_text("#progress-text")
            assert text.startswith("2 / 3") and "1 skipped" in text
            for _ in range(3):
                page.keyboard.press("0")
            page.keyboard.press("Enter")
            ready("finished")
            page.keyboard.press("u")
            ready("s2")
            assert not problems, problems
        finally:
            browser.close()
    _stop(srv)

    recs = read_jsonl(target)
    assert [(r["sample_id"], bool(r.get("retract"))) for r in recs] == [
        ("s0", False), ("s1", False), ("s1", True), ("s1", False), ("s2", False), ("s2", True)]
    o0, o1 = order["s0"], order["s1"]
    assert recs[0]["order"] == o0 and recs[0]["labels"] == {
        "text alignment": {"best": o0[10], "worst": o0[2]}, "consistency": ND,
        "structure": {"best": o0[11], "worst": o0[0]}, "aesthetics": ND}
    assert recs[1]["labels"] == {"removal quality": {"best": o1[0], "worst": o1[2]}}
    assert recs[3]["labels"] == {"removal quality": {"best": o1[1], "worst": o1[0]}} and recs[3]["order"] == o1
    standing = annotate.standing_records([dict(r) for r in recs])
    assert [r["sample_id"] for r in standing] == ["s0", "s1"] and standing[1]["labels"] == recs[3]["labels"]

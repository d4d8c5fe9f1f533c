"""The synthetic pool (`onereward synth`) and the oracle annotator's documented rules."""
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from onereward_cli import cli, synth
from onereward_cli.artifacts import read_jsonl
from onereward_cli.synth import COLORS, oracle_pick, oracle_scores
from onereward_cli.tasks import ALL_DIMENSIONS, removal_mask

MANIFEST = {"id": (str, True), "path": (str, True), "caption": (str, True), "width": (int, True),
            "height": (int, True), "background": (dict, True), "objects": (list, True)}


def run_synth(out, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", str(out), *args])
    assert exc.value.code in (0, None)


# --- the pool -------------------------------------------------------------------------------------
def test_synth_cli_writes_images_and_manifest(tmp_path, tiny_recipe):
    out = tmp_path / "pool"
    run_synth(out, "--n", "8", "--seed", "3")
    recs = read_jsonl(out / "manifest.jsonl", MANIFEST)
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    assert len(list((out / "images").glob("*.png"))) == 8
    size = tiny_recipe.synth.size
    for r in recs:
        p = out / r["path"]
        assert not r["path"].startswith("/") and p.exists()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (r["width"], r["height"]) == (size, size)
        assert r["caption"] and r["background"]["color"] in COLORS
        assert tiny_recipe.synth.min_objects <= len(r["objects"]) <= tiny_recipe.synth.max_objects
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
            assert f"{o['color']} {o['shape']}" in r["caption"]
        # the last object is drawn on top: its colour sits at its box centre
        o = r["objects"][-1]
        x0, y0, x1, y1 = o["box"]
        arr = np.asarray(Image.open(p).convert("RGB"))
        assert tuple(arr[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[o["color"]]
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "synth" and run["seed"] == 3 and run["counts"]["images"] == 8


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_synth(a, "--n", "8", "--seed", "3")
    run_synth(b, "--n", "8", "--seed", "3")
    run_synth(c, "--n", "8", "--seed", "4")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "run.json")
    assert len(files) == 9
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "manifest.jsonl").read_bytes() != (c / "manifest.jsonl").read_bytes()


def test_fixture_pool_is_valid(synth_pool):
    recs = read_jsonl(synth_pool / "manifest.jsonl", MANIFEST)
    assert len(recs) == 16
    assert all((synth_pool / r["path"]).exists() for r in recs)


# --- the oracle ------------------------------------------------------------------------------------
S = 64
BOX = (20, 20, 40, 40)


def scene(texture="plain", bg="green", obj="red", shape="circle", box=BOX):
    """(background alone, background with one object)."""
    background = synth._background(S, random.Random(1), bg, texture)
    src = background.copy()
    synth._draw_shape(ImageDraw.Draw(src), shape, box, COLORS[obj])
    return background, src


def rect_mask(box=BOX):
    m = np.zeros((S, S), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return m


def fill(img, mask, rgb):
    a = np.asarray(img).copy()
    a[mask > 0] = rgb
    return Image.fromarray(a)


@pytest.mark.parametrize("texture", synth.TEXTURES)
@pytest.mark.parametrize("bg", ["green", "white", "black"])
def test_removal_prefers_background_over_the_object(texture, bg):
    background, src = scene(texture, bg)
    mask = removal_mask((S, S), [BOX], dilate=4)
    removed = oracle_scores(src, mask, background, ["removal quality"])["removal quality"]
    kept = oracle_scores(src, mask, src, ["removal quality"])["removal quality"]
    other = background.copy()  # a new object painted where the old one was
    synth._draw_shape(ImageDraw.Draw(other), "square", (24, 24, 36, 36), COLORS["blue"])
    replaced = oracle_scores(src, mask, other, ["removal quality"])["removal quality"]
    assert removed > 0.9 > 0.5 > kept
    assert removed > replaced


def test_consistency_prefers_untouched_background_and_no_seam():
    _, src = scene("gradient")
    mask = rect_mask((4, 46, 28, 60))  # clear of the object: the perfect fill is the source itself
    perfect = oracle_scores(src, mask, src, ["consistency"])["consistency"]
    a = np.asarray(src).astype(np.int16)
    changed = a.copy()
    changed[mask == 0] += 30  # background outside the mask altered
    changed = Image.fromarray(np.clip(changed, 0, 255).astype(np.uint8))
    changed_score = oracle_scores(src, mask, changed, ["consistency"])["consistency"]
    seam = fill(src, mask, COLORS["yellow"])  # kept region intact, but a hard seam at the border
    seam_score = oracle_scores(src, mask, seam, ["consistency"])["consistency"]
    assert perfect > 0.95
    assert perfect > changed_score
    assert perfect > seam_score


def test_text_alignment_prefers_the_prompted_colour():
    _, src = scene()
    mask = rect_mask((4, 40, 28, 60))
    red = oracle_scores(src, mask, fill(src, mask, COLORS["red"]), ["text alignment"], "a red square")
    blue = oracle_scores(src, mask, fill(src, mask, COLORS["blue"]), ["text alignment"], "a red square")
    half = np.asarray(fill(src, mask, COLORS["red"])).copy()
    half[40:60, 16:28] = COLORS["blue"]
    half = oracle_scores(src, mask, Image.fromarray(half), ["text alignment"], "a red square")
    assert red["text alignment"] == 1.0 and blue["text alignment"] == 0.0
    assert 0.0 < half["text alignment"] < 1.0
    # no colour in the prompt: nothing to judge, both neutral
    n1 = oracle_scores(src, mask, fill(src, mask, COLORS["red"]), ["text alignment"], "something nice")
    n2 = oracle_scores(src, mask, fill(src, mask, COLORS["blue"]), ["text alignment"], "something nice")
    assert n1 == n2 == {"text alignment": 0.5}


@pytest.mark.parametrize("texture", ["plain", "stripes"])
def test_structure_drops_with_noise_inside_the_mask(texture):
    background, _ = scene(texture)
    mask = rect_mask()
    rng = np.random.RandomState(0)
    a = np.asarray(background).astype(np.float32)
    noisy_in, noisy_out = a.copy(), a.copy()
    noise = rng.normal(0, 40, a.shape)
    noisy_in[mask > 0] += noise[mask > 0]
    noisy_out[mask == 0] += noise[mask == 0]
    as_img = lambda x: Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))  # noqa: E731
    clean = oracle_scores(background, mask, background, ["structure"])["structure"]
    inside = oracle_scores(background, mask, as_img(noisy_in), ["structure"])["structure"]
    outside = oracle_scores(background, mask, as_img(noisy_out), ["structure"])["structure"]
    assert clean > inside
    assert outside == pytest.approx(clean, abs=0.05)  # structure looks inside the mask only


def test_scores_are_in_unit_range_and_accept_pil_masks_of_another_size():
    background, src = scene("dots")
    dims = list(ALL_DIMENSIONS)
    mask = rect_mask()
    s1 = oracle_scores(src, mask, background, dims, "a red circle")
    big = Image.fromarray(mask).resize((2 * S, 2 * S), Image.NEAREST)
    s2 = oracle_scores(src, big, background, dims, "a red circle")
    assert s1 == s2
    assert all(0.0 <= v <= 1.0 for v in s1.values())


def test_oracle_pick():
    background, src = scene()
    mask = removal_mask((S, S), [BOX], dilate=4)
    dims = ["removal quality", "structure"]
    a = np.asarray(src).astype(np.int16)
    nearly = Image.fromarray(np.clip(a + 1, 0, 255).astype(np.uint8))  # one grey level apart
    same = [oracle_scores(src, mask, c, dims) for c in (src, nearly, src)]
    assert oracle_pick(same, dims) == {d: None for d in dims}

    other = background.copy()
    synth._draw_shape(ImageDraw.Draw(other), "square", (24, 24, 36, 36), COLORS["blue"])
    cands = [other, background, src]  # mid, best, worst for removal
    picks = oracle_pick([oracle_scores(src, mask, c, ["removal quality"]) for c in cands], ["removal quality"])
    assert picks == {"removal quality": (1, 2)}
    # the margin decides what counts as "no difference"
    scores = [{"d": 0.50}, {"d": 0.51}]
    assert oracle_pick(scores, ["d"]) == {"d": None}
    assert oracle_pick(scores, ["d"], margin=0.005) == {"d": (1, 0)}

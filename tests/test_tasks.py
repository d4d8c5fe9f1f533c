"""Task registry and mask builders (paper §4.1-4.2)."""
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from onereward_cli import tasks as T
from onereward_cli.errors import InputError
from onereward_cli.recipe import load_recipe


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def test_registry_matches_the_paper():
    r = load_recipe("tiny")
    assert T.TASK_KEYS == ("fill", "extend", "extend_no_prompt", "removal")
    assert set(r.tasks) == set(T.TASK_KEYS)
    four = ("text alignment", "consistency", "structure", "aesthetics")
    assert r.tasks["fill"].dimensions == four and r.tasks["fill"].name == "image fill"
    assert r.tasks["extend"].dimensions == four and r.tasks["extend"].name == "image extend"
    assert r.tasks["extend_no_prompt"].dimensions == four[1:]
    assert r.tasks["extend_no_prompt"].fixed_prompt == "high-definition, perfect composition"
    assert r.tasks["removal"].dimensions == ("removal quality",) and r.tasks["removal"].name == "object removal"
    assert r.tasks["removal"].fixed_prompt == "remove"
    assert set(T.ALL_DIMENSIONS) == set(four) | {"removal quality"}
    assert all(T.DIMENSION_DEFINITIONS[d] for d in T.ALL_DIMENSIONS)


def test_task_prompt_fixed_and_free():
    r = load_recipe("tiny")
    assert T.task_prompt(r.tasks["removal"], "a cat") == "remove"
    assert T.task_prompt(r.tasks["extend_no_prompt"], None) == "high-definition, perfect composition"
    assert T.task_prompt(r.tasks["extend"], "a beach at dusk") == "a beach at dusk"
    # Text rendering is a fill prompt and passes through untouched.
    text = 'the words "ByteDance", and in the next line "OneReward"'
    assert T.task_prompt(r.tasks["fill"], text) == text
    assert T.task_prompt(r.tasks["fill"], None) == ""
    assert T.is_prompt_free(r.tasks["removal"]) and not T.is_prompt_free(r.tasks["fill"])


def test_sample_task_follows_recipe_probabilities():
    r = load_recipe("tiny")
    rng = random.Random(0)
    n = 8000
    c = Counter(T.sample_task(r.tasks, rng) for _ in range(n))
    for k, t in r.tasks.items():
        sd = (t.probability * (1 - t.probability) / n) ** 0.5
        assert abs(c[k] / n - t.probability) < 5 * sd + 1e-9, (k, c[k] / n)
    a = [T.sample_task(r.tasks, random.Random(7)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw


def test_zero_probability_task_is_never_drawn():
    r = load_recipe("tiny", ["tasks.extend.probability=0", "tasks.fill.probability=0.6"])
    rng = random.Random(1)
    assert "extend" not in {T.sample_task(r.tasks, rng) for _ in range(500)}


def test_recipe_rejects_bad_tasks():
    with pytest.raises(InputError, match="unknown task"):
        load_recipe("tiny", ["tasks.inpaint.probability=0.1"])
    with pytest.raises(InputError, match="text alignment"):
        load_recipe("tiny", ["tasks.removal.dimensions=[text alignment]"])
    with pytest.raises(InputError, match="sum to 1"):
        load_recipe("tiny", ["tasks.fill.probability=0.9"])
    with pytest.raises(InputError, match="extend_directions"):
        load_recipe("tiny", ["generate.masks.extend_directions=[sideways]"])


def test_sizes_snap_to_16():
    assert T.snap16(1) == 16 and T.snap16(24) == 32 and T.snap16(23) == 16 and T.snap16(64) == 64
    assert T.fit_size(64, 64, 64) == (64, 64)
    w, h = T.fit_size(1920, 1080, 512)
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 1920 / 1080) < 0.05 and abs(w * h - 512 ** 2) < 0.1 * 512 ** 2


# ----------------------------------------------------------------------------------------------
# User masks
# ----------------------------------------------------------------------------------------------
def _save(tmp_path, name, arr, mode=None):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p) if mode else Image.fromarray(arr).save(p)
    return p


def test_user_mask_binarised_white_is_edit(tmp_path):
    a = np.zeros((32, 48), np.uint8)
    a[:, :16] = 100  # grey below the threshold: keep
    a[:, 32:] = 200  # light grey: edit
    m = T.load_user_mask(_save(tmp_path, "m.png", a), (48, 32))
    assert m.shape == (32, 48) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert (m[:, :32] == 0).all() and (m[:, 32:] == 255).all()


def test_user_mask_resized_nearest_when_aspect_matches(tmp_path):
    a = np.zeros((16, 24), np.uint8)
    a[:, 12:] = 255
    called = []
    m = T.load_user_mask(_save(tmp_path, "m.png", a), (48, 32), on_resize=lambda o, n: called.append((o, n)))
    assert called == [((24, 16), (48, 32))]
    assert m.shape == (32, 48) and set(np.unique(m)) == {0, 255}
    assert (m[:, :24] == 0).all() and (m[:, 24:] == 255).all()


def test_user_mask_other_aspect_is_an_error(tmp_path):
    p = _save(tmp_path, "m.png", np.full((32, 32), 255, np.uint8))
    with pytest.raises(InputError, match="aspect ratio") as e:
        T.load_user_mask(p, (64, 32), where="in.jsonl", line=3)
    assert e.value.field == "mask" and e.value.line == 3 and "in.jsonl:3" in str(e.value)


def test_user_mask_unreadable_and_alpha(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read mask"):
        T.load_user_mask(bad, (16, 16))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 8:, 3] = 255  # white only where opaque; transparent white is not an edit
    m = T.load_user_mask(_save(tmp_path, "a.png", rgba, "RGBA"), (16, 16))
    assert (m[:, :8] == 0).all() and (m[:, 8:] == 255).all()


def test_resize_mask_binarises():
    m = np.zeros((8, 8), np.uint8)
    m[:4] = 1
    r = T.resize_mask(m, (16, 16))
    assert r.shape == (16, 16) and set(np.unique(r)) == {0, 255} and (r[:8] == 255).all() and (r[8:] == 0).all()


# ----------------------------------------------------------------------------------------------
# Random fill masks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strokes", [0.0, 1.0])
@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_random_fill_mask_coverage(size, strokes):
    covers = []
    for s in range(40):
        m = T.random_fill_mask(size, random.Random(s), 0.15, 0.5, strokes)
        assert m.shape == (size[1], size[0]) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        covers.append((m > 0).mean())
    # Rectangles hit the range up to integer rounding; strokes stop at the first stroke past the target.
    assert min(covers) > 0.13 and max(covers) < 0.6
    assert np.std(covers) > 0.02  # the area is drawn, not fixed


def test_random_fill_mask_is_seeded():
    a = T.random_fill_mask((64, 64), random.Random(3))
    b = T.random_fill_mask((64, 64), random.Random(3))
    c = T.random_fill_mask((64, 64), random.Random(4))
    assert (a == b).all() and not (a == c).all()


def test_random_fill_rect_is_one_rectangle():
    m = T.random_fill_mask((64, 64), random.Random(0), stroke_probability=0.0) > 0
    ys, xs = np.nonzero(m)
    assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()


# ----------------------------------------------------------------------------------------------
# Extend canvas
# ----------------------------------------------------------------------------------------------
def _src(w=32, h=32):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("direction,size,keep", [
    ("left", (48, 32), (16, 0, 48, 32)),
    ("right", (48, 32), (0, 0, 32, 32)),
    ("up", (32, 48), (0, 16, 32, 48)),
    ("down", (32, 48), (0, 0, 32, 32)),
    ("horizontal", (48, 32), (8, 0, 40, 32)),
    ("vertical", (32, 48), (0, 8, 32, 40)),
    ("all", (48, 48), (8, 8, 40, 40)),
])
def test_extend_canvas_directions(direction, size, keep):
    src = _src()
    canvas, mask = T.extend_canvas(src, 1.5, direction)
    assert canvas.size == size and mask.size == size and mask.mode == "L"
    m = np.asarray(mask)
    x0, y0, x1, y1 = keep
    assert (m[y0:y1, x0:x1] == 0).all()  # the original image is kept
    assert (m > 0).sum() == size[0] * size[1] - (x1 - x0) * (y1 - y0)  # everything else is generated
    # No resize needed at these sizes: the kept area is the source pixel for pixel.
    assert (np.asarray(canvas)[y0:y1, x0:x1] == np.asarray(src)).all()
    assert T.canvas_size(32, 32, 1.5, direction) == size


def test_extend_canvas_snaps_and_resizes():
    canvas, mask = T.extend_canvas(_src(40, 30), 1.3, "right")
    assert canvas.size[0] % 16 == 0 and canvas.size[1] % 16 == 0 and canvas.size == mask.size
    canvas, mask = T.extend_canvas(_src(40, 30), 1.3, "right", size=(64, 32))
    assert canvas.size == (64, 32)
    m = np.asarray(mask) > 0
    assert not m[:, 0].any() and m[:, -1].all()


def test_extend_canvas_thin_strip_survives():
    # A 1% extension at 64 px is under one output pixel; it must still leave something to generate.
    canvas, mask = T.extend_canvas(_src(64, 64), 1.01, "left")
    m = np.asarray(mask) > 0
    assert m.any() and m[:, 0].all() and not m[:, -1].any()


def test_extend_canvas_bad_arguments():
    with pytest.raises(InputError, match="direction"):
        T.extend_canvas(_src(), 1.5, "diagonal")
    with pytest.raises(InputError, match="ratio"):
        T.extend_canvas(_src(), 1.0, "left")


# ----------------------------------------------------------------------------------------------
# Removal masks and checks
# ----------------------------------------------------------------------------------------------
def test_removal_mask_from_box_is_dilated():
    m = T.removal_mask((64, 64), boxes=[[20, 10, 30, 40]], dilate=3) > 0
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (17, 32, 7, 42)  # [20-3, 29+3] x [10-3, 39+3]
    assert m[7:43, 17:33].all()
    assert not (T.removal_mask((64, 64), boxes=[[20, 10, 30, 40]], dilate=0) > 0)[:, 30].any()


def test_removal_mask_from_user_mask():
    user = np.zeros((32, 32), bool)
    user[10:12, 10:12] = True
    m = T.removal_mask((32, 32), user_mask=user, dilate=2) > 0
    assert m.sum() == 6 * 6 and m[8:14, 8:14].all()
    big = np.zeros((16, 16), np.uint8)
    big[:8] = 1
    m = T.removal_mask((32, 32), user_mask=big, dilate=0)
    assert m.shape == (32, 32) and (m[:16] == 255).all() and (m[16:] == 0).all()


def test_check_mask():
    empty = np.zeros((16, 16), np.uint8)
    full = np.full((16, 16), 255, np.uint8)
    for task in T.TASK_KEYS:
        with pytest.raises(InputError, match="empty"):
            T.check_mask(empty, task, path="x.jsonl", line=2)
    with pytest.raises(InputError, match="all white") as e:
        T.check_mask(full, "removal", path="x.jsonl", line=5)
    assert "x.jsonl:5" in str(e.value) and e.value.field == "mask"
    T.check_mask(full, "fill")  # a full repaint is a valid fill

"""The task registry (paper §4.1-4.2) and the mask builders.

One place that knows which tasks exist, what they are called in the reward query, which
evaluation dimensions judge them, and which prompt they use when the user gives none.
Probabilities and dimensions can be overridden per recipe (`tasks.<key>`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import InputError

TASK_KEYS = ("fill", "extend", "extend_no_prompt", "removal")

# One-line definitions shown to annotators and used in docs.
DIMENSION_DEFINITIONS = {
    "text alignment": "Does the edited region show what the prompt asks for (objects, colours, words)?",
    "consistency": "Does the edit blend with the untouched image: lighting, colour, seams at the mask border?",
    "structure": "Are shapes and objects in the edit well formed, without distortions or broken geometry?",
    "aesthetics": "Is the result pleasing: composition, detail, colour harmony, no artefacts?",
    "removal quality": "Is the object gone, with the hole filled by plausible background and nothing new added?",
}
ALL_DIMENSIONS = tuple(DIMENSION_DEFINITIONS)


def task_prompt(task_cfg, prompt: str | None) -> str:
    """The prompt the generator sees: the fixed prompt for prompt-free tasks, else the user's."""
    if task_cfg.fixed_prompt is not None:
        return task_cfg.fixed_prompt
    return prompt or ""


def sample_task(tasks: dict, rng: random.Random) -> str:
    """Draw a task key with probability p_k (Alg. 1 line 4)."""
    keys = [k for k, t in tasks.items() if t.probability > 0]
    weights = [tasks[k].probability for k in keys]
    return rng.choices(keys, weights=weights, k=1)[0]


def snap16(x: int) -> int:
    return max(16, int(round(x / 16)) * 16)


def fit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(W, H) with about resolution**2 pixels, the same aspect ratio, both multiples of 16."""
    scale = resolution / math.sqrt(width * height)
    return snap16(width * scale), snap16(height * scale)


def is_prompt_free(task_cfg) -> bool:
    return task_cfg.fixed_prompt is not None


# ----------------------------------------------------------------------------------------------
# Masks: uint8 arrays (H, W) with 255 = edit, 0 = keep.
# ----------------------------------------------------------------------------------------------
def load_user_mask(path, size: tuple[int, int], *, where=None, line=None, on_resize=None) -> np.ndarray:
    """Read a user mask, binarise (white = edit), and resize with nearest-neighbour to `size` (W, H).

    A mask whose aspect ratio differs from the image's is an error; the same ratio at another size is
    resized and `on_resize(mask_size, size)` is called so the caller can warn. Transparent pixels of a
    mask with alpha count as black.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                m = Image.alpha_composite(black, rgba).convert("L")
            else:
                m = im.convert("L")
    except Exception as e:  # noqa: BLE001 - any decode failure is bad input
        raise InputError(f"cannot read mask {path} ({e.__class__.__name__})", path=where or path, line=line,
                         field="mask") from None
    W, H = size
    if m.size != (W, H):
        if not math.isclose(m.size[0] / m.size[1], W / H, rel_tol=0.02):
            raise InputError(f"mask is {m.size[0]}x{m.size[1]} but the image is {W}x{H} "
                             f"(different aspect ratio)", path=where or path, line=line, field="mask")
        if on_resize is not None:
            on_resize(m.size, (W, H))
        m = m.resize((W, H), Image.NEAREST)
    return np.where(np.asarray(m) >= 128, 255, 0).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (W, H), binarised to {0, 255}."""
    m = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
    if m.size != tuple(size):
        m = m.resize(tuple(size), Image.NEAREST)
    return np.asarray(m, dtype=np.uint8).copy()


def random_fill_mask(size: tuple[int, int], rng: random.Random, min_frac=0.15, max_frac=0.5,
                     stroke_probability=0.3) -> np.ndarray:
    """A rectangle covering [min_frac, max_frac] of the area, or free-form brush strokes."""
    W, H = size
    img = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(img)
    if rng.random() < stroke_probability:
        width = max(2, int(min(W, H) * rng.uniform(0.08, 0.16)))
        target = rng.uniform(min_frac, max_frac)
        x, y = rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H
        for _ in range(64):
            ang = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.1, 0.3) * min(W, H)
            nx = min(max(x + math.cos(ang) * length, 0), W - 1)
            ny = min(max(y + math.sin(ang) * length, 0), H - 1)
            d.line([(x, y), (nx, ny)], fill=255, width=width)
            d.ellipse([nx - width / 2, ny - width / 2, nx + width / 2, ny + width / 2], fill=255)
            x, y = nx, ny
            if (np.asarray(img) > 0).mean() >= target:
                break
    else:
        frac = rng.uniform(min_frac, max_frac)
        aspect = rng.uniform(0.6, 1.6)
        w = min(W, max(4, int(math.sqrt(frac * W * H * aspect))))
        h = min(H, max(4, int(frac * W * H / w)))
        x0, y0 = rng.randint(0, W - w), rng.randint(0, H - h)
        d.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=255)
    return np.asarray(img, dtype=np.uint8).copy()


EXTEND_DIRECTIONS = ("left", "right", "up", "down", "horizontal", "vertical", "all")


def canvas_size(width: int, height: int, ratio: float, direction: str) -> tuple[int, int]:
    """Size of the extended canvas: `ratio` times longer along `direction` (both axes for "all")."""
    if direction not in EXTEND_DIRECTIONS:
        raise InputError(f"unknown extend direction '{direction}'; one of {', '.join(EXTEND_DIRECTIONS)}",
                         field="direction")
    if not ratio > 1:
        raise InputError(f"extend ratio must be > 1, got {ratio}", field="ratio")
    # At least one new pixel, so a ratio just above 1 still leaves something to generate.
    grow_w = direction in ("left", "right", "horizontal", "all")
    grow_h = direction in ("up", "down", "vertical", "all")
    cw = max(width + 1, int(round(width * ratio))) if grow_w else width
    ch = max(height + 1, int(round(height * ratio))) if grow_h else height
    return cw, ch


def extend_canvas(source: Image.Image, ratio: float, direction: str, size: tuple[int, int] | None = None):
    """Place `source` on a canvas `ratio` times larger along `direction`; the new area is the mask.

    direction: left | right | up | down | horizontal | vertical | all. Returns (canvas, mask), both
    snapped to multiples of 16 (or resized to `size` when given).
    """
    W, H = source.size
    cw, ch = canvas_size(W, H, ratio, direction)
    x0 = {"left": cw - W, "right": 0}.get(direction, (cw - W) // 2)
    y0 = {"up": ch - H, "down": 0}.get(direction, (ch - H) // 2)
    canvas = Image.new("RGB", (cw, ch), (127, 127, 127))
    canvas.paste(source.convert("RGB"), (x0, y0))
    ow, oh = size or (snap16(cw), snap16(ch))
    # The kept box is scaled rather than the mask resized, so a thin new strip cannot vanish: every
    # side that grew keeps at least one edit pixel at the output size.
    sx, sy = ow / cw, oh / ch
    kx0, ky0 = round(x0 * sx), round(y0 * sy)
    kx1, ky1 = round((x0 + W) * sx), round((y0 + H) * sy)
    if x0 > 0:
        kx0 = max(kx0, 1)
    if x0 + W < cw:
        kx1 = min(kx1, ow - 1)
    if y0 > 0:
        ky0 = max(ky0, 1)
    if y0 + H < ch:
        ky1 = min(ky1, oh - 1)
    mask = Image.new("L", (ow, oh), 255)
    mask.paste(0, (kx0, ky0, kx1, ky1))
    return canvas.resize((ow, oh), Image.BICUBIC), mask


def removal_mask(size: tuple[int, int], boxes=(), user_mask: np.ndarray | None = None, dilate: int = 4):
    """Mask for object removal from object boxes [x0, y0, x1, y1] or a user mask, dilated by `dilate` px."""
    W, H = size
    img = Image.new("L", (W, H), 0)
    if user_mask is not None:
        # Any truthy pixel is an edit pixel (bool, 0/1 or 0/255 arrays); the result has the mask's size.
        img = Image.fromarray(np.where(np.asarray(user_mask) > 0, 255, 0).astype(np.uint8))
        if img.size != (W, H):
            img = img.resize((W, H), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for b in boxes:
        x0, y0, x1, y1 = b
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    if dilate > 0:
        img = img.filter(ImageFilter.MaxFilter(2 * dilate + 1))
    return np.asarray(img, dtype=np.uint8).copy()


def choose_object_mask(proposals, rng: random.Random, min_area: float, max_area: float) -> np.ndarray | None:
    """One segmentation proposal to remove: among (bool mask, score) proposals covering [min_area,
    max_area] of the image, one drawn at random (seeded, so a sample always gets the same one), as a
    uint8 mask; None when no proposal is acceptable (the sample has no object to remove)."""
    ok = [m for m, _ in proposals if min_area <= float(np.mean(m)) <= max_area]
    if not ok:
        return None
    return np.where(ok[rng.randrange(len(ok))], 255, 0).astype(np.uint8)


def check_mask(mask: np.ndarray, task: str, *, path=None, line=None):
    """Empty masks are useless for every task; a full mask leaves nothing to remove around."""
    cover = float((mask > 0).mean())
    if cover == 0.0:
        raise InputError("mask is empty (nothing to edit)", path=path, line=line, field="mask")
    if task == "removal" and cover == 1.0:
        raise InputError("mask is all white: object removal needs surrounding context", path=path,
                         line=line, field="mask")


@dataclass(frozen=True)
class Triplet:
    """One sample: (I_src, M, P) for one task (paper §4.2)."""
    id: str
    task: str
    source: str
    mask: str
    prompt: str

"""OneReward (paper §4.3): the query template, the P(yes) scorer, the eq. 3 loss, accuracy tables.

One reward implementation is shared by reward training, RL and GSB evaluation:

    scorer = RewardScorer.load("zoo:qwen2.5-vl", recipe.reward)
    q = build_query(recipe.tasks["fill"], "aesthetics", prompt="a red circle")
    p = scorer.p_yes(x_theta, x_ref, [[q]])           # list of (Q_i,) tensors, differentiable

P(yes) is the probability of the answer token "yes" right after the chat template's
"<|im_start|>assistant\\n", normalised per `reward.normalise`: `two_way` = softmax over the {yes, no}
logits (robust on an untuned VLM), `full_vocab` = softmax over the whole vocabulary (what eq. 3
trains). The eq. 3 loss is always the full-vocabulary cross-entropy on the answer token.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import InputError

# Paper Fig. 3, word for word; {first}/{second} are "first"/"second" or "**first**"/"**second**".
QUERY_TEMPLATE = ('Both of these two images are generated results of {task}. Please evaluate the difference of '
                  'the two images. Is the {first} image better than the {second} one? Please answer "yes" or "no". '
                  'The evaluation criteria is {dimension}.')
# Appended (with its leading space) only when the dimension is text alignment: Fig. 3's <...> part.
PROMPT_SUFFIX = ' The prompt of the two image is {prompt}.'
# Ablation queries (Table 1 rows "+task" and "Qwen2.5VL*"): the same template with the dimension
# sentence dropped ("task") and, in addition, " of [TASK]" dropped ("none").
TASK_ONLY_TEMPLATE = ('Both of these two images are generated results of {task}. Please evaluate the difference of '
                      'the two images. Is the {first} image better than the {second} one? '
                      'Please answer "yes" or "no".')
NO_TASK_TEMPLATE = ('Both of these two images are generated results. Please evaluate the difference of '
                    'the two images. Is the {first} image better than the {second} one? Please answer "yes" or "no".')
# Table 4's "fixed query": every pair asked as object removal / removal quality.
FIXED_TASK, FIXED_DIMENSION = "object removal", "removal quality"
QUERY_MODES = ("full", "task", "none", "fixed")
TEXT_ALIGNMENT = "text alignment"
REWARD_META = "onereward_reward.json"


# ----------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------
def build_query(task_cfg, dimension: str, prompt: str | None = None, mode: str = "full", bold: bool = False) -> str:
    """The evaluation query q = Φ(s_k, e, P) of eq. 1.

    full:  Fig. 3 with [TASK] = task_cfg.name, [DIMENSION] = dimension, plus the prompt sentence
           for text alignment.
    task:  Fig. 3 without the final "The evaluation criteria is ..." sentence. No prompt sentence:
           adding it only to text-alignment pairs would tell the model the dimension.
    none:  as `task` and also without " of [TASK]".
    fixed: Fig. 3 with "object removal" / "removal quality" for every pair, no prompt sentence.
    A text-alignment pair must carry a prompt in every mode (it is bad data otherwise).
    """
    if mode not in QUERY_MODES:
        raise InputError(f"unknown query mode '{mode}'; modes: {', '.join(QUERY_MODES)}", field="reward.query_mode")
    if dimension not in task_cfg.dimensions:
        raise InputError(f"'{dimension}' is not a dimension of {task_cfg.name} "
                         f"(its dimensions: {', '.join(task_cfg.dimensions)})", field="dimension")
    if dimension == TEXT_ALIGNMENT and not (prompt or "").strip():
        raise InputError("a text alignment pair needs its prompt", field="prompt")
    first, second = ("**first**", "**second**") if bold else ("first", "second")
    if mode == "task":
        return TASK_ONLY_TEMPLATE.format(task=task_cfg.name, first=first, second=second)
    if mode == "none":
        return NO_TASK_TEMPLATE.format(first=first, second=second)
    if mode == "fixed":
        return QUERY_TEMPLATE.format(task=FIXED_TASK, dimension=FIXED_DIMENSION, first=first, second=second)
    q = QUERY_TEMPLATE.format(task=task_cfg.name, dimension=dimension, first=first, second=second)
    if dimension == TEXT_ALIGNMENT:
        q += PROMPT_SUFFIX.format(prompt=prompt.strip())
    return q


# ----------------------------------------------------------------------------------------------
# Eq. 3
# ----------------------------------------------------------------------------------------------
def yes_no_logprobs(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """(S, V) answer-position logits -> (S, 2) full-vocabulary log P(yes), log P(no)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp[:, [yes_id, no_id]]


def eq3_loss(logp_forward: torch.Tensor, logp_reverse: torch.Tensor) -> torch.Tensor:
    """Eq. 3: -1/2 E[log P(yes | x_w, x_l, q) + log P(no | x_l, x_w, q)].

    logp_forward / logp_reverse: (B, 2) full-vocabulary log-probabilities of (yes, no) with the
    winner shown first / second (from `yes_no_logprobs`). Full vocabulary, so this is exactly the
    standard next-token cross-entropy on the answer token, averaged over both orders.
    """
    return -0.5 * (logp_forward[:, 0] + logp_reverse[:, 1]).mean()


def p_yes_from_logits(logits: torch.Tensor, yes_id: int, no_id: int, normalise: str) -> torch.Tensor:
    """(S, V) -> (S,) P(yes): two_way = sigmoid(l_yes - l_no); full_vocab = softmax(l)[yes]."""
    logits = logits.float()
    if normalise == "two_way":
        return torch.sigmoid(logits[:, yes_id] - logits[:, no_id])
    if normalise == "full_vocab":
        return torch.softmax(logits, dim=-1)[:, yes_id]
    raise InputError(f"unknown normalisation '{normalise}'", field="reward.normalise")


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------
_WARNED_NO_SIZE: set[str] = set()


def check_trained_size(trained_with: dict, image_size: int, max_pixels: int, meta_path):
    """A judge trained on images of one pixel budget scores another budget as a different function:
    refuse the mismatch. Records written before `image_size` was kept: warn once per model."""
    if "image_size" not in trained_with:
        if str(meta_path) not in _WARNED_NO_SIZE:
            _WARNED_NO_SIZE.add(str(meta_path))
            import warnings

            warnings.warn(f"{meta_path}: no image_size recorded; cannot check that reward.image_size={image_size} "
                          "is the size this reward model was trained at", UserWarning, stacklevel=3)
        return
    if trained_with["image_size"] != image_size:
        raise InputError(f"the reward model was trained at {trained_with['image_size']} px, the recipe says "
                         f"{image_size}: set reward.image_size={trained_with['image_size']}", path=meta_path,
                         field="reward.image_size")
    if "max_pixels" in trained_with and trained_with["max_pixels"] != max_pixels:
        raise InputError(f"the reward model was trained with at most {trained_with['max_pixels']} pixels per image, "
                         f"this processor allows {max_pixels}", path=meta_path, field="reward.image_size")


class RewardScorer:
    """A Qwen2/2.5-VL checkpoint asked "is the first image better than the second?".

    Images are float tensors in [0, 1], (N, 3, H, W) or lists of (3, H, W). Everything from pixels
    to P(yes) is torch, so gradients reach the images (ReFL, eq. 4-5).
    """

    def __init__(self, model, processor, *, yes_id: int, no_id: int, normalise: str = "two_way",
                 max_pixels: int | None = None, path: str = "", trained_with: dict | None = None):
        from .models.qwen_vl import Judge, PromptBuilder, TorchImageProcessor

        self.model, self.processor = model, processor
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.normalise = normalise
        self.path = path
        self.trained_with = trained_with
        self.image_processor = TorchImageProcessor(processor.image_processor, max_pixels=max_pixels)
        self.model_dtype = next(model.parameters()).dtype  # what the checkpoint was loaded in
        # Set by train-reward when fp32 master weights sit next to bf16 ones: forwards run under autocast.
        self.autocast_dtype: torch.dtype | None = None
        self.prompts = PromptBuilder(processor)
        # What computes logits; train-reward swaps in the accelerate-prepared (DDP/FSDP) wrapper.
        self.judge = Judge(model)

    @classmethod
    def load(cls, spec: str, reward_cfg, device="cpu", dtype=torch.float32, trainable: bool = False):
        """Load from a zoo spec, hub id or path. Frozen and in eval mode unless `trainable`."""
        from .models.qwen_vl import load_vlm, single_token_id

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model, processor, path = load_vlm(spec, dtype=dtype, device=device)
        tok = processor.tokenizer
        yes_id = single_token_id(tok, reward_cfg.yes_token, path, "reward.yes_token")
        no_id = single_token_id(tok, reward_cfg.no_token, path, "reward.no_token")
        if yes_id == no_id:
            raise InputError(f"checkpoint '{path}': yes and no map to the same token", field="reward.no_token")
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        meta_path = Path(path) / REWARD_META
        trained_with = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if trained_with:
            differ = [k for k in ("query_mode", "bold", "yes_token", "no_token")
                      if k in trained_with and trained_with[k] != getattr(reward_cfg, k)]
            if differ:
                import warnings

                warnings.warn(f"reward model {path} was trained with " + ", ".join(
                    f"reward.{k}={trained_with[k]!r}" for k in differ) + " but the recipe says " + ", ".join(
                    f"{getattr(reward_cfg, k)!r}" for k in differ), UserWarning, stacklevel=2)
        scorer = cls(model, processor, yes_id=yes_id, no_id=no_id, normalise=reward_cfg.normalise,
                     max_pixels=reward_cfg.image_size ** 2, path=path, trained_with=trained_with)
        if trained_with is not None and not trainable:  # training may move a judge to a new size on purpose
            check_trained_size(trained_with, reward_cfg.image_size, scorer.image_processor.max_pixels, meta_path)
        return scorer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def enable_activation_checkpointing(self):
        """Recompute decoder/ViT blocks in the backward pass (less memory when backpropagating to the
        pixels in RL). HF only checkpoints in train mode; Qwen-VL has no dropout, so train mode
        changes nothing else."""
        from .models.qwen_vl import unwrap

        m = unwrap(self.model)
        fn = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
        fn()
        self.model.train()

    # -- preprocessing ------------------------------------------------------------------------
    def preprocess(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, image_grid_thw) equal to the HF processor's for the same images."""
        return self.image_processor(images)

    # -- core ---------------------------------------------------------------------------------
    def _to_device(self, images):
        d = self.device
        return images.to(d) if torch.is_tensor(images) else [im.to(d) for im in images]

    def batch(self, images, seqs: list[tuple[int, int, str]]):
        """SequenceBatch for unique `images` and (index of first, index of second, query) triples."""
        from .models.qwen_vl import SequenceBatch

        device = self.device
        pixel_values, grid = self.preprocess(self._to_device(images))
        merge2 = self.image_processor.merge ** 2
        n_tokens = (grid.prod(-1) // merge2).tolist()
        text = self.prompts.batch([(q, n_tokens[i], n_tokens[j]) for i, j, q in seqs], device=device)
        seq_images = torch.tensor([[i, j] for i, j, _ in seqs], dtype=torch.long, device=device)
        return SequenceBatch(pixel_values=pixel_values, image_grid_thw=grid.to(device), seq_images=seq_images,
                             **text)

    def logits(self, images, seqs: list[tuple[int, int, str]]) -> torch.Tensor:
        """(S, V) float32 answer-position logits; the ViT runs once per unique image."""
        if not seqs:
            return torch.zeros((0, 0), device=self.device)
        with self._autocast():
            return self.judge(**self.batch(images, seqs).as_kwargs()).float()

    def _autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def logits_per_query(self, images, seqs: list[tuple[int, int, str]]) -> torch.Tensor:
        """Reference path: one plain `model(pixel_values=...)` forward per sequence (no sharing)."""
        pixel_values, grid = self.preprocess(self._to_device(images))
        sizes = grid.prod(-1).tolist()
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        merge2 = self.image_processor.merge ** 2
        rows = []
        for i, j, q in seqs:
            text = self.prompts.batch([(q, sizes[i] // merge2, sizes[j] // merge2)], device=self.device)
            pv = torch.cat([pixel_values[starts[i]:starts[i + 1]], pixel_values[starts[j]:starts[j + 1]]])
            with self._autocast():
                out = self.model(pixel_values=pv, image_grid_thw=grid[[i, j]].to(self.device), use_cache=False,
                                 logits_to_keep=1, **text)
            rows.append(out.logits[:, -1].float())
        return torch.cat(rows)

    @staticmethod
    def _pair_seqs(first, second, queries) -> tuple[list, list[tuple[int, int, str]], list[int]]:
        n = len(first)
        if len(second) != n or len(queries) != n:
            raise ValueError(f"first ({len(first)}), second ({len(second)}) and queries ({len(queries)}) "
                             f"must have the same length")
        images = torch.cat([first, second]) if torch.is_tensor(first) and torch.is_tensor(second) \
            and first.shape[1:] == second.shape[1:] else list(first) + list(second)
        seqs = [(i, n + i, q) for i, qs in enumerate(queries) for q in qs]
        return images, seqs, [len(qs) for qs in queries]

    def _pair_logits(self, first, second, queries, share_vision: bool):
        images, seqs, counts = self._pair_seqs(first, second, queries)
        lg = self.logits(images, seqs) if share_vision else self.logits_per_query(images, seqs)
        return lg, counts

    # -- public scoring -----------------------------------------------------------------------
    def answer_logits(self, first, second, queries: list[list[str]], share_vision: bool = True) -> list[torch.Tensor]:
        """Raw (yes, no) logits: one (Q_i, 2) tensor per pair."""
        lg, counts = self._pair_logits(first, second, queries, share_vision)
        return list(torch.split(lg[:, [self.yes_id, self.no_id]], counts))

    def answer_logprobs(self, first, second, queries: list[list[str]], share_vision: bool = True) -> list[torch.Tensor]:
        """Full-vocabulary log P(yes), log P(no): one (Q_i, 2) tensor per pair."""
        lg, counts = self._pair_logits(first, second, queries, share_vision)
        return list(torch.split(yes_no_logprobs(lg, self.yes_id, self.no_id), counts))

    def p_yes(self, first, second, queries: list[list[str]], share_vision: bool = True) -> list[torch.Tensor]:
        """P(yes | first, second, q) per `normalise`: one (Q_i,) tensor per pair, differentiable."""
        lg, counts = self._pair_logits(first, second, queries, share_vision)
        return list(torch.split(p_yes_from_logits(lg, self.yes_id, self.no_id, self.normalise), counts))

    def both_orders_logprobs(self, winners, losers, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) full-vocab log-probs with the winner first and with it second: the inputs of eq. 3.
        Both orders of a pair share one ViT pass."""
        images, seqs, _ = self._pair_seqs(winners, losers, [[q] for q in queries])
        n = len(queries)
        seqs = [s for i, q in enumerate(queries) for s in ((i, n + i, q), (n + i, i, q))]
        lp = yes_no_logprobs(self.logits(images, seqs), self.yes_id, self.no_id)
        return lp[0::2], lp[1::2]


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------
PAIR_SCHEMA = {"sample_id": ((str, int), True), "task": (str, True), "dimension": (str, True),
               "prompt": (str, False), "winner": (str, True), "loser": (str, True), "source": (str, False),
               "mask": (str, False), "annotator": (str, False), "margin": (float, False)}


def _check_image(path: Path, where, line: int, field: str):
    from PIL import Image

    if not path.is_file():
        raise InputError(f"image not found: {path}", path=where, line=line, field=field)
    try:
        with Image.open(path) as im:
            im.verify()  # reads every chunk and checks CRCs without keeping the pixels
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read image {path} ({e.__class__.__name__})", path=where, line=line,
                         field=field) from None


def load_pairs(path, tasks: dict, *, check_images: bool = True) -> list[dict]:
    """Read and validate a pairs JSONL (export-pairs format). Paths become absolute.

    Bad lines (unknown task or dimension, text alignment without prompt, missing or unreadable
    image) raise InputError naming file, line and field."""
    from .artifacts import read_jsonl

    path = Path(path)
    root = path.parent
    pairs = read_jsonl(path, PAIR_SCHEMA)
    checked: set[Path] = set()
    for rec in pairs:
        line = rec["_line"]
        if rec["task"] not in tasks:
            raise InputError(f"unknown task '{rec['task']}'; recipe tasks: {', '.join(tasks)}", path=path,
                             line=line, field="task")
        cfg = tasks[rec["task"]]
        if rec["dimension"] not in cfg.dimensions:
            raise InputError(f"unknown dimension '{rec['dimension']}' for task {rec['task']} "
                             f"(dimensions: {', '.join(cfg.dimensions)})", path=path, line=line, field="dimension")
        prompt = rec.get("prompt") or ""
        if rec["dimension"] == TEXT_ALIGNMENT and not prompt.strip():
            raise InputError("a text alignment pair needs its prompt", path=path, line=line, field="prompt")
        rec["prompt"] = prompt
        for key in ("winner", "loser"):
            p = Path(rec[key])
            p = p if p.is_absolute() else root / p
            rec[key] = str(p)
            if check_images and p not in checked:
                _check_image(p, path, line, key)
                checked.add(p)
    return pairs


def load_image_tensor(path) -> torch.Tensor:
    """PNG/JPEG -> (3, H, W) float32 in [0, 1]."""
    import numpy as np

    from .artifacts import open_image

    arr = np.asarray(open_image(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageCache:
    """A small LRU of decoded images: pairs of one sample share images across dimensions."""

    def __init__(self, capacity: int = 256):
        self.capacity, self._d = capacity, OrderedDict()

    def __call__(self, path: str) -> torch.Tensor:
        if path in self._d:
            self._d.move_to_end(path)
            return self._d[path]
        t = load_image_tensor(path)
        self._d[path] = t
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return t


def pair_batch_inputs(pairs: list[dict], queries: list[str], images: ImageCache):
    """Unique images of a batch of pairs and the (winner, loser, q) / (loser, winner, q) sequences."""
    index: dict[str, int] = {}
    tensors = []
    for p in pairs:
        for key in ("winner", "loser"):
            if p[key] not in index:
                index[p[key]] = len(tensors)
                tensors.append(images(p[key]))
    seqs = []
    for p, q in zip(pairs, queries):
        w, lo = index[p["winner"]], index[p["loser"]]
        seqs += [(w, lo, q), (lo, w, q)]
    return tensors, seqs


# ----------------------------------------------------------------------------------------------
# Accuracy (Table 1 / Table 4)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def score_pairs(scorer: RewardScorer, pairs: list[dict], task_cfgs: dict, mode: str = "full", *, bold: bool = False,
                batch_size: int = 8, progress=None, images: ImageCache | None = None) -> list[tuple[float, float]]:
    """[(P(yes | winner, loser, q), P(yes | loser, winner, q))] per pair, in order."""
    images = images or ImageCache()
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        queries = [build_query(task_cfgs[p["task"]], p["dimension"], p.get("prompt"), mode, bold) for p in chunk]
        tensors, seqs = pair_batch_inputs(chunk, queries, images)
        pv = p_yes_from_logits(scorer.logits(tensors, seqs), scorer.yes_id, scorer.no_id, scorer.normalise)
        out += [(float(a), float(b)) for a, b in zip(pv[0::2].tolist(), pv[1::2].tolist())]
        if progress is not None:
            progress(len(chunk))
    return out


def accuracy_report(pairs: list[dict], probs: list[tuple[float, float]], task_cfgs: dict, *, mode: str = "full",
                    normalise: str = "two_way") -> dict:
    """Per (task, dimension) cell, in recipe order (tasks sharing a name share a column, as in Table 1):

    accuracy:            share with P(yes | w, l) > 0.5 (the paper's Table 1 number)
    symmetric_accuracy:  share with P(yes | w, l) > P(yes | l, w) (order-symmetric)
    winner_first / winner_second: accuracy when the winner is shown first (P(yes|w,l) > 0.5) and
                         second (P(yes|l,w) < 0.5); position_bias = their difference (> 0: says yes
                         too easily, < 0: says no too easily).
    """
    order = []
    for cfg in task_cfgs.values():
        for d in cfg.dimensions:
            if (cfg.name, d) not in order:
                order.append((cfg.name, d))
    acc: dict = {}
    for p, (pf, pr) in zip(pairs, probs):
        key = (task_cfgs[p["task"]].name, p["dimension"])
        acc.setdefault(key, []).append((pf, pr))

    def summarise(rows):
        n = len(rows)
        wf = sum(pf > 0.5 for pf, _ in rows) / n
        ws = sum(pr < 0.5 for _, pr in rows) / n
        return {"n": n, "accuracy": wf, "symmetric_accuracy": sum(pf > pr for pf, pr in rows) / n,
                "winner_first": wf, "winner_second": ws, "position_bias": wf - ws,
                "mean_p_yes_winner_first": sum(pf for pf, _ in rows) / n,
                "mean_p_yes_winner_second": sum(pr for _, pr in rows) / n}

    cells = [dict(task=t, dimension=d, **summarise(acc[(t, d)])) for t, d in order if (t, d) in acc]
    everything = [r for rows in acc.values() for r in rows]
    return {"mode": mode, "normalise": normalise, "pairs": len(pairs), "cells": cells,
            "overall": summarise(everything) if everything else None}


def evaluate_pairs(scorer: RewardScorer, pairs: list[dict], task_cfgs: dict, mode: str = "full", *,
                   bold: bool = False, batch_size: int = 8, progress=None) -> dict:
    """Table 1/4 accuracy of `scorer` on `pairs` (from `load_pairs`) asked with query `mode`."""
    probs = score_pairs(scorer, pairs, task_cfgs, mode, bold=bold, batch_size=batch_size, progress=progress)
    return accuracy_report(pairs, probs, task_cfgs, mode=mode, normalise=scorer.normalise)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def accuracy_table(report: dict, title: str = "Reward model accuracy (%)", baseline: dict | None = None):
    """A rich Table in the paper's Table 1 layout: one column per task/dimension, one row per metric."""
    from rich.table import Table

    t = Table(title=title, caption="acc: P(yes|w,l) > 0.5 (Table 1)  sym: P(yes|w,l) > P(yes|l,w)  "
                                   "w1st/w2nd: accuracy with the winner shown first/second  bias: w1st - w2nd",
              caption_justify="left")
    t.add_column("", style="bold", no_wrap=True)
    for c in report["cells"]:
        t.add_column(f"{c['task']}\n{c['dimension']}", justify="right")
    t.add_column("all", justify="right", style="bold")
    cells = report["cells"] + [report["overall"] or {}]
    if baseline is not None:
        bmap = {(c["task"], c["dimension"]): c for c in baseline["cells"]}
        base = [bmap.get((c["task"], c["dimension"])) for c in report["cells"]] + [baseline.get("overall")]
        t.add_row("acc before", *[_pct(b and b["accuracy"]) for b in base], style="dim")
    for label, key in (("acc", "accuracy"), ("sym", "symmetric_accuracy"), ("w1st", "winner_first"),
                       ("w2nd", "winner_second"), ("bias", "position_bias")):
        t.add_row(label, *[_pct(c.get(key)) for c in cells])
    t.add_row("pairs", *[str(c.get("n", 0)) for c in cells])
    return t


def plot_accuracy(report: dict, path, baseline: dict | None = None, title: str = "Reward model accuracy"):
    """Bar chart: accuracy and order-symmetric accuracy per task/dimension (and before training)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .artifacts import write_bytes

    cells = report["cells"]
    labels = [f"{c['task']}\n{c['dimension']}" for c in cells]
    series = []
    if baseline is not None:
        bmap = {(c["task"], c["dimension"]): c["accuracy"] for c in baseline["cells"]}
        series.append(("accuracy before training", [bmap.get((c["task"], c["dimension"]), 0.0) for c in cells]))
    series.append(("accuracy", [c["accuracy"] for c in cells]))
    series.append(("order-symmetric accuracy", [c["symmetric_accuracy"] for c in cells]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cells) + 2), 4.0))
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [100 * v for v in vals], width=width, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cells)), labels, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"{title} (query: {report['mode']}, {report['pairs']} test pairs)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def save_accuracy(report: dict, out_dir, name: str = "accuracy", baseline: dict | None = None):
    """OUT/<name>.json and OUT/<name>.png (atomic writes)."""
    from .artifacts import write_json

    out_dir = Path(out_dir)
    write_json(out_dir / f"{name}.json", report)
    if report["cells"]:
        plot_accuracy(report, out_dir / f"{name}.png", baseline=baseline)

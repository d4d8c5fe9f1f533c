"""An on-disk cache of prompt embeddings, so no stage holds every prompt's embeddings in memory.

At FLUX scale a T5 embedding is 512 x 4096 values (4 MiB in bf16): 100k conditions are ~400 GiB.
Stages encode their distinct prompts `text_cache.batch_size` at a time, write each batch as one
safetensors shard (atomically: a killed encode leaves whole shards only, and resuming encodes just
the prompts no shard holds yet), and later read back only the rows a batch needs.

Shards live in `<root>/<key>/`, where the key hashes everything the embeddings depend on besides the
prompt text: both text encoders (class, config, dtype, device type and a checksum of every weight),
both tokenizers (class, vocabulary, lengths) and max_sequence_length. A different or retrained text
encoder therefore gets a folder of its own and never reads stale embeddings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from .errors import InputError

SHARD_GLOB = "shard-*.safetensors"
SHARD_FORMAT = "onereward.text_cache.shard.v1"


def _module_identity(m) -> dict:
    """Class, config, dtype and a weight checksum (float64 sum and sum of squares per tensor): cheap
    next to an encode, and any retrained or swapped weight changes it."""
    import torch

    cfg = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
    cfg.pop("_name_or_path", None)  # the same weights copied elsewhere are the same encoder
    sums = []
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            sums.append((name, tuple(t.shape), str(t.dtype),
                         torch.sum(t, dtype=torch.float64), torch.sum(t.double() ** 2)))
    values = torch.stack([v for s in sums for v in s[3:]]).tolist() if sums else []
    weights = hashlib.sha256()
    for (name, shape, dtype, *_), a, b in zip(sums, values[0::2], values[1::2]):
        weights.update(f"{name}:{shape}:{dtype}:{a:.12e}:{b:.12e};".encode())
    device = next(m.parameters()).device.type if any(True for _ in m.parameters()) else "cpu"
    return {"class": type(m).__name__, "config": cfg, "device": device, "weights": weights.hexdigest()}


def _tokenizer_identity(tok) -> dict:
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return {"class": type(tok).__name__, "vocab": vocab, "model_max_length": int(tok.model_max_length),
            "padding_side": tok.padding_side}


def encoder_identity(pipe, max_sequence_length: int) -> dict:
    """What a prompt's embedding depends on besides its text (see the module docstring)."""
    ident = {"format": "onereward.text_cache.v1", "max_sequence_length": int(max_sequence_length)}
    for name in ("text_encoder", "text_encoder_2"):
        ident[name] = _module_identity(getattr(pipe, name))
    for name in ("tokenizer", "tokenizer_2"):
        ident[name] = _tokenizer_identity(getattr(pipe, name))
    return ident


def cache_root(recipe, out) -> Path:
    """`text_cache.dir` when the recipe names one (stages then share it), else OUT/text_cache."""
    return Path(recipe.text_cache.dir).expanduser() if recipe.text_cache.dir else Path(out) / "text_cache"


class TextCache:
    """Prompt -> embedding rows in shards under `<root>/<key>/`; `ensure` encodes, `get` reads rows.

    `max_rows` is the most rows one `get` returned: callers that read per batch keep it at the batch
    size (the tests check that the embeddings on the device are bounded by the batch).
    """

    def __init__(self, root, pipe, max_sequence_length: int, batch_size: int = 64):
        self.pipe, self.max_sequence_length, self.batch_size = pipe, int(max_sequence_length), int(batch_size)
        ident = encoder_identity(pipe, max_sequence_length)
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.dir = Path(root) / key
        self.identity = ident
        self.index: dict[str, tuple[Path, int]] = {}
        self.max_rows = 0
        self.encoded = 0  # prompts encoded by this object (0 on a run whose cache was complete)
        self.refresh()

    def refresh(self):
        """(Re)read the shard headers: the prompts each holds. Sorted, so duplicates resolve alike."""
        from safetensors import safe_open

        self.index = {}
        for shard in sorted(self.dir.glob(SHARD_GLOB)):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})["text_cache"])
                if meta["format"] != SHARD_FORMAT:
                    raise ValueError(meta["format"])
                prompts = meta["prompts"]
            except Exception as e:  # noqa: BLE001 - any unreadable shard is reported the same way
                raise InputError(f"unreadable text-embedding cache shard ({e.__class__.__name__}); delete it "
                                 "to encode its prompts again", path=shard) from None
            for row, p in enumerate(prompts):
                self.index.setdefault(p, (shard, row))

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, prompts: Iterable[str]) -> list[str]:
        return sorted({p for p in prompts if p not in self.index})

    def ensure(self, prompts: Iterable[str], device=None) -> int:
        """Encode every prompt no shard holds, `batch_size` at a time, one shard per batch. The missing
        prompts are sorted before batching, so a resumed encode forms the batches the killed one would
        have formed next. Returns how many were encoded."""
        from .artifacts import save_tensors, write_json
        from .rollout import encode_prompts

        todo = self.missing(prompts)
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "identity.json").exists():  # what the key stands for, for a reader
            write_json(self.dir / "identity.json", self.identity)
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i:i + self.batch_size]
            emb = encode_prompts(self.pipe, batch, self.max_sequence_length, device=device)
            name = hashlib.sha256(json.dumps(batch).encode()).hexdigest()[:16]
            shard = self.dir / f"shard-{name}.safetensors"
            # One metadata key: safetensors writes several in a per-process random order, and a
            # shard must be byte-identical whichever run wrote it.
            save_tensors(shard, {"prompt_embeds": emb.prompt_embeds, "pooled_prompt_embeds": emb.pooled_prompt_embeds,
                                 "text_ids": emb.text_ids},
                         metadata={"text_cache": json.dumps({"format": SHARD_FORMAT, "prompts": batch})})
            for row, p in enumerate(batch):
                self.index.setdefault(p, (shard, row))
            self.encoded += len(batch)
        return len(todo)

    def get(self, prompts: Sequence[str], device=None, dtype=None):
        """TextEmbeds for these prompts in this order (repeats allowed), read from the shards: only
        the distinct rows asked for are loaded."""
        import torch
        from safetensors import safe_open

        from .rollout import TextEmbeds

        prompts = list(prompts)
        absent = [p for p in prompts if p not in self.index]
        if absent:
            raise KeyError(f"prompts not in the text-embedding cache: {absent[:3]}")
        uniq = list(dict.fromkeys(prompts))
        by_shard: dict[Path, list[str]] = {}
        for p in uniq:
            by_shard.setdefault(self.index[p][0], []).append(p)
        rows = {}
        text_ids = None
        for shard, ps in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                pe, pooled = f.get_slice("prompt_embeds"), f.get_slice("pooled_prompt_embeds")
                for p in ps:
                    r = self.index[p][1]
                    rows[p] = (pe[r:r + 1], pooled[r:r + 1])
                if text_ids is None:
                    text_ids = f.get_tensor("text_ids")
        self.max_rows = max(self.max_rows, len(uniq))
        pos = {p: i for i, p in enumerate(uniq)}
        take = [pos[p] for p in prompts]
        pe = torch.cat([rows[p][0] for p in uniq])[take]
        pooled = torch.cat([rows[p][1] for p in uniq])[take]
        return TextEmbeds(pe, pooled, text_ids, tuple(prompts)).to(device=device, dtype=dtype)

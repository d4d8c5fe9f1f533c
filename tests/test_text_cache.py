"""The on-disk prompt-embedding cache (text_cache.py) and its use by rl: exact rows, a key that changes
with the text encoder, resume after a kill, and only one batch's embeddings on the device."""
import json

import pytest
import torch

from onereward_cli import rl
from onereward_cli import rollout as R
from onereward_cli.errors import InputError
from onereward_cli.models.flux_fill import load_fill_pipeline
from onereward_cli.recipe import load_recipe
from onereward_cli.text_cache import TextCache

SEQ = 16
PROMPTS = ["a red circle", "remove", "a blue star", "high-definition, perfect composition", "a green square"]


@pytest.fixture(scope="module")
def pipe(zoo):
    return load_fill_pipeline("zoo:flux-fill")


def _equal(a, b):
    return (torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)
            and torch.equal(a.text_ids, b.text_ids))


def test_cached_rows_equal_a_fresh_encode_exactly(pipe, tmp_path):
    cache = TextCache(tmp_path, pipe, SEQ, batch_size=2)
    assert cache.ensure(PROMPTS) == 5 and len(list(cache.dir.glob("shard-*.safetensors"))) == 3  # 2 + 2 + 1
    assert cache.ensure(PROMPTS) == 0  # nothing encoded twice
    order = sorted(PROMPTS)
    fresh = R.TextEmbeds.cat([R.encode_prompts(pipe, order[i:i + 2], SEQ) for i in range(0, 5, 2)])
    ask = ["remove", "a red circle", "remove", "a green square"]  # any order, repeats
    got = cache.get(ask)
    assert got.prompts == tuple(ask) and _equal(got, fresh.lookup(ask))
    # A new cache object over the same folder (a later stage or run) reads the same rows, encodes nothing.
    again = TextCache(tmp_path, pipe, SEQ, batch_size=2)
    assert again.dir == cache.dir and again.ensure(PROMPTS) == 0 and _equal(again.get(ask), got)
    assert again.max_rows == 3  # distinct rows loaded by the one get
    with pytest.raises(KeyError):
        again.get(["never encoded"])


def test_key_changes_with_the_text_encoder_and_sequence_length(pipe, tmp_path):
    base = TextCache(tmp_path, pipe, SEQ).dir
    assert TextCache(tmp_path, pipe, SEQ + 1).dir != base
    other = load_fill_pipeline("zoo:flux-fill")
    assert TextCache(tmp_path, other, SEQ).dir == base  # same weights loaded again: same key
    for enc in ("text_encoder", "text_encoder_2"):
        m = getattr(other, enc)
        p = next(m.parameters())
        with torch.no_grad():
            p.view(-1)[0] += 1e-3
        assert TextCache(tmp_path, other, SEQ).dir != base, enc
        with torch.no_grad():
            p.view(-1)[0] -= 1e-3
    other.tokenizer_2.add_tokens(["<new-token>"])
    assert TextCache(tmp_path, other, SEQ).dir != base  # a tokenizer change too


def test_a_killed_encode_resumes_without_re_encoding_finished_shards(pipe, tmp_path, monkeypatch):
    calls = []
    real = R.encode_prompts

    def dies_on_the_second_batch(p, prompts, *a, **k):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-encode
        return real(p, prompts, *a, **k)

    monkeypatch.setattr(R, "encode_prompts", dies_on_the_second_batch)
    cache = TextCache(tmp_path / "a", pipe, SEQ, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(PROMPTS)
    first = sorted(cache.dir.glob("shard-*.safetensors"))
    assert len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    (cache.dir / ".shard-0123456789abcdef.safetensors.a1b2c3d4.safetensors").write_bytes(b"torn")  # a kill's temp
    monkeypatch.setattr(R, "encode_prompts", real)
    calls.clear()
    monkeypatch.setattr(R, "encode_prompts", lambda p, prompts, *a, **k: calls.append(list(prompts)) or real(p, prompts, *a, **k))
    resumed = TextCache(tmp_path / "a", pipe, SEQ, batch_size=2)
    assert resumed.ensure(PROMPTS) == 3
    order = sorted(PROMPTS)
    assert calls == [order[2:4], order[4:]]  # the batches the killed run would have formed next
    assert first[0].stat().st_mtime_ns == mtime  # the finished shard was not rewritten
    whole = TextCache(tmp_path / "b", pipe, SEQ, batch_size=2)
    whole.ensure(PROMPTS)
    assert ([p.name for p in sorted(resumed.dir.glob("shard-*"))] == [p.name for p in sorted(whole.dir.glob("shard-*"))])
    assert _equal(resumed.get(PROMPTS), whole.get(PROMPTS))


def test_an_unreadable_shard_is_an_input_error_naming_it(pipe, tmp_path):
    cache = TextCache(tmp_path, pipe, SEQ)
    cache.ensure(PROMPTS[:2])
    shard = next(cache.dir.glob("shard-*.safetensors"))
    shard.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=r"shard-.*: unreadable text-embedding cache shard"):
        TextCache(tmp_path, pipe, SEQ)


def test_bad_batch_size_is_a_recipe_error():
    with pytest.raises(InputError, match="text_cache.batch_size: must be positive"):
        load_recipe("tiny", ["text_cache.batch_size=0"])


# ----------------------------------------------------------------------------------------------
# rl
# ----------------------------------------------------------------------------------------------
RL_SET = ["rl.resolution=32", "rl.rollout_steps=3", "rl.t1=1", "rl.t2=2", "rl.batch_size=2",
          "reward.image_size=28", "rl.lora_rank=2", "rl.lora_alpha=2", f"rl.max_sequence_length={SEQ}"]


@pytest.fixture(scope="module")
def conditions(tmp_path_factory, zoo):
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("tc-cond")
    rng = np.random.default_rng(0)
    recs = []
    for i, (task, prompt) in enumerate([("fill", "a red circle"), ("fill", "a blue star"),
                                        ("extend", "a green square"), ("removal", "")]):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(d / f"src{i}.png")
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 8:24] = 255
        Image.fromarray(m).save(d / f"m{i}.png")
        recs.append({"id": f"s{i}", "task": task, "source": f"src{i}.png", "mask": f"m{i}.png", "prompt": prompt})
    (d / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "triplets.jsonl"


def test_rl_holds_one_batch_of_embeddings_and_trains_as_with_all_in_memory(conditions, zoo, tmp_path):
    r = load_recipe("tiny", RL_SET + ["rl.true_cfg=2.0", "rl.negative_prompt=blurry"])
    conds = rl.load_conditions(r, conditions)
    cached = rl.Trainer(r, conds, r.models.reward, dynamic=False, text_cache_dir=tmp_path)
    assert set(cached.text.index) == {c.prompt for c in conds} | {"blurry"}
    # The pre-cache code: one encode of every sorted prompt and one of the negative, all kept in memory.
    old = rl.Trainer(r, conds, r.models.reward, dynamic=False, text_cache_dir=tmp_path / "unused")
    pipe = load_fill_pipeline(r.models.policy)
    table = R.encode_prompts(pipe, sorted({c.prompt for c in conds}), SEQ)
    old.text_embeds = table.lookup
    old.neg = R.encode_prompts(pipe, ["blurry"], SEQ)
    for step in range(2):
        for tr in (cached, old):
            tr.optimizer_step(tr.step(step)[0])
    for name, p in cached.policy.trainable.items():
        assert torch.equal(p, old.policy.trainable[name]), name
    # No embedding table in the trainer: only the negative prompt's row stays on the device, and a
    # step reads at most one batch's rows from the cache.
    assert [len(v) for v in vars(cached).values() if isinstance(v, R.TextEmbeds)] == [1]
    assert 0 < cached.text.max_rows <= r.rl.batch_size

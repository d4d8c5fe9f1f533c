"""The reward model's query, preprocessing, scorer and loss (paper §4.3), on the tiny zoo."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onereward_cli.errors import InputError
from onereward_cli.reward import (FIXED_DIMENSION, FIXED_TASK, QUERY_MODES, RewardScorer, accuracy_report,
                                  build_query, eq3_loss, evaluate_pairs, load_pairs, p_yes_from_logits,
                                  yes_no_logprobs)

FIG3 = ('Both of these two images are generated results of {task}. Please evaluate the difference of the two '
        'images. Is the {first} image better than the {second} one? Please answer "yes" or "no". '
        'The evaluation criteria is {dim}.')


@pytest.fixture(scope="module")
def scorer(tiny_recipe):
    return RewardScorer.load(tiny_recipe.models.reward, tiny_recipe.reward)


@pytest.fixture(scope="module")
def wide(tiny_recipe):
    """A scorer with a 140^2-pixel budget, so non-square sizes above the 112^2 floor keep their size."""
    import dataclasses

    return RewardScorer.load(tiny_recipe.models.reward, dataclasses.replace(tiny_recipe.reward, image_size=140))


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t * 255).round().byte().permute(1, 2, 0).numpy())


def _uint8_images(n, h, w, seed=0, smooth=False):
    """Float images that are exactly k/255, so the PIL (uint8) and torch paths see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        base = torch.stack([torch.sin(xx / 5.0), torch.cos(yy / 7.0), xx / w * 2 - 1])
        x = (0.5 + 0.45 * base).unsqueeze(0) + 0.05 * torch.rand(n, 3, 1, 1, generator=g)
    else:
        x = torch.rand(n, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------
def test_fig3_query_word_for_word(tiny_recipe):
    q = build_query(tiny_recipe.tasks["fill"], "text alignment", "a red circle on stripes")
    assert q == ('Both of these two images are generated results of image fill. Please evaluate the difference '
                 'of the two images. Is the first image better than the second one? Please answer "yes" or "no". '
                 'The evaluation criteria is text alignment. The prompt of the two image is a red circle on stripes.')
    qb = build_query(tiny_recipe.tasks["removal"], "removal quality", None, bold=True)
    assert "Is the **first** image better than the **second** one?" in qb
    assert qb.endswith("The evaluation criteria is removal quality.")


@pytest.mark.parametrize("mode", QUERY_MODES)
@pytest.mark.parametrize("bold", [False, True])
def test_query_strings_every_task_dimension_mode(tiny_recipe, mode, bold):
    first, second = ("**first**", "**second**") if bold else ("first", "second")
    for cfg in tiny_recipe.tasks.values():
        for dim in cfg.dimensions:
            q = build_query(cfg, dim, "a blue star", mode=mode, bold=bold)
            if mode == "full":
                want = FIG3.format(task=cfg.name, first=first, second=second, dim=dim)
                if dim == "text alignment":
                    want += " The prompt of the two image is a blue star."
            elif mode == "fixed":
                want = FIG3.format(task=FIXED_TASK, first=first, second=second, dim=FIXED_DIMENSION)
            elif mode == "task":
                want = FIG3.format(task=cfg.name, first=first, second=second, dim="").rsplit(
                    " The evaluation criteria", 1)[0]
            else:
                want = FIG3.format(task="", first=first, second=second, dim="").rsplit(
                    " The evaluation criteria", 1)[0].replace("generated results of .", "generated results.")
            assert q == want, (mode, cfg.name, dim)
    # The ablation modes give one query per task (task) or one overall (none, fixed): nothing leaks the dimension.
    fill = tiny_recipe.tasks["fill"]
    qs = {build_query(fill, d, "p", mode=mode, bold=bold) for d in fill.dimensions}
    assert len(qs) == (len(fill.dimensions) if mode == "full" else 1)


def test_query_bad_input(tiny_recipe):
    fill = tiny_recipe.tasks["fill"]
    for mode in QUERY_MODES:
        with pytest.raises(InputError, match="prompt"):
            build_query(fill, "text alignment", "", mode=mode)
    with pytest.raises(InputError, match="not a dimension"):
        build_query(tiny_recipe.tasks["removal"], "aesthetics")
    with pytest.raises(InputError, match="query mode"):
        build_query(fill, "aesthetics", mode="dimension")


# ----------------------------------------------------------------------------------------------
# Preprocessing parity with the HF processor
# ----------------------------------------------------------------------------------------------
def _hf_pixels(scorer, images):
    ip = scorer.processor.image_processor
    size = {"shortest_edge": scorer.image_processor.min_pixels, "longest_edge": scorer.image_processor.max_pixels}
    return ip([_pil(t) for t in images], size=size, return_tensors="pt")


@pytest.mark.parametrize("hw", [(112, 112), (112, 140), (140, 112)])
def test_preprocess_parity_no_resize(wide, hw):
    x = _uint8_images(3, *hw)
    pv, grid = wide.preprocess(x)
    ref = _hf_pixels(wide, x)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    assert (pv - ref["pixel_values"]).abs().max() < 1e-5  # float rounding only


@pytest.mark.parametrize("hw", [(64, 64), (50, 90), (90, 40)])
@pytest.mark.parametrize("smooth", [False, True])
def test_preprocess_parity_with_resize(scorer, hw, smooth):
    x = _uint8_images(2, *hw, seed=1, smooth=smooth)
    pv, grid = scorer.preprocess(x)
    ref = _hf_pixels(scorer, x)
    assert torch.equal(grid, ref["image_grid_thw"])
    d = (pv - ref["pixel_values"]).abs()
    one_level = 1 / 255 / min(scorer.processor.image_processor.image_std)
    # Stated tolerance: at most two grey levels (one when shrinking; the tiny processor's 112 px floor
    # enlarges these, where torchvision's uint8 kernel rounds differently on pixel noise), mean < 0.002.
    assert d.max() <= 2 * one_level + 1e-5
    assert d.mean() < 2e-3


def test_preprocess_list_of_sizes_matches_processor(wide):
    a, b = _uint8_images(1, 112, 140, seed=2)[0], _uint8_images(1, 112, 112, seed=3)[0]
    pv, grid = wide.preprocess([a, b])
    ref = _hf_pixels(wide, [a, b])
    assert torch.equal(grid, ref["image_grid_thw"])
    assert (pv - ref["pixel_values"]).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------
def _queries(recipe, n):
    fill, removal = recipe.tasks["fill"], recipe.tasks["removal"]
    all_fill = [build_query(fill, d, "a red circle") for d in fill.dimensions]
    qs = [all_fill, [build_query(removal, "removal quality")], all_fill[:2]]
    return (qs * n)[:n]


def test_shared_vision_equals_per_query_and_processor(scorer, tiny_recipe):
    first, second = _uint8_images(3, 112, 112, seed=4), _uint8_images(3, 112, 112, seed=5)
    queries = _queries(tiny_recipe, 3)
    shared = scorer.answer_logits(first, second, queries)
    per_query = scorer.answer_logits(first, second, queries, share_vision=False)
    assert [t.shape for t in shared] == [(len(q), 2) for q in queries]
    for a, b in zip(shared, per_query):
        assert torch.allclose(a, b, atol=1e-5)
    # The plain HF path: processor(text, PIL images) -> model(**inputs), left-padded batch.
    proc = scorer.processor
    texts, pils = [], []
    for i, qs in enumerate(queries):
        for q in qs:
            texts.append(proc.apply_chat_template([{"role": "user", "content": [
                {"type": "image"}, {"type": "image"}, {"type": "text", "text": q}]}],
                tokenize=False, add_generation_prompt=True))
            pils += [_pil(first[i]), _pil(second[i])]
    inputs = proc(text=texts, images=pils, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ref = scorer.model(**inputs).logits[:, -1][:, [scorer.yes_id, scorer.no_id]]
    assert torch.allclose(torch.cat(shared), ref, atol=1e-5)


def test_p_yes_normalisations(scorer, tiny_recipe):
    first, second = _uint8_images(2, 56, 56, seed=6), _uint8_images(2, 56, 56, seed=7)
    queries = _queries(tiny_recipe, 2)
    logits = torch.cat(scorer.answer_logits(first, second, queries))
    logp = torch.cat(scorer.answer_logprobs(first, second, queries))
    two_way = torch.cat(scorer.p_yes(first, second, queries))
    assert torch.allclose(two_way, torch.softmax(logits, -1)[:, 0], atol=1e-6)
    scorer.normalise = "full_vocab"
    try:
        full = torch.cat(scorer.p_yes(first, second, queries))
    finally:
        scorer.normalise = "two_way"
    assert torch.allclose(full, logp[:, 0].exp(), atol=1e-6)
    assert (logp.exp().sum(-1) < 1).all()  # the rest of the vocabulary holds some mass


def test_gradient_reaches_pixels_with_frozen_weights(scorer, tiny_recipe):
    first = _uint8_images(2, 64, 64, seed=8).requires_grad_(True)  # 64 -> resized to 56: through the resize
    second = _uint8_images(2, 64, 64, seed=9).requires_grad_(True)
    p = scorer.p_yes(first, second, _queries(tiny_recipe, 2))
    torch.stack([t.sum() for t in p]).sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert second.grad is not None and second.grad.abs().sum() > 0
    assert all(not prm.requires_grad and prm.grad is None for prm in scorer.model.parameters())
    assert not scorer.model.training


def test_activation_checkpointing_keeps_values_and_pixel_gradients(tiny_recipe):
    sc = RewardScorer.load(tiny_recipe.models.reward, tiny_recipe.reward)
    first, second = _uint8_images(1, 56, 56, seed=12), _uint8_images(1, 56, 56, seed=13)
    queries = _queries(tiny_recipe, 1)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            sc.enable_activation_checkpointing()
        x = first.clone().requires_grad_(True)
        p = sc.p_yes(x, second, queries)[0]
        p.sum().backward()
        grads.append((p.detach(), x.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6) and grads[1][1].abs().sum() > 0
    assert all(prm.grad is None for prm in sc.model.parameters())


def test_eq3_loss_matches_hand_computation():
    logits_fwd = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    logits_rev = torch.tensor([[0.0, 1.0, 3.0, -2.0], [1.0, -1.0, 0.0, 0.5]])
    yes, no = 0, 2

    def log_p(row, i):
        return row[i] - math.log(sum(math.exp(v) for v in row))

    hand = -0.5 * sum(log_p(f.tolist(), yes) + log_p(r.tolist(), no)
                      for f, r in zip(logits_fwd, logits_rev)) / 2
    loss = eq3_loss(yes_no_logprobs(logits_fwd, yes, no), yes_no_logprobs(logits_rev, yes, no))
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    ce = 0.5 * (torch.nn.functional.cross_entropy(logits_fwd, torch.tensor([yes, yes]))
                + torch.nn.functional.cross_entropy(logits_rev, torch.tensor([no, no])))
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6)
    p = p_yes_from_logits(logits_fwd, yes, no, "two_way")
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(-(2.0 - -1.0))), abs=1e-6)


def test_accuracy_report_by_hand(tiny_recipe):
    pairs = [{"task": "fill", "dimension": "aesthetics"}] * 3 + [{"task": "removal", "dimension": "removal quality"}]
    probs = [(0.9, 0.2), (0.6, 0.7), (0.4, 0.3), (0.2, 0.8)]
    rep = accuracy_report(pairs, probs, tiny_recipe.tasks)
    fill = next(c for c in rep["cells"] if c["task"] == "image fill")
    assert (fill["n"], fill["accuracy"], fill["symmetric_accuracy"]) == (3, 2 / 3, 2 / 3)
    assert (fill["winner_first"], fill["winner_second"]) == (2 / 3, 2 / 3)
    rem = next(c for c in rep["cells"] if c["task"] == "object removal")
    assert (rem["accuracy"], rem["symmetric_accuracy"], rem["winner_second"], rem["position_bias"]) == (0, 0, 0, 0)
    assert rep["overall"]["n"] == 4 and rep["overall"]["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _write_pairs(d, records):
    (d / "img").mkdir(parents=True, exist_ok=True)
    for name, v in (("a.png", 200), ("b.png", 40)):
        Image.fromarray(np.full((56, 56, 3), v, dtype=np.uint8)).save(d / "img" / name)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d / "train.jsonl"


GOOD = {"sample_id": "s0", "task": "fill", "dimension": "aesthetics", "prompt": "a red circle",
        "winner": "img/a.png", "loser": "img/b.png", "source": "", "mask": "", "annotator": "t"}


@pytest.mark.parametrize("change,field", [
    ({"winner": "img/missing.png"}, "winner"),
    ({"loser": "img/garbage.png"}, "loser"),
    ({"task": "inpaint"}, "task"),
    ({"dimension": "sharpness"}, "dimension"),
    ({"task": "removal", "dimension": "aesthetics"}, "dimension"),
    ({"dimension": "text alignment", "prompt": ""}, "prompt"),
])
def test_load_pairs_bad_input(tmp_path, tiny_recipe, change, field):
    path = _write_pairs(tmp_path, [GOOD, {**GOOD, **change}])
    (tmp_path / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError) as e:
        load_pairs(path, tiny_recipe.tasks)
    assert e.value.line == 2 and e.value.field == field and str(path) in str(e.value)


def test_evaluate_pairs_runs_every_mode(tmp_path, scorer, tiny_recipe):
    path = _write_pairs(tmp_path, [GOOD, {**GOOD, "dimension": "text alignment"},
                                   {**GOOD, "task": "removal", "dimension": "removal quality", "prompt": ""}])
    pairs = load_pairs(path, tiny_recipe.tasks)
    reports = {m: evaluate_pairs(scorer, pairs, tiny_recipe.tasks, m, batch_size=2) for m in QUERY_MODES}
    for rep in reports.values():
        assert rep["overall"]["n"] == 3 and len(rep["cells"]) == 3
    # The query decides the answer: the fixed query changes P(yes) for the fill pairs.
    assert reports["full"]["cells"][0]["mean_p_yes_winner_first"] != reports["fixed"]["cells"][0]["mean_p_yes_winner_first"]


def _split_yes_checkpoint(src, dst):
    """A copy of the zoo model whose tokenizer has no merge producing 'yes' (so 'yes' is 2+ tokens)."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    joined = [m.replace(" ", "") if isinstance(m, str) else "".join(m) for m in merges]
    tj["model"]["merges"] = [m for m, j in zip(merges, joined) if j != "yes"]
    assert len(tj["model"]["merges"]) < len(merges)
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_multi_token_yes_checkpoint_is_input_error(tmp_path, tiny_recipe):
    from onereward_cli.models.tiny import resolve_model_path

    bad = _split_yes_checkpoint(Path(resolve_model_path("zoo:qwen2.5-vl")), tmp_path / "bad")
    with pytest.raises(InputError, match=r"splits 'yes' into \d tokens") as e:
        RewardScorer.load(str(bad), tiny_recipe.reward)
    assert str(bad) in str(e.value)


# ----------------------------------------------------------------------------------------------
# Generic over Qwen2-VL
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory, zoo):
    """A tiny Qwen2-VL (not 2.5) built here with the zoo's tokenizer, saved in HF format."""
    from transformers import (AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from onereward_cli.models.tiny import CHAT_TEMPLATE

    d = tmp_path_factory.mktemp("qwen2-vl")
    tok = AutoTokenizer.from_pretrained(zoo / "qwen2.5-vl")
    kw = dict(min_pixels=784, max_pixels=12544, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**kw), chat_template=CHAT_TEMPLATE)
    ids = {s: tok.convert_tokens_to_ids(s) for s in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=1, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


def test_qwen2_vl_checkpoint_same_code_path(tiny_qwen2_vl, tiny_recipe):
    sc = RewardScorer.load(str(tiny_qwen2_vl), tiny_recipe.reward)
    assert type(sc.model).__name__ == "Qwen2VLForConditionalGeneration"
    first, second = _uint8_images(2, 56, 56, seed=10), _uint8_images(2, 56, 56, seed=11)
    queries = _queries(tiny_recipe, 2)
    shared = torch.cat(sc.answer_logits(first, second, queries))
    per_query = torch.cat(sc.answer_logits(first, second, queries, share_vision=False))
    assert torch.allclose(shared, per_query, atol=1e-5)
    x = first.clone().requires_grad_(True)
    sum(t.sum() for t in sc.p_yes(x, second, queries)).backward()
    assert x.grad.abs().sum() > 0


def test_reward_model_refused_at_another_image_size(tiny_recipe, zoo, tmp_path):
    """A judge trained at one pixel budget is a different function at another: exit-2 error."""
    import dataclasses
    import warnings

    from onereward_cli.reward import REWARD_META

    d = tmp_path / "judge"
    shutil.copytree(zoo / "qwen2.5-vl", d)
    cfg = tiny_recipe.reward
    (d / REWARD_META).write_text(json.dumps({"base": "zoo:qwen2.5-vl", "image_size": cfg.image_size,
                                             "max_pixels": cfg.image_size ** 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching size loads silently
        RewardScorer.load(str(d), cfg)
    with pytest.raises(InputError, match=rf"{REWARD_META}: reward.image_size: .*trained at {cfg.image_size} px"):
        RewardScorer.load(str(d), dataclasses.replace(cfg, image_size=cfg.image_size + 28))
    # A record from before image_size was kept: one warning per model, not per load.
    (d / REWARD_META).write_text(json.dumps({"base": "zoo:qwen2.5-vl"}))
    with pytest.warns(UserWarning, match="no image_size recorded"):
        RewardScorer.load(str(d), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RewardScorer.load(str(d), cfg)

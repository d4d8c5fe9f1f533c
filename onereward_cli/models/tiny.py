"""The offline tiny model zoo: real architectures at toy sizes, saved in the real HF formats.

Nothing here downloads. This module builds the architectures, randomly initialised from a fixed seed
(same seed, same bytes), and resolves the `zoo:` specs. The public loaders read every zoo folder
(`FluxFillPipeline.from_pretrained`, `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained`,
open_clip's factory), so later stages load the zoo through exactly the code they use for real
checkpoints.

Two zoos share these architectures:
    zoo:NAME          the trained zoo shipped with the package (onereward_cli/zoo/, trained on the
                      synthetic world by `python -m onereward_cli.pretrain`; sha256 in manifest.json)
    zoo-random:NAME   the random-init build, cached under $ONEREWARD_ZOO (fast, bit-exact rebuilds)
    zoo:onereward     trained zoo only: a tiny OneReward judge (Qwen2.5-VL), what `demo --replicate` seed 1
                      trains with the full Fig. 3 query; the demo's RL optimises it, as a user's RL would
                      start from the released OneReward weights (no random build: it is not a base model)

Layout of a zoo directory:
    flux-fill/        FluxFillPipeline (transformer, vae, CLIP + T5 text encoders, tokenizers, scheduler)
    qwen2.5-vl/       Qwen2.5-VL model + processor + chat template ("yes"/"no"/"Yes"/"No" single tokens)
    open-clip/        open_clip_config.json + open_clip_model.safetensors (loads as "local-dir:<path>")
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

ZOO_VERSION = "2"  # bump when an architecture, tokenizer or processor changes
ZOO_MODELS = ("flux-fill", "qwen2.5-vl", "open-clip")
# Trained by the pipeline itself, not by `pretrain`: in the shipped zoo's manifest, never built at random.
TRAINED_ONLY = ("onereward",)
JUDGE_RECIPE = ("onereward demo --replicate --out R --set seed=1 --set replicate.seeds=1 "
                "--set reward.eval_every=200 --set reward.save_every=200  ->  R/seed-1/reward-full/final")

# The Qwen2-VL chat template semantics for our use (system turn inserted, images as vision pads).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def default_zoo_dir() -> Path:
    root = os.environ.get("ONEREWARD_ZOO")
    if root:
        return Path(root)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "onereward" / f"zoo-v{ZOO_VERSION}"


# Words of the synthetic world (synth.py), the pretraining questions and the reward query: the
# tiny tokenizers make them whole tokens, so toy-sized models can learn what they mean.
WORLD_WORDS = ("red green blue yellow purple orange white black circle square triangle star "
               "plain stripes dots gradient background a an and on of the is are in with").split()
QA_WORDS = ("what which where how many colour color shape texture objects object image images first second "
            "both same different one two three four none left right top bottom centre middle "
            "yes no Yes No is there does do show describe larger smaller more fewer noisy blurry clean sharp "
            "picture this that these answer word words with one").split()


def _corpus() -> list[str]:
    from ..tasks import DIMENSION_DEFINITIONS

    words = [
        "Both of these two images are generated results of image fill. Please evaluate the difference of "
        "the two images. Is the first image better than the second one? Please answer \"yes\" or \"no\". "
        "The evaluation criteria is text alignment. The prompt of the two image is a red circle.",
        "image extend object removal consistency structure aesthetics removal quality **first** **second**",
        "yes no Yes No YES NO yes. no. You are a helpful assistant. system user assistant",
        "remove high-definition, perfect composition",
        " ".join(WORLD_WORDS), " ".join(QA_WORDS),
        "What colour is the background? What texture is the background? How many objects are there? "
        "What shape is the red object? What colour is the circle? Is there a blue star? Describe the image. "
        "Where is the green square? Which image shows more objects? Answer first or second. "
        "Do both images have the same background? Is the image noisy? Is the image blurry?",
    ] + list(DIMENSION_DEFINITIONS.values())
    # Each word alone too: an answer right after "assistant\n" has no leading space.
    return words * 4 + (WORLD_WORDS + QA_WORDS) * 4


def build_qwen_vl(out: Path, seed: int = 0):
    import torch
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    m = json.loads(bpe.to_str())["model"]
    vocab = dict(m["vocab"])
    merges = [tuple(x) if not isinstance(x, str) else tuple(x.split(" ")) for x in m["merges"]]
    for w in ["yes", "no", "Yes", "No"]:  # force single tokens
        while len(p := Qwen2Tokenizer(vocab=vocab, merges=merges).tokenize(w)) > 1:
            merges.append((p[0], p[1]))
            vocab.setdefault(p[0] + p[1], len(vocab))
    for s in QWEN_SPECIAL:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tok.chat_template = CHAT_TEMPLATE
    # min_pixels 112^2: a 64 px edit is shown to the ViT at 112 px (8x8 patches of 14 px, 16 merged
    # tokens), enough to see a shape; real checkpoints keep their own 56^2 floor.
    kw = dict(min_pixels=112 * 112, max_pixels=224 * 224, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**kw), chat_template=CHAT_TEMPLATE)
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    # Qwen2.5-VL-7B's layout at toy width: GQA (2 kv heads), mrope sections in the 7B's 2:3:3 ratio,
    # windowed ViT blocks with full attention every second block, untied LM head.
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         max_window_layers=4,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         tie_word_embeddings=False, initializer_range=0.1),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], initializer_range=0.1),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        # The 7B's 0.02 is ~1/sqrt(width) at width 4096; at width 64 it leaves every block a near-linear
        # no-op that takes thousands of steps to wake up. 0.1 is ~1/sqrt(64).
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    proc.save_pretrained(out)


def clip_tokenizer():
    """A byte-level CLIP tokenizer without merges (every byte a token): offline, ids fit any CLIP vocab."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alpha:
        vocab[c] = len(vocab)
    for c in alpha:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: whole words of the synthetic world (score -1) over a character fallback."""
    ch = [chr(i) for i in range(33, 127)]
    words = list(dict.fromkeys(WORLD_WORDS + ["remove", "high-definition,", "perfect", "composition",
                                              "blurry", "nsfw", "low", "quality"]))
    whole = [("\u2581" + w, -1.0) for w in words if len(w) > 1]
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + whole
            + [("\u2581" + c, -3.0) for c in ch] + [(c, -4.0) for c in ch])


def build_flux_fill(out: Path, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    tok = clip_tokenizer()
    t5v = t5_vocab()
    tok2 = T5Tokenizer(vocab=t5v, extra_ids=0)
    torch.manual_seed(seed)
    # FLUX.1-Fill-dev's layout at toy width: 64 = 4 heads x 16 (rope axes in the real 2:7:7-ish split),
    # double-stream then single-stream blocks, Fill input = 16 noisy + 16 masked-image + 16 mask channels.
    tr = FluxTransformer2DModel(patch_size=1, in_channels=48, out_channels=16, num_layers=2, num_single_layers=4,
                                attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=True)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        shift_factor=0.1159, scaling_factor=0.3611)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, projection_dim=32, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, max_position_embeddings=77))
    te2 = T5EncoderModel(T5Config(vocab_size=len(t5v), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                  dropout_rate=0.0))
    for mod in (tr, vae, te, te2):
        mod.eval()
    # Real FLUX.1-Fill-dev scheduler settings (shift 3, dynamic shifting, 256..4096 tokens).
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxFillPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                            tokenizer_2=tok2, transformer=tr)
    pipe.save_pretrained(out)  # save before any use: tokenizer padding state would leak into the files


def build_open_clip(out: Path, seed: int = 0):
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # Default vocabulary (49408): open_clip's SimpleTokenizer ships its BPE file inside the wheel, so
    # the tokenizer works offline and the folder loads with no path fix-ups.
    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


BUILDERS = {"flux-fill": build_flux_fill, "qwen2.5-vl": build_qwen_vl, "open-clip": build_open_clip}


_LEFTOVER = re.compile(r"^\..+\.(building|copying|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_dead_leftovers(out_dir: Path) -> list[str]:
    """Remove the `.NAME.building-PID` / `.copying-PID` / `.old-PID` folders of processes that are no longer
    running (killed builds or copies); a live process's (a concurrent build) is left alone. The PID is
    checked on this machine only: a zoo folder shared by several machines may lose another's build in
    progress (it then fails and is re-run)."""
    gone = []
    for p in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def _put_in_place(tmp: Path, target: Path) -> None:
    """Move a finished folder to `target`, an older one there renamed away first (a kill never leaves it
    half-deleted under its name, its `.complete` kept); raises OSError when another process got there first."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(tmp, target)  # atomic: a zoo model directory is either complete or absent
    finally:
        shutil.rmtree(old, ignore_errors=True)


def build_zoo(out_dir=None, seed: int = 0, force: bool = False, only=None) -> Path:
    """Build every random-init zoo model into `out_dir` (default: the cache); skip ones already complete."""
    out_dir = Path(out_dir) if out_dir else default_zoo_dir()
    if out_dir.exists() and not out_dir.is_dir():
        from ..errors import InputError
        raise InputError("exists and is not a folder", path=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out_dir)
    for name in only or ZOO_MODELS:
        target = out_dir / name
        marker = target / ".complete"
        if marker.exists() and not force:
            continue
        tmp = out_dir / f".{name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[name](tmp, seed=seed)
        (tmp / ".complete").write_text(json.dumps({"zoo_version": ZOO_VERSION, "seed": seed}) + "\n")
        if marker.exists() and not force:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            _put_in_place(tmp, target)
        except OSError:
            if not marker.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------
# The trained zoo (package data)
# ----------------------------------------------------------------------------------------------
TRAINED_MANIFEST = "manifest.json"


def trained_zoo_dir() -> Path:
    """Where the trained zoo lives: $ONEREWARD_TRAINED_ZOO, else the copy shipped in the package."""
    root = os.environ.get("ONEREWARD_TRAINED_ZOO")
    return Path(root) if root else Path(__file__).resolve().parent.parent / "zoo"


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_trained_manifest(root: Path, info: dict | None = None) -> Path:
    """manifest.json: every file of every model folder under `root` with its size and sha256."""
    files = {}
    for name in ZOO_MODELS + TRAINED_ONLY:  # a rebuilt zoo has no judge folder until add_judge puts one
        for f in sorted((root / name).rglob("*")):
            if f.is_file():
                rel = f.relative_to(root).as_posix()
                files[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    doc = {"zoo_version": ZOO_VERSION, "files": files, **(info or {})}
    (root / TRAINED_MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return root / TRAINED_MANIFEST


_verified: set[str] = set()


def verify_trained(name: str, root: Path | None = None) -> Path:
    """The trained model folder, after checking its files against the manifest (once per process)."""
    from ..errors import InputError

    root = root or trained_zoo_dir()
    man = root / TRAINED_MANIFEST
    if not man.is_file():
        raise InputError(f"the trained tiny zoo is not installed ({man} missing); use zoo-random:{name}, or "
                         f"train it with `python -m onereward_cli.pretrain`", field="models")
    key = f"{root}:{name}"
    if key not in _verified:
        files = json.loads(man.read_text())["files"]
        mine = {k: v for k, v in files.items() if k.split("/", 1)[0] == name}
        if not mine:
            raise InputError(f"the trained zoo manifest lists no files for {name}", path=man)
        for rel, meta in mine.items():
            f = root / rel
            if not f.is_file() or file_sha256(f) != meta["sha256"]:
                raise InputError(f"{rel} is missing or does not match its recorded sha256; reinstall the package",
                                 path=man)
        _verified.add(key)
    return root / name


def copy_trained_zoo(out, force: bool = False) -> Path:
    """Copy the verified trained zoo (and its manifest) into `out`."""
    from ..errors import InputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", path=out)
    src = trained_zoo_dir()
    names = [verify_trained(n, src) for n in ZOO_MODELS]
    names += [verify_trained(n, src) for n in TRAINED_ONLY if (src / n).is_dir()]
    clash = [n.name for n in names if (out / n.name).exists()]
    if clash and not force:
        raise InputError(f"already holds {', '.join(clash)}; pass --force to overwrite", path=out)
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out)
    for d in names:
        tmp = out / f".{d.name}.copying-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp)
        _put_in_place(tmp, out / d.name)
    shutil.copy2(src / TRAINED_MANIFEST, out / TRAINED_MANIFEST)
    return out


def resolve_model_path(spec: str) -> str:
    """'zoo:NAME' -> the trained zoo folder; 'zoo-random:NAME' -> the cached random build (built on
    first use); anything else is returned unchanged."""
    for prefix in ("zoo:", "zoo-random:"):
        if spec.startswith(prefix):
            name = spec[len(prefix):]
            from ..errors import InputError
            if prefix == "zoo-random:" and name in TRAINED_ONLY:
                raise InputError(f"'{name}' is trained by the pipeline and has no random build; use zoo:{name}",
                                 field="models")
            if name not in ZOO_MODELS + TRAINED_ONLY:
                raise InputError(f"unknown zoo model '{name}'; zoo models: {', '.join(ZOO_MODELS + TRAINED_ONLY)}",
                                 field="models")
            if prefix == "zoo:":
                if name in TRAINED_ONLY and not (trained_zoo_dir() / name).is_dir():
                    raise InputError(f"the trained zoo at {trained_zoo_dir()} has no '{name}' judge; make one with "
                                     f"`{JUDGE_RECIPE}` and add it with `python -m onereward_cli.models.tiny "
                                     f"add-judge R/seed-1/reward-full/final`", field="models")
                return str(verify_trained(name))
            return str(build_zoo(only=[name]) / name)
    return spec


def add_judge(src, root: Path | None = None) -> Path:
    """Copy a trained reward model folder into the trained zoo as `onereward` and rewrite the manifest's
    hashes (the other models' entries are recomputed from their files, so they are checked first)."""
    from ..errors import InputError

    src, root = Path(src), Path(root) if root else trained_zoo_dir()
    if not (src / "config.json").is_file() or not (src / "onereward_reward.json").is_file():
        raise InputError("not a reward model folder (config.json and onereward_reward.json expected)", path=src)
    for n in ZOO_MODELS:
        verify_trained(n, root)
    man = json.loads((root / TRAINED_MANIFEST).read_text())
    tmp = root / f".onereward.copying-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"))
    _put_in_place(tmp, root / "onereward")
    info = {k: v for k, v in man.items() if k not in ("files", "zoo_version")}
    info["judge"] = {"made_by": JUDGE_RECIPE, "reward": json.loads((src / "onereward_reward.json").read_text())}
    acc = src.parent / "accuracy.json"
    if acc.is_file():
        info["judge"]["test_accuracy"] = json.loads(acc.read_text())["overall"]
    _verified.clear()
    return write_trained_manifest(root, info)


if __name__ == "__main__":  # python -m onereward_cli.models.tiny add-judge SRC [ZOO]
    import sys

    if len(sys.argv) not in (3, 4) or sys.argv[1] != "add-judge":
        sys.exit("usage: python -m onereward_cli.models.tiny add-judge REWARD_MODEL_DIR [ZOO_DIR]")
    from ..errors import InputError

    try:
        print(add_judge(sys.argv[2], Path(sys.argv[3]) if len(sys.argv) == 4 else None))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

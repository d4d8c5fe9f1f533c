"""YAML recipes -> frozen, typed dataclasses.

A recipe is the whole configuration of a run. Bundled recipes live in `recipes/`; a user passes a
bundled name (`tiny`) or a path, plus `--set a.b=c` overrides. Unknown keys, wrong types and
impossible values are errors that name the key (with a close-match suggestion for typos).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import InputError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelsConfig:
    # FluxFillPipeline directory or hub id ("black-forest-labs/FLUX.1-Fill-dev"); "zoo:NAME" is the tiny zoo.
    policy: str = "zoo:flux-fill"
    # Qwen2/2.5-VL checkpoint (hub id or path) used as the reward model backbone.
    reward: str = "zoo:qwen2.5-vl"
    # open_clip model name ("ViT-L-14") or "zoo:open-clip"; pretrained tag or weight file.
    clip: str = "zoo:open-clip"
    clip_pretrained: str = ""
    # The FluxFillPipeline that a transformer-only or LoRA folder without a base of its own (the OneReward
    # release folders) is loaded into; "" = models.policy.
    fill_pipeline: str = ""
    # Segmentation model (transformers SAM, e.g. "facebook/sam-vit-base") that proposes object masks for
    # removal samples with neither a user mask nor object boxes; "" = such samples are skipped.
    segmenter: str = ""


@dataclass(frozen=True)
class TaskConfig:
    # Name written into the reward query ([TASK] in Fig. 3).
    name: str
    probability: float
    dimensions: tuple[str, ...]
    # Fixed prompt for prompt-free tasks ("remove", "high-definition, perfect composition").
    fixed_prompt: str | None = None


@dataclass(frozen=True)
class SynthConfig:
    n: int = 64
    size: int = 64
    min_objects: int = 1
    max_objects: int = 3


@dataclass(frozen=True)
class CurateConfig:
    select: int = 32
    mode: str = "flat"  # flat | hierarchical
    backend: str = "auto"  # auto | faiss | sklearn
    batch_size: int = 64
    num_workers: int = 0
    shard_size: int = 4096
    min_size: int = 16
    # hierarchical: number of coarse clusters at level 1 (0 = sqrt(select)).
    coarse_clusters: int = 0
    kmeans_iters: int = 20
    # Cosine similarity above which two pool images count as duplicates (only one may be picked).
    dedup_threshold: float = 0.995
    # hierarchical: a cluster whose quota exceeds this is split again (sqrt(quota) children).
    leaf_quota: int = 64
    # Multi-process runs: rank 0 gives up waiting for other ranks' shards after this long without one.
    rank_timeout_s: float = 3600.0


@dataclass(frozen=True)
class MaskConfig:
    fill_min_frac: float = 0.15
    fill_max_frac: float = 0.5
    stroke_probability: float = 0.3
    extend_min_ratio: float = 1.25
    extend_max_ratio: float = 1.75
    # Sides the canvas grows on, drawn uniformly per sample (left|right|up|down|horizontal|vertical|all).
    extend_directions: tuple[str, ...] = ("left", "right", "up", "down", "horizontal", "vertical", "all")
    removal_dilate: int = 4
    # Removal masks proposed by models.segmenter (transformers' mask-generation pipeline): a proposal is
    # kept when its predicted IoU and stability reach these bounds and it covers [min, max] of the image.
    segment_min_area: float = 0.02
    segment_max_area: float = 0.35
    segment_min_iou: float = 0.88
    segment_min_stability: float = 0.95
    segment_points_per_side: int = 32  # a points_per_side x points_per_side prompt grid


@dataclass(frozen=True)
class GenerateOverride:
    # Forced on every policy, even one that carries its own inference settings (null = not forced).
    steps: tuple[int, int] | None = None
    guidance: tuple[float, float] | None = None
    true_cfg: tuple[float, float] | None = None
    negative_prompts: tuple[str, ...] | None = None
    resolution: int | None = None


@dataclass(frozen=True)
class GenerateConfig:
    candidates: int = 4
    resolution: int = 64
    batch_size: int = 4
    # Randomised inference parameters: each candidate draws uniformly from these ranges.
    steps: tuple[int, int] = (2, 4)
    guidance: tuple[float, float] = (1.0, 30.0)
    true_cfg: tuple[float, float] = (1.0, 1.0)
    shift: tuple[float, float] = (0.5, 1.15)
    negative_prompts: tuple[str, ...] = ("",)
    max_sequence_length: int = 32
    masks: MaskConfig = MaskConfig()
    # The ranges above apply to a policy without settings of its own (a base pipeline); a policy that
    # carries some (onereward_policy.json, the OneReward release) uses its own, unless forced here.
    override: GenerateOverride = GenerateOverride()


@dataclass(frozen=True)
class PairsConfig:
    test_fraction: float = 0.2
    # "all" keeps every annotator's picks; "agree" keeps a (sample, dimension) only when all agree.
    agreement: str = "all"
    # With agreement "agree": how many annotators must have labelled a (sample, dimension) to keep it.
    min_annotators: int = 1
    # Drop training pairs whose label margin (how clearly best beat worst; the oracle writes its score gap)
    # is below this; pairs without a margin and the test split are kept. 0 keeps every pair.
    train_min_margin: float = 0.0


@dataclass(frozen=True)
class RewardConfig:
    # Query ablation (Tables 1 and 4): full | task | none | fixed
    query_mode: str = "full"
    bold: bool = False
    # P(yes) normalisation: two_way (softmax over {yes, no}) | full_vocab
    normalise: str = "two_way"
    yes_token: str = "yes"
    no_token: str = "no"
    # Pixel budget per image: images are resized (aspect kept, Qwen smart_resize) to at most
    # image_size**2 pixels before the VLM (448 -> at most 256 visual tokens per image).
    image_size: int = 56
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide
    grad_accum: int = 1
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # LoRA goes on these language-model projections only (the ViT has same-named MLP layers).
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    warmup_steps: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    train_vision: bool = False
    train_merger: bool = True
    # Full fine-tuning only: false freezes the vocabulary matrices (input embeddings and LM head), 1.09 B
    # of Qwen2.5-VL-7B's 8.3 B parameters, so ~17 GB less fp32 master weights, gradients and AdamW state.
    train_embeddings: bool = True
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 (fp16 is refused: no loss scaling)
    eval_every: int = 50
    save_every: int = 50
    max_grad_norm: float = 1.0
    # Steps with a NaN/inf loss are skipped; this many abort the run (exit code 3, checkpoints kept).
    max_nonfinite: int = 5


LR_SCHEDULES = ("constant", "cosine", "linear")  # after the warmup (checkpointing.lr_factor)


@dataclass(frozen=True)
class RLConfig:
    steps: int = 20
    batch_size: int = 2
    lr: float = 5e-6
    # ReFL window: the policy rollout stops at a step index t drawn uniformly from [t1, t2].
    t1: int = 1
    t2: int = 3
    rollout_steps: int = 4
    lambda_: float = 1.0
    tau: float = 0.99
    resolution: int = 64
    guidance: float = 30.0
    true_cfg: float = 1.0
    negative_prompt: str = ""
    max_sequence_length: int = 32
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 8
    cache_reference: bool = True
    gradient_checkpointing: bool = False
    # Recompute the reward VLM's blocks in the backward to the pixels (less memory, more time).
    reward_activation_checkpointing: bool = False
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    # Learning rate: linear warmup over lr_warmup steps, then constant | cosine | linear decay to 0 at rl.steps.
    lr_warmup: int = 0
    lr_schedule: str = "constant"
    # Steps with a NaN/inf loss are skipped; this many abort the run (exit code 3, checkpoints kept).
    max_nonfinite: int = 5
    save_every: int = 10
    eval_every: int = 0
    # Held-out conditions rolled out (fixed seeds) for the logged oracle score at each eval_every.
    heldout_n: int = 8
    # Early stopping: policy/ holds the weights with the best held-out oracle score among the start
    # (step 0, the base model) and every eval_every step; the last weights go to last/. Select on a
    # validation set (`rl --validation`), not on the benchmark you report.
    keep_best: bool = False
    log_every: int = 1


@dataclass(frozen=True)
class TextCacheConfig:
    # Prompts are encoded this many at a time (rl, generate, eval); each batch is one cache shard.
    batch_size: int = 64
    # Folder of the on-disk prompt-embedding cache, shared by the stages that name it ("" = OUT/text_cache).
    dir: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    # Each metric runs when its checkpoint is set, and is skipped with a note otherwise.
    pickscore: str = ""
    hpsv2: str = ""
    imagereward: str = ""
    hpsv3: str = ""
    remove: str = ""
    oracle: bool = True
    # Add a "(norm.)" column for metrics whose Table 2 scale is not the raw one (PickScore / 26,
    # HPSv3 / 10; see onereward_cli/metrics/__init__.py NORMALISERS).
    normalised: bool = False
    # The PickScore authors' processor ("" = the checkpoint's own folder).
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # open_clip architecture of a HPSv2 .safetensors checkpoint (ignored for an open_clip folder).
    hpsv2_arch: str = "ViT-H-14"
    # BERT tokenizer for ImageReward when its folder has none.
    imagereward_tokenizer: str = "bert-base-uncased"
    # Base model (config + processor) for HPSv3.safetensors, and its fixed pixel budget (256 * 28 * 28).
    hpsv3_base: str = "Qwen/Qwen2-VL-7B-Instruct"
    hpsv3_pixels: int = 200704


@dataclass(frozen=True)
class EvalOverride:
    # Forced on every policy, even one that carries its own inference settings (null = not forced).
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    negative_prompt: str | None = None
    resolution: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    # Policies when the command line names none: P, and the ones compared with it.
    policy: str = ""
    compare: tuple[str, ...] = ()
    seed: int = 1234
    # Inference settings of a policy without settings of its own (a base pipeline such as FLUX.1-Fill-dev);
    # rl outputs and the OneReward release carry theirs and use them unless eval.override forces a value.
    steps: int = 4
    guidance: float = 30.0
    true_cfg: float = 1.0
    negative_prompt: str = ""
    resolution: int = 64
    batch_size: int = 4
    gsb: bool = True
    max_sequence_length: int = 512
    # Rows per task in the report's image grid (source, mask, one column per policy).
    grid_samples: int = 4
    metrics: MetricsConfig = MetricsConfig()
    override: EvalOverride = EvalOverride()


@dataclass(frozen=True)
class ReplicateConfig:
    """`onereward demo --replicate`: the miniature replication, repeated over seeds."""
    # Seeds recipe.seed, recipe.seed + 1, ...: each its own synthetic pool, candidates, labels and models.
    seeds: int = 3
    # Held-out benchmark of world triplets (with ground truth) per task, for Table 2 / Fig. 7.
    benchmark_per_task: int = 40
    # Validation triplets per task (other scenes than the benchmark's): RL's held-out oracle is logged on
    # these, and rl.keep_best selects on them, so the reported benchmark stays unseen. 0 = use the benchmark.
    validation_per_task: int = 0
    # Seeds run at once, each in its own process at one thread (a 2-core machine: 2-3 seeds side by side
    # beat one seed at two threads). 1 = one seed after another in this process.
    jobs: int = 1


@dataclass(frozen=True)
class DemoConfig:
    """`onereward demo` (without --replicate)."""
    # Held-out benchmark that eval reports on: this many world triplets per task (other scenes than the
    # pool and than RL's validation set, with ground truth), or 0 for the pool's test-split samples.
    benchmark_per_task: int = 0
    # The reward model both RL runs optimise (and eval's reward-model Good-Same-Bad asks): "" = the one the
    # demo's train-reward stage has just trained; otherwise a model path, hub id or zoo: spec.
    rl_reward_model: str = ""


def _default_tasks() -> dict[str, TaskConfig]:
    ta, co, st, ae = "text alignment", "consistency", "structure", "aesthetics"
    return {
        "fill": TaskConfig("image fill", 0.35, (ta, co, st, ae)),
        "extend": TaskConfig("image extend", 0.25, (ta, co, st, ae)),
        "extend_no_prompt": TaskConfig("image extend", 0.10, (co, st, ae),
                                       fixed_prompt="high-definition, perfect composition"),
        "removal": TaskConfig("object removal", 0.30, ("removal quality",), fixed_prompt="remove"),
    }


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    models: ModelsConfig = ModelsConfig()
    tasks: dict[str, TaskConfig] = field(default_factory=_default_tasks)
    synth: SynthConfig = SynthConfig()
    curate: CurateConfig = CurateConfig()
    generate: GenerateConfig = GenerateConfig()
    pairs: PairsConfig = PairsConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    text_cache: TextCacheConfig = TextCacheConfig()
    replicate: ReplicateConfig = ReplicateConfig()
    demo: DemoConfig = DemoConfig()
    # Where the recipe came from (not a user key).
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return to_plain(self)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
_YAML_KEY_ALIASES = {"lambda": "lambda_"}


def to_plain(obj):
    """Dataclass tree -> plain dict/list values (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            key = "lambda" if f.name == "lambda_" else f.name
            out[key] = to_plain(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _suggest(key: str, options) -> str:
    m = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _coerce(value, tp, key: str):
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping, got {type(value).__name__}", field=key)
        return _build(tp, value, key)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>") \
            or type(tp).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"expected a list, got {value!r}", field=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InputError(f"expected {len(args)} values, got {len(value)}", field=key)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping, got {value!r}", field=key)
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"expected true/false, got {value!r}", field=key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"expected an integer, got {value!r}", field=key)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string: YAML 1.1 floats need one
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"expected a number, got {value!r}", field=key)
        if not math.isfinite(value):  # .inf / .nan: no recipe number means anything infinite
            raise InputError(f"must be a finite number, got {value!r}", field=key)
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"expected a string, got {value!r}", field=key)
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    yaml_names = {("lambda" if n == "lambda_" else n) for n in names}
    kwargs = {}
    for raw_key, value in data.items():
        key = _YAML_KEY_ALIASES.get(str(raw_key), str(raw_key))
        full = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if key not in names:
            raise InputError(f"unknown key{_suggest(str(raw_key), yaml_names)}", field=full)
        if cls is Recipe and key == "tasks":
            kwargs[key] = _build_tasks(value, full)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (TaskConfig) is missing
        raise InputError(str(e), field=prefix or cls.__name__) from None


def _build_tasks(value, key: str) -> dict[str, TaskConfig]:
    from .tasks import TASK_KEYS  # the registry decides which task keys exist

    if not isinstance(value, dict):
        raise InputError("expected a mapping of task key -> settings", field=key)
    defaults = _default_tasks()
    out = {}
    for tk, tv in value.items():
        if tk not in TASK_KEYS:
            raise InputError(f"unknown task{_suggest(str(tk), TASK_KEYS)}; tasks are {', '.join(TASK_KEYS)}",
                             field=f"{key}.{tk}")
        base = to_plain(defaults[tk])
        if tv is not None:
            if not isinstance(tv, dict):
                raise InputError("expected a mapping", field=f"{key}.{tk}")
            base.update(tv)
        out[tk] = _build(TaskConfig, base, f"{key}.{tk}")
    return out


def _check(cond: bool, key: str, message: str):
    if not cond:
        raise InputError(message, field=key)


def validate(r: Recipe) -> Recipe:
    """Impossible values are errors naming the key."""
    from .tasks import ALL_DIMENSIONS

    _check(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "device",
           "must be auto, cpu or cuda[:N]")
    _check(r.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
    _check(r.seed >= 0, "seed", "must be >= 0 (numpy seeds are unsigned)")
    total = sum(t.probability for t in r.tasks.values())
    _check(len(r.tasks) > 0, "tasks", "at least one task is needed")
    for k, t in r.tasks.items():
        _check(0.0 <= t.probability <= 1.0, f"tasks.{k}.probability", "must be in [0, 1]")
        _check(len(t.dimensions) > 0, f"tasks.{k}.dimensions", "at least one dimension is needed")
        for d in t.dimensions:
            _check(d in ALL_DIMENSIONS, f"tasks.{k}.dimensions",
                   f"unknown dimension '{d}'{_suggest(d, ALL_DIMENSIONS)}")
        if t.fixed_prompt is not None:
            _check("text alignment" not in t.dimensions, f"tasks.{k}.dimensions",
                   "a prompt-free task cannot be judged on text alignment")
    _check(math.isclose(total, 1.0, abs_tol=1e-6), "tasks",
           f"task probabilities must sum to 1, got {total:g}")
    y = r.synth
    _check(y.n >= 1, "synth.n", "must be >= 1")
    _check(y.size >= 16, "synth.size", "must be >= 16 pixels")
    _check(1 <= y.min_objects <= y.max_objects, "synth.min_objects",
           "need 1 <= min_objects <= max_objects (removal needs an object)")
    c = r.curate
    _check(c.select > 0, "curate.select", "must be positive")
    _check(c.mode in ("flat", "hierarchical"), "curate.mode", "must be flat or hierarchical")
    _check(c.backend in ("auto", "faiss", "sklearn"), "curate.backend", "must be auto, faiss or sklearn")
    _check(c.batch_size > 0, "curate.batch_size", "must be positive")
    _check(c.num_workers >= 0, "curate.num_workers", "must be >= 0")
    _check(c.shard_size > 0, "curate.shard_size", "must be positive")
    _check(0.0 < c.dedup_threshold <= 1.0, "curate.dedup_threshold", "must be in (0, 1]")
    _check(c.min_size >= 1, "curate.min_size", "must be >= 1")
    _check(c.coarse_clusters >= 0, "curate.coarse_clusters", "must be >= 0 (0 = sqrt(select))")
    _check(c.kmeans_iters >= 1, "curate.kmeans_iters", "must be >= 1")
    _check(c.leaf_quota >= 1, "curate.leaf_quota", "must be >= 1")
    _check(c.rank_timeout_s > 0, "curate.rank_timeout_s", "must be positive")
    g = r.generate
    _check(g.candidates >= 2, "generate.candidates", "need at least 2 candidates to pick best and worst")
    _check(g.resolution > 0 and g.resolution % 16 == 0, "generate.resolution", "must be a positive multiple of 16")
    for name in ("steps", "guidance", "true_cfg", "shift"):
        lo, hi = getattr(g, name)
        _check(lo <= hi, f"generate.{name}", f"range lower bound {lo} > upper bound {hi}")
        _check(lo > 0, f"generate.{name}", "must be positive")
    _check(len(g.negative_prompts) > 0, "generate.negative_prompts", "give at least one (may be \"\")")
    m = g.masks
    _check(0 < m.fill_min_frac <= m.fill_max_frac < 1, "generate.masks.fill_min_frac",
           "need 0 < fill_min_frac <= fill_max_frac < 1")
    _check(1 < m.extend_min_ratio <= m.extend_max_ratio, "generate.masks.extend_min_ratio",
           "need 1 < extend_min_ratio <= extend_max_ratio")
    _check(0 <= m.stroke_probability <= 1, "generate.masks.stroke_probability", "must be in [0, 1]")
    _check(m.removal_dilate >= 0, "generate.masks.removal_dilate", "must be >= 0")
    _check(0 <= m.segment_min_area < m.segment_max_area <= 1, "generate.masks.segment_min_area",
           "need 0 <= segment_min_area < segment_max_area <= 1")
    _check(0 <= m.segment_min_iou <= 1, "generate.masks.segment_min_iou", "must be in [0, 1]")
    _check(0 <= m.segment_min_stability <= 1, "generate.masks.segment_min_stability", "must be in [0, 1]")
    _check(m.segment_points_per_side >= 1, "generate.masks.segment_points_per_side", "must be >= 1")
    o = g.override
    for name in ("steps", "guidance", "true_cfg"):
        rng = getattr(o, name)
        if rng is not None:
            _check(0 < rng[0] <= rng[1], f"generate.override.{name}", "need 0 < lower bound <= upper bound")
    _check(o.negative_prompts is None or len(o.negative_prompts) > 0, "generate.override.negative_prompts",
           "give at least one (may be \"\"), or null")
    _check(o.resolution is None or (o.resolution > 0 and o.resolution % 16 == 0), "generate.override.resolution",
           "must be a positive multiple of 16, or null")
    from .tasks import EXTEND_DIRECTIONS
    _check(len(m.extend_directions) > 0 and all(d in EXTEND_DIRECTIONS for d in m.extend_directions),
           "generate.masks.extend_directions", f"each must be one of {', '.join(EXTEND_DIRECTIONS)}")
    _check(g.batch_size > 0, "generate.batch_size", "must be positive")
    _check(g.max_sequence_length > 0, "generate.max_sequence_length", "must be positive")
    _check(r.pairs.min_annotators >= 1, "pairs.min_annotators", "must be >= 1")
    _check(r.pairs.train_min_margin >= 0, "pairs.train_min_margin", "must be >= 0")
    _check(0 <= r.pairs.test_fraction < 1, "pairs.test_fraction", "must be in [0, 1)")
    _check(r.pairs.agreement in ("all", "agree"), "pairs.agreement", "must be all or agree")
    w = r.reward
    _check(w.query_mode in ("full", "task", "none", "fixed"), "reward.query_mode",
           "must be full, task, none or fixed")
    _check(w.normalise in ("two_way", "full_vocab"), "reward.normalise", "must be two_way or full_vocab")
    _check(w.lr > 0, "reward.lr", "learning rate must be positive")
    _check(w.batch_size > 0, "reward.batch_size", "must be positive")
    _check(w.image_size > 0 and w.image_size % 28 == 0, "reward.image_size", "must be a positive multiple of 28")
    _check(w.grad_accum >= 1, "reward.grad_accum", "must be >= 1")
    _check(w.mixed_precision in ("no", "bf16"), "reward.mixed_precision",
           "must be no or bf16 (fp16 needs loss scaling, which is not implemented)")
    _check(w.epochs >= 1 or w.max_steps > 0, "reward.epochs", "must be >= 1 (or set reward.max_steps)")
    _check(w.max_steps >= 0, "reward.max_steps", "must be >= 0 (0 = epochs decide)")
    _check(w.eval_every >= 0, "reward.eval_every", "must be >= 0 (0 = only at the end)")
    _check(w.save_every >= 0, "reward.save_every", "must be >= 0 (0 = only at the end)")
    _check(w.max_nonfinite >= 1, "reward.max_nonfinite", "must be >= 1")
    _check(w.log_every >= 1, "reward.log_every", "must be >= 1")
    _check(w.warmup_steps >= 0, "reward.warmup_steps", "must be >= 0")
    _check(w.keep_checkpoints >= 1, "reward.keep_checkpoints", "must be >= 1")
    _check(w.lora_rank >= 1, "reward.lora_rank", "LoRA rank must be >= 1")
    _check(w.lora_alpha > 0, "reward.lora_alpha", "must be positive")
    _check(0.0 <= w.lora_dropout < 1.0, "reward.lora_dropout", "must be in [0, 1)")
    _check(len(w.lora_targets) > 0, "reward.lora_targets", "name at least one module")
    _check(w.max_grad_norm >= 0, "reward.max_grad_norm", "must be >= 0 (0 = no clipping)")
    _check(w.weight_decay >= 0, "reward.weight_decay", "must be >= 0")
    _check(bool(w.yes_token) and bool(w.no_token) and w.yes_token != w.no_token, "reward.yes_token",
           "yes and no tokens must be two different non-empty strings")
    q = r.rl
    _check(q.lr > 0, "rl.lr", "learning rate must be positive")
    _check(q.batch_size > 0, "rl.batch_size", "must be positive")
    _check(q.rollout_steps >= 1, "rl.rollout_steps", "must be >= 1")
    _check(0 <= q.t1 <= q.t2, "rl.t1", f"need 0 <= t1 <= t2, got t1={q.t1}, t2={q.t2}")
    _check(q.t2 < q.rollout_steps, "rl.t2", f"must be < rl.rollout_steps ({q.rollout_steps})")
    _check(0 < q.lambda_ <= 1, "rl.lambda", "reward upper bound must be in (0, 1]")
    _check(0 <= q.tau < 1, "rl.tau", "EMA decay must be in [0, 1)")
    _check(q.resolution > 0 and q.resolution % 16 == 0, "rl.resolution", "must be a positive multiple of 16")
    _check(q.mixed_precision in ("no", "bf16"), "rl.mixed_precision",
           "must be no or bf16 (fp16 needs loss scaling, which is not implemented)")
    _check(q.steps >= 1, "rl.steps", "must be >= 1")
    _check(q.lr_warmup >= 0, "rl.lr_warmup", "must be >= 0 (steps)")
    _check(q.lr_schedule in LR_SCHEDULES, "rl.lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
    _check(q.heldout_n >= 1, "rl.heldout_n", "must be >= 1")
    _check(not q.keep_best or q.eval_every > 0, "rl.keep_best", "needs rl.eval_every > 0 (the held-out score it selects on)")
    _check(q.save_every >= 0, "rl.save_every", "must be >= 0 (0 = only at the end)")
    _check(q.eval_every >= 0, "rl.eval_every", "must be >= 0 (0 = never)")
    _check(q.log_every >= 1, "rl.log_every", "must be >= 1")
    _check(q.lora_rank >= 1, "rl.lora_rank", "LoRA rank must be >= 1")
    _check(q.lora_alpha > 0, "rl.lora_alpha", "must be positive")
    _check(q.guidance >= 0, "rl.guidance", "must be >= 0")
    _check(q.true_cfg >= 1.0, "rl.true_cfg", "must be >= 1 (1 = no true CFG)")
    _check(q.max_sequence_length > 0, "rl.max_sequence_length", "must be positive")
    _check(q.max_grad_norm >= 0, "rl.max_grad_norm", "must be >= 0 (0 = no clipping)")
    _check(q.max_nonfinite >= 1, "rl.max_nonfinite", "must be >= 1")
    e = r.eval
    _check(e.seed >= 0, "eval.seed", "must be >= 0")
    _check(e.steps >= 1, "eval.steps", "must be >= 1")
    _check(e.resolution > 0 and e.resolution % 16 == 0, "eval.resolution", "must be a positive multiple of 16")
    _check(e.batch_size > 0, "eval.batch_size", "must be positive")
    _check(e.guidance >= 0, "eval.guidance", "must be >= 0")
    _check(e.true_cfg >= 1.0, "eval.true_cfg", "must be >= 1 (1 = no true CFG)")
    _check(e.max_sequence_length > 0, "eval.max_sequence_length", "must be positive")
    _check(e.grid_samples >= 0, "eval.grid_samples", "must be >= 0")
    _check(e.metrics.hpsv3_pixels >= 28 * 28, "eval.metrics.hpsv3_pixels", "must be at least 784 (28 x 28)")
    o = e.override
    _check(o.steps is None or o.steps >= 1, "eval.override.steps", "must be >= 1, or null")
    _check(o.guidance is None or o.guidance >= 0, "eval.override.guidance", "must be >= 0, or null")
    _check(o.true_cfg is None or o.true_cfg >= 1.0, "eval.override.true_cfg", "must be >= 1, or null")
    _check(o.resolution is None or (o.resolution > 0 and o.resolution % 16 == 0), "eval.override.resolution",
           "must be a positive multiple of 16, or null")
    _check(r.text_cache.batch_size > 0, "text_cache.batch_size", "must be positive")
    _check(r.demo.benchmark_per_task >= 0, "demo.benchmark_per_task", "must be >= 0 (0 = the pool's test split)")
    _check(r.replicate.seeds >= 1, "replicate.seeds", "must be >= 1")
    _check(r.replicate.benchmark_per_task >= 1, "replicate.benchmark_per_task", "must be >= 1")
    _check(r.replicate.validation_per_task >= 0, "replicate.validation_per_task", "must be >= 0 (0 = none)")
    _check(r.replicate.jobs >= 1, "replicate.jobs", "must be >= 1 (1 = one seed after another)")
    return r


def resolve_device(device: str) -> str:
    """The recipe's `device` as a torch device string ("auto": CUDA when there is one)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name: str):
    """The recipe's `dtype` name as a torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():  # a folder named like a bundled recipe is not one
        if not p.exists():
            raise InputError("recipe file not found", path=p)
        return p
    for d in (RECIPES_DIR, _PACKAGED_RECIPES):
        cand = d / f"{name_or_path}.yaml"
        if cand.exists():
            return cand
    names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.exists() else []
    raise InputError(f"no bundled recipe '{name_or_path}'{_suggest(name_or_path, names)}; "
                     f"bundled: {', '.join(names)}", field="--recipe")


def _parse_override(item: str):
    if "=" not in item:
        raise InputError(f"expected key.sub=value, got '{item}'", field="--set")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"empty key in '{item}'", field="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(data: dict, key: str, value):
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
            node[p] = nxt
        if not isinstance(nxt, dict):
            raise InputError(f"'{p}' is not a section", field=key)
        node = nxt
    node[parts[-1]] = value


def load_recipe(name_or_path: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path,
                         line=None if line is None else line + 1) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read recipe ({e.__class__.__name__})", path=path) from None
    if not isinstance(data, dict):
        raise InputError("a recipe must be a mapping", path=path)
    parsed = [_parse_override(item) for item in overrides]
    for k, v in parsed:
        _apply_override(data, k, v)
    try:
        recipe = _build(Recipe, data)
        recipe = dataclasses.replace(recipe, source=str(path))
        return validate(recipe)
    except InputError as e:
        # Name the --set key that caused it, so "no.such.key" is reported whole.
        for k, _ in parsed:
            if not e.field:
                break
            message = str(e).split(": ", 1)[-1] if e.field in str(e) else str(e)
            if k == e.field or k.startswith(e.field + "."):
                raise InputError(message, field=f"--set {k}") from None
            if e.field.startswith((k + ".", k + "[")):  # inside a section or list given by --set
                raise InputError(message, field=f"--set {e.field}") from None
        if e.path is None:
            raise InputError(str(e), path=path) from None
        raise


def replace(recipe: Recipe, **changes) -> Recipe:
    return validate(dataclasses.replace(recipe, **changes))

"""The one denoising implementation: `generate`, the RL reference and policy rollouts, and `eval` all
call these functions, and a parity test shows `full_rollout` reproduces `FluxFillPipeline.__call__`.

Flow matching as in diffusers' FlowMatchEulerDiscreteScheduler: x_sigma = (1 - sigma) x0 + sigma eps,
the transformer predicts v = eps - x0, an Euler step is x + (sigma_next - sigma) v, and the one-step
estimate of the clean latent is x0 = x_t - sigma_t v (ReFL, paper §4.4).

Latents are "packed" as the pipeline packs them: (B, (h/2)(w/2), 4C). The Fill condition is the packed
masked-image latents followed by the packed, pixel-unshuffled mask, concatenated on the channel axis;
the transformer sees [noisy | masked image | mask].

The transformer is always passed explicitly, so the caller can pass a peft-wrapped, EMA or reference
copy; the pipeline is used only for its VAE, text encoders, scheduler config and packing helpers.
Gradient mode is the caller's choice everywhere except `encode_prompts` and `prepare_condition`
(inputs, never trained through) and `full_rollout` (sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

# FluxTransformer2DModel multiplies timestep and guidance by 1000; the pipeline passes t / 1000 with
# t = sigma * num_train_timesteps (1000 for every FLUX scheduler config).
_T_SCALE = 1000.0


# ----------------------------------------------------------------------------------------------
# Text embeddings
# ----------------------------------------------------------------------------------------------
@dataclass
class TextEmbeds:
    """T5 sequence embeddings (B, L, D), CLIP pooled embeddings (B, P) and text position ids (L, 3).

    `prompts` (optional) names the rows so a cache of unique prompts can be looked up by text.
    """
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    prompts: tuple[str, ...] | None = field(default=None)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device=None, dtype=None) -> "TextEmbeds":
        return replace(self, prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
                       pooled_prompt_embeds=self.pooled_prompt_embeds.to(device=device, dtype=dtype),
                       text_ids=self.text_ids.to(device=device, dtype=dtype))

    def select(self, index: Sequence[int] | torch.Tensor) -> "TextEmbeds":
        """Rows in the given order (repeats allowed): one row per latent in a batch."""
        idx = torch.as_tensor(list(index) if not torch.is_tensor(index) else index, dtype=torch.long,
                              device=self.prompt_embeds.device)
        names = tuple(self.prompts[i] for i in idx.tolist()) if self.prompts is not None else None
        return replace(self, prompt_embeds=self.prompt_embeds[idx],
                       pooled_prompt_embeds=self.pooled_prompt_embeds[idx.to(self.pooled_prompt_embeds.device)],
                       prompts=names)

    def lookup(self, prompts: Sequence[str]) -> "TextEmbeds":
        """Rows for these prompt texts (each must be in `self.prompts`)."""
        if self.prompts is None:
            raise KeyError("these embeddings carry no prompt names")
        pos = {p: i for i, p in enumerate(self.prompts)}
        missing = [p for p in prompts if p not in pos]
        if missing:
            raise KeyError(f"prompts not in the cache: {missing[:3]}")
        return self.select([pos[p] for p in prompts])

    @staticmethod
    def cat(parts: Sequence["TextEmbeds"]) -> "TextEmbeds":
        names = None
        if all(p.prompts is not None for p in parts):
            names = tuple(n for p in parts for n in p.prompts)
        return TextEmbeds(torch.cat([p.prompt_embeds for p in parts]),
                          torch.cat([p.pooled_prompt_embeds for p in parts]), parts[0].text_ids, names)

    def save(self, path):
        """Write to safetensors (prompt texts go into the metadata), atomically."""
        import json

        from .artifacts import save_tensors

        meta = {"format": "onereward.text_embeds.v1"}
        if self.prompts is not None:
            meta["prompts"] = json.dumps(list(self.prompts))
        save_tensors(path, {"prompt_embeds": self.prompt_embeds, "pooled_prompt_embeds": self.pooled_prompt_embeds,
                            "text_ids": self.text_ids}, metadata=meta)

    @classmethod
    def load(cls, path, device="cpu") -> "TextEmbeds":
        import json

        from safetensors import safe_open

        from .artifacts import load_tensors
        from .errors import InputError

        t = load_tensors(path, device=device)
        missing = {"prompt_embeds", "pooled_prompt_embeds", "text_ids"} - set(t)
        if missing:
            raise InputError(f"not a text-embedding file (missing {', '.join(sorted(missing))})", path=path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        prompts = tuple(json.loads(meta["prompts"])) if "prompts" in meta else None
        return cls(t["prompt_embeds"], t["pooled_prompt_embeds"], t["text_ids"], prompts)


_warned_truncation = False


def _warn_truncation(pipe, prompts, max_sequence_length: int):
    """One clear warning per process instead of diffusers' per-call one (which prints the cut text
    using CLIP's length, so it is often empty)."""
    global _warned_truncation
    tok = getattr(pipe, "tokenizer_2", None)
    if _warned_truncation or tok is None:
        return
    long = [p for p in prompts if len(tok(p, truncation=False).input_ids) > max_sequence_length]
    if long:
        import warnings

        _warned_truncation = True
        warnings.warn(f"prompts longer than max_sequence_length={max_sequence_length} T5 tokens are truncated, "
                      f"e.g. {long[0]!r}", stacklevel=4)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 512, device=None) -> TextEmbeds:
    """CLIP pooled + T5 sequence embeddings through the pipeline's own `encode_prompt`."""
    import logging

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = device if device is not None else pipe._execution_device
    _warn_truncation(pipe, prompts, max_sequence_length)
    log = logging.getLogger(type(pipe).__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        pe, pooled, ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                             max_sequence_length=max_sequence_length)
    finally:
        log.setLevel(level)
    return TextEmbeds(pe, pooled, ids, tuple(prompts))


def encode_unique(pipe, prompts: Sequence[str], max_sequence_length: int = 512, device=None,
                  batch_size: int = 64) -> TextEmbeds:
    """Encode each distinct prompt once (in batches); use `.lookup(prompts)` to expand per sample."""
    uniq = list(dict.fromkeys(prompts))
    parts = [encode_prompts(pipe, uniq[i:i + batch_size], max_sequence_length, device)
             for i in range(0, len(uniq), batch_size)]
    return TextEmbeds.cat(parts)


# ----------------------------------------------------------------------------------------------
# Fill conditioning
# ----------------------------------------------------------------------------------------------
@dataclass
class FillCondition:
    """Packed [masked-image latents | mask] (B, seq, C), the pixel size, and latent position ids (seq, 3)."""
    cond: torch.Tensor
    height: int
    width: int
    img_ids: torch.Tensor

    def __len__(self) -> int:
        return self.cond.shape[0]

    def to(self, device=None, dtype=None) -> "FillCondition":
        return replace(self, cond=self.cond.to(device=device, dtype=dtype), img_ids=self.img_ids.to(device=device))

    def select(self, index) -> "FillCondition":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.cond.device)
        return replace(self, cond=self.cond[idx])

    def repeat(self, n: int) -> "FillCondition":
        """Each row n times in a row (for n candidates per condition)."""
        return replace(self, cond=self.cond.repeat_interleave(n, dim=0))


def latent_size(pipe, height: int, width: int) -> tuple[int, int]:
    """Latent grid before packing (divisible by 2), as the pipeline computes it."""
    f = pipe.vae_scale_factor
    return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))


def check_size(pipe, height: int, width: int):
    m = pipe.vae_scale_factor * 2
    if height % m or width % m:
        raise ValueError(f"height and width must be multiples of {m}, got {height}x{width}")


@torch.no_grad()
def prepare_condition(pipe, images: torch.Tensor, masks: torch.Tensor, generator=None, *, dtype=None,
                      device=None) -> FillCondition:
    """Fill conditioning for images (B,3,H,W) in [0,1] and masks (B,1,H,W) (white = edit).

    Same arithmetic and the same VAE sampling (consuming `generator`) as FluxFillPipeline: the mask is
    binarised at 0.5, masked pixels are set to 0 in [-1, 1] space, the masked image is VAE-encoded.
    """
    B, _, H, W = images.shape
    check_size(pipe, H, W)
    device = device if device is not None else pipe.vae.device
    dtype = dtype or pipe.transformer.dtype
    if masks.dim() == 3:
        masks = masks[:, None]
    init = (2.0 * images.to(torch.float32) - 1.0).to(pipe.vae.device)
    mask = (masks.to(torch.float32) >= 0.5).to(torch.float32).to(pipe.vae.device)
    masked = (init * (1 - mask)).to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    mask_packed, image_packed = pipe.prepare_mask_latents(
        mask, masked, B, pipe.vae.config.latent_channels, 1, H, W, dtype, device, generator)
    h, w = latent_size(pipe, H, W)
    img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, device, dtype)
    return FillCondition(torch.cat((image_packed, mask_packed), dim=-1), H, W, img_ids)


# ----------------------------------------------------------------------------------------------
# Schedule and noise
# ----------------------------------------------------------------------------------------------
def default_mu(pipe, height: int, width: int) -> float:
    """Resolution-dependent shift: linear in the image token count (FLUX's calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

    c = pipe.scheduler.config
    f = pipe.vae_scale_factor
    seq = (int(height) // f // 2) * (int(width) // f // 2)
    return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def make_sigmas(pipe, num_steps: int, height: int, width: int, mu=None) -> torch.Tensor:
    """The N+1 sigmas (last one 0) FluxFillPipeline uses, via a private copy of its scheduler.

    mu=None takes the pipeline's resolution-dependent shift; a float overrides it; a sequence gives
    one schedule per batch item, shape (B, N+1).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if mu is not None and not isinstance(mu, (int, float)) and not (torch.is_tensor(mu) and mu.dim() == 0):
        return torch.stack([make_sigmas(pipe, num_steps, height, width, float(m)) for m in mu])
    if mu is None:
        mu = default_mu(pipe, height, width)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=float(mu), device="cpu")
    return sched.sigmas.clone()


def initial_latents(pipe, batch: int, height: int, width: int, generator, device, dtype) -> torch.Tensor:
    """Packed Gaussian noise, drawn exactly as FluxFillPipeline.prepare_latents draws it.

    The pipeline first VAE-encodes the input image with `sample_mode="sample"` (one latent-sized normal
    draw from `generator`, discarded at strength 1); we make the same draw without running the encoder,
    so the noise and the masked-image sample that follow come out identical.
    """
    from diffusers.utils.torch_utils import randn_tensor

    check_size(pipe, height, width)
    f = pipe.vae_scale_factor
    C = pipe.vae.config.latent_channels
    randn_tensor((batch, C, int(height) // f, int(width) // f), generator=generator, device=pipe.vae.device,
                 dtype=pipe.vae.dtype)
    h, w = latent_size(pipe, height, width)
    noise = randn_tensor((batch, C, h, w), generator=generator, device=torch.device(device), dtype=dtype)
    return pipe._pack_latents(noise, batch, C, h, w)


# ----------------------------------------------------------------------------------------------
# Model calls and steps
# ----------------------------------------------------------------------------------------------
def _unwrap(module):
    """The module that owns `.config` through DDP/accelerate and peft wrappers."""
    m = getattr(module, "module", module)
    if not hasattr(m, "config") or not hasattr(getattr(m, "config", None), "guidance_embeds"):
        base = getattr(m, "get_base_model", None)
        if base is not None:
            m = base()
    return m


def _per_item(x, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(batch) if t.dim() == 0 else t.reshape(batch)


def _rows(embeds: TextEmbeds, batch: int) -> TextEmbeds:
    if len(embeds) == batch:
        return embeds
    if len(embeds) == 1:
        return replace(embeds, prompt_embeds=embeds.prompt_embeds.expand(batch, -1, -1),
                       pooled_prompt_embeds=embeds.pooled_prompt_embeds.expand(batch, -1))
    raise ValueError(f"{len(embeds)} text embeddings for a batch of {batch}")


def velocity(transformer, latents, cond: FillCondition, embeds: TextEmbeds, sigma, guidance, true_cfg=1.0,
             neg_embeds: TextEmbeds | None = None) -> torch.Tensor:
    """v = eps - x0 at noise level `sigma` (float or (B,)), in one transformer call.

    `guidance` (float or (B,)) feeds FLUX's distilled guidance embedding when the model has one. With
    `true_cfg` > 1 (float or (B,)) the batch is doubled as [negative, positive] and
    v = v_neg + true_cfg (v_pos - v_neg), as OneReward's FluxFillCFGPipeline; rows whose true_cfg is
    <= 1 get v_pos unchanged.
    """
    B = latents.shape[0]
    dev, dt = latents.device, latents.dtype
    embeds = _rows(embeds, B)
    cfg = _per_item(true_cfg, B, dev)
    use_cfg = bool((cfg > 1.0).any())
    # The pipeline's arithmetic: t = sigma * 1000 in float32, cast to the latent dtype, then / 1000.
    t = (_per_item(sigma, B, dev) * _T_SCALE).to(dt)
    g = None
    if getattr(_unwrap(transformer).config, "guidance_embeds", False):
        g = _per_item(guidance, B, dev)
    hidden = torch.cat((latents, cond.cond.to(dev, dt)), dim=2)
    pe, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds
    if use_cfg:
        if neg_embeds is None:
            raise ValueError("true_cfg > 1 needs neg_embeds (encode the negative prompt, \"\" by default)")
        neg = _rows(neg_embeds, B)
        hidden = torch.cat([hidden, hidden])
        pe = torch.cat([neg.prompt_embeds, pe])
        pooled = torch.cat([neg.pooled_prompt_embeds, pooled])
        t = torch.cat([t, t])
        g = torch.cat([g, g]) if g is not None else None
    out = transformer(hidden_states=hidden, timestep=t / _T_SCALE, guidance=g, pooled_projections=pooled,
                      encoder_hidden_states=pe, txt_ids=embeds.text_ids, img_ids=cond.img_ids,
                      return_dict=False)[0]
    if not use_cfg:
        return out
    v_neg, v_pos = out.chunk(2, dim=0)
    c = cfg.to(v_pos.dtype).view(B, 1, 1)
    return torch.where(c > 1.0, v_neg + c * (v_pos - v_neg), v_pos)


def _sigma_at(sigmas: torch.Tensor, i: int, device):
    """sigma_i as a 0-d tensor (shared schedule) or (B,1,1) (one schedule per item)."""
    s = sigmas[..., i].to(device)
    return s if s.dim() == 0 else s.view(-1, 1, 1)


def euler_step(x, v, sigma, sigma_next):
    """x + (sigma_next - sigma) v in float32, cast back to v's dtype (FlowMatchEulerDiscreteScheduler.step)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)


def denoise(transformer, latents, cond: FillCondition, embeds: TextEmbeds, sigmas: torch.Tensor, start: int,
            stop: int, guidance, true_cfg=1.0, neg_embeds: TextEmbeds | None = None) -> torch.Tensor:
    """Euler steps i in [start, stop) from latents at sigmas[start] to sigmas[stop]; grad mode is the caller's."""
    n = sigmas.shape[-1] - 1
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    for i in range(start, stop):
        s, s_next = _sigma_at(sigmas, i, latents.device), _sigma_at(sigmas, i + 1, latents.device)
        v = velocity(transformer, latents, cond, embeds, sigmas[..., i], guidance, true_cfg, neg_embeds)
        latents = euler_step(latents, v, s, s_next)
    return latents


def predict_x0(x_t, v, sigma):
    """One-step clean-latent estimate x0 = x_t - sigma v (sigma: float, 0-d or (B,))."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x_t.device)
    if s.dim() > 0:
        s = s.view(-1, *([1] * (x_t.dim() - 1)))
    return x_t - s * v


def decode(pipe, packed_latents, height: int, width: int) -> torch.Tensor:
    """Packed latents -> images (B,3,H,W) in [0,1]; differentiable (no no_grad inside)."""
    lat = pipe._unpack_latents(packed_latents, height, width, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return ((img + 1) / 2).clamp(0, 1)


@torch.no_grad()
def full_rollout(pipe, images, masks, embeds: TextEmbeds, num_steps: int, guidance, generator, true_cfg=1.0,
                 neg_embeds: TextEmbeds | None = None, mu=None, *, transformer=None) -> torch.Tensor:
    """Sample edits for (images, masks): the FluxFillPipeline (strength 1) computation, images in [0,1].

    `generator` may be one torch.Generator or one per item; `mu`, `guidance`, `true_cfg` may be per item.
    """
    transformer = transformer if transformer is not None else pipe.transformer
    B, _, H, W = images.shape
    device = next(transformer.parameters()).device
    dtype = embeds.prompt_embeds.dtype
    sigmas = make_sigmas(pipe, num_steps, H, W, mu)
    latents = initial_latents(pipe, B, H, W, generator, device, dtype)
    cond = prepare_condition(pipe, images, masks, generator, dtype=dtype, device=device)
    embeds = embeds.to(device)
    neg_embeds = neg_embeds.to(device) if neg_embeds is not None else None
    latents = denoise(transformer, latents, cond, embeds, sigmas, 0, num_steps, guidance, true_cfg, neg_embeds)
    return decode(pipe, latents, H, W)

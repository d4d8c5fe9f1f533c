"""FSDP2 for `rl` full fine-tuning: the policy, its frozen reference and its EMA sharded over processes.

`accelerate launch --config_file recipes/accelerate/fsdp-rl.yaml` exports the FSDP settings to the
environment; `rl` reads them (`from_launch`) and shards the transformer itself with torch's
`fully_shard` (FSDP2), one unit per FLUX double/single block plus the root, instead of going through
`accelerate.prepare`: the reference rollout needs the bare module (the frozen copy or the EMA swapped
into the trainable weights), which FSDP2 keeps callable as it is. The sharded parameters are DTensors;
the EMA is a clone of them (sharded the same way), the frozen reference of the static mode is sharded
too, AdamW's state follows its parameters. Gradients are reduce-scattered (averaged) by FSDP itself.

Checkpoints: every rank writes its own shards (`*.rank00.safetensors`, ...), nothing is gathered, and a
resume needs the same number of processes (the run fingerprint records it). The final `policy/` and
`ema/` folders are gathered onto rank 0 and written as a plain diffusers transformer folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# FLUX's repeated blocks: one FSDP unit each (what accelerate's TRANSFORMER_BASED_WRAP would pick).
FLUX_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


@dataclass(frozen=True)
class ShardSpec:
    world: int
    offload_params: bool = False  # fsdp_offload_params: sharded weights/grads/optimizer state live on the CPU
    reshard_after_forward: bool = True  # FULL_SHARD (True) or SHARD_GRAD_OP (False)


def from_launch(env=None) -> ShardSpec | None:
    """The FSDP settings `accelerate launch` exported from its config file, or None without FSDP."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    # FSDP2 configs say true/false, FSDP1 configs a strategy name (accelerate exports both lowercased).
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "") or env.get("FSDP_SHARDING_STRATEGY", "full_shard")
    reshard_after = reshard.lower() not in ("false", "shard_grad_op", "no_reshard", "2", "3")
    return ShardSpec(world=int(env.get("WORLD_SIZE", "1")),
                     offload_params=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
                     reshard_after_forward=reshard_after)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is returned as it is)."""
    return t.to_local() if is_dtensor(t) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A local shard `t` (as `local(ref)` was saved) wrapped as a DTensor placed like `ref`."""
    if not is_dtensor(ref):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to(local(ref).device, ref.dtype), ref.device_mesh, ref.placements,
                              shape=ref.shape, stride=ref.stride(), run_check=False)


class Sharder:
    """Shards FLUX transformers over one device mesh of all processes."""

    def __init__(self, spec: ShardSpec, device: torch.device, param_dtype=None):
        from torch.distributed.device_mesh import init_device_mesh

        self.spec = spec
        self.mesh = init_device_mesh(device.type, (spec.world,))
        self.param_dtype = param_dtype  # bf16 all-gathers over fp32 masters (gradients reduced in fp32)

    def __call__(self, module, upcast: bool = False):
        """fully_shard each block, then the root. `upcast`: the trainable weights become fp32 masters one
        block at a time, just before that block is sharded (the whole fp32 model never sits in one place)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = dict(mesh=self.mesh, reshard_after_forward=self.spec.reshard_after_forward)
        if self.spec.offload_params:
            kw["offload_policy"] = CPUOffloadPolicy()
        if self.param_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)

        def up(m, recurse=True):
            if upcast:
                for p in m.parameters(recurse=recurse):
                    if p.requires_grad:
                        p.data = p.data.float()

        blocks = [m for m in module.modules() if type(m).__name__ in FLUX_BLOCKS]
        inner = {id(x) for b in blocks for x in b.modules()}
        for b in blocks:
            up(b)
            fully_shard(b, **kw)
        for m in module.modules():  # what the blocks leave: embedders, norms, output projection
            if id(m) not in inner:
                up(m, recurse=False)
        fully_shard(module, **kw)
        return module


def gathered(tensors: dict[str, torch.Tensor], dtype=None, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors on the CPU. A collective: every rank calls it, and only ranks with `keep` hold the
    result (the others drop each full tensor as soon as it is gathered: a 12B state is 24 GB in bf16)."""
    out = {}
    for n, t in tensors.items():
        full = t.full_tensor() if is_dtensor(t) else t
        if keep:
            out[n] = full.detach().to("cpu", dtype or full.dtype)
    return out


def save_transformer_folder(transformer, state: dict[str, torch.Tensor], folder: Path, max_shard_size="10GB"):
    """A diffusers transformer folder (config.json + safetensors shards) from a gathered state dict,
    what `FluxTransformer2DModel.from_pretrained` reads. (save_pretrained would write the FSDP wrapper's
    class name into config.json and cannot take a gathered state.)"""
    import diffusers
    from huggingface_hub import save_torch_state_dict

    cls = next(c for c in type(transformer).__mro__ if c.__module__.startswith("diffusers."))
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    (folder / "config.json").write_text(json.dumps({"_class_name": cls.__name__,
                                                     "_diffusers_version": diffusers.__version__, **cfg},
                                                    indent=2, sort_keys=True) + "\n")
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, folder,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)

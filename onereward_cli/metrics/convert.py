"""One-time conversion of a pickled PyTorch checkpoint (.pt/.pth/.bin) to safetensors.

    python -m onereward_cli.metrics.convert ImageReward.pt imagereward/ImageReward.safetensors
    python -m onereward_cli.metrics.convert HPS_v2.1_compressed.pt hps_v2.1.safetensors --key state_dict

The metric loaders only read safetensors, so evaluation never unpickles anything. This script is the
single, explicit exception a user runs once, by hand: it uses `torch.load(weights_only=True)`, PyTorch's
restricted unpickler that rebuilds tensors and plain containers only and refuses arbitrary classes
and code. A checkpoint that needs more than that is refused, not loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(src, dst, key: str | None = None) -> int:
    """Write the state dict in `src` (optionally `src[key]`) to `dst` as safetensors; returns #tensors."""
    import torch

    from ..artifacts import save_tensors
    from ..errors import InputError

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError("checkpoint not found", path=src)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything the restricted unpickler refuses
        raise InputError(f"refused by torch.load(weights_only=True): {e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}", path=src) from None
    if key:
        if not isinstance(obj, dict) or key not in obj:
            keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(f"no '{key}' entry (top-level keys: {keys})", path=src, field="--key")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise InputError(f"expected a state dict, got {type(obj).__name__}", path=src)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not tensors:
        raise InputError("no tensors in the state dict", path=src)
    # safetensors refuses shared storage; clone so tied weights are written once each.
    save_tensors(dst, {k: v.clone() for k, v in tensors.items()},
                 metadata={"converted_from": src.name, "skipped_non_tensors": ",".join(skipped)[:1000]})
    return len(tensors)


def main(argv=None) -> int:
    from ..errors import InputError

    ap = argparse.ArgumentParser(prog="python -m onereward_cli.metrics.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="pickled checkpoint (.pt/.pth/.bin)")
    ap.add_argument("dst", help="output .safetensors file")
    ap.add_argument("--key", default=None, help="take this entry of the loaded dict (e.g. state_dict)")
    args = ap.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.key)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

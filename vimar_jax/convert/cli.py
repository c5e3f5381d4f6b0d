"""`vimar convert`: HF checkpoint directory <-> our layout (see `vimar_jax.convert.io`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF checkpoint directory (or, with --to-hf, a `vimar convert` output)")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--to-hf", action="store_true",
                        help="write a `vimar convert` output back as the original HF files")
    parser.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                        help="dtype of the converted floating tensors (default: keep the source dtypes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory (only once the conversion succeeded)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="largest safetensors file to write, in GB (default 5)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")


def run(args: argparse.Namespace) -> int:
    from vimar_jax.convert import io
    from vimar_jax.convert.spec import ConversionError

    try:
        if args.to_hf:
            if args.dtype != "keep":
                raise ConversionError("--dtype applies to HF -> vimar only; --to-hf restores the recorded dtypes")
            summary = io.convert_to_hf(args.src, args.dst, overwrite=args.overwrite, progress=args.progress)
        else:
            if args.max_shard_gb <= 0:
                raise ConversionError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
            summary = io.convert_to_vimar(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                          max_shard_bytes=int(args.max_shard_gb * io.GB),
                                          progress=args.progress)
    except ConversionError as e:
        print(f"vimar convert: error: {e}", file=sys.stderr)
        return 1
    print(summary.line(f"{args.src} -> {args.dst}"))
    return 0

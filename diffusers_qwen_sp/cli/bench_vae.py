"""`diffusers-qwen-sp bench-vae`: the patch-parallel VAE's decode / encode time and peak memory per rank at several
degrees, against degree 1 (the measuring is `diffusers_qwen_sp.bench.vae_parallel`)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import positive_int


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-vae",
        help="patch-parallel VAE: decode / encode time and peak memory per rank at degree 1, 2, 4",
        description="Runs the real Qwen-Image VAE architecture (random weights) on gloo processes of one thread each "
        "and prints, per operation, size and degree, the slowest rank's wall and CPU time, the largest rank's peak "
        "live bytes and the max abs diff against degree 1.",
    )
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[512], help="image sides in pixels "
                        "(default: 512)")
    parser.add_argument("--degrees", type=positive_int, nargs="+", default=[1, 2, 4], help="default: 1 2 4")
    parser.add_argument("--no-encode", action="store_true", help="measure the decode only")
    parser.add_argument("--base-dim", type=positive_int, default=None, help="a narrower VAE (default: the real 96)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Any:
    from ..bench.vae_parallel import measure_vae_parallel

    config = {} if args.base_dim is None else {"base_dim": args.base_dim}
    measurement = measure_vae_parallel(
        sizes=tuple(args.sizes), degrees=tuple(args.degrees), encode=not args.no_encode, vae_config=config
    )
    print(measurement.to_markdown())
    return measurement

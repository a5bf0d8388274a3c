"""`diffusers-qwen-sp bench-memory`: what fits where. Per-rank peak memory measured on CPU (gloo, world 2 and 4), and
computed from the real configs for the Qwen-Image family on 2, 4 and 8 GPUs (the measuring is
`diffusers_qwen_sp.bench.memory`)."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any

from ..bench.memory import MODELS, QUICK, QUICK_MODELS, MemorySettings, run_memory_bench, write_memory_outputs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-memory",
        help="per-rank peak memory: measured on CPU, and computed for the real models on 2, 4 and 8 GPUs",
        description="Measures on CPU (gloo) the parameter bytes each rank holds and the peak bytes of live tensors "
        "during a transformer forward, a VAE decode and the prompt encode, for replicated and sharded weights, each "
        "text-encoder placement and the patch-parallel VAE; computes from the real configs which configurations of "
        "Qwen-Image, Edit-2509/2511 and Layered fit 24, 48 and 80 GB cards. Writes memory.json and memory.md.",
    )
    defaults = MemorySettings()
    parser.add_argument("--output-dir", default="bench-results", help="default: bench-results/")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models at world 2, the computed table of Qwen-Image at 1024x1024 only: seconds")
    parser.add_argument("--computed-only", action="store_true", help="only the computed table (no processes)")
    parser.add_argument("--measured-only", action="store_true", help="only the measured run")
    parser.add_argument("--worlds", type=int, nargs="+", default=None,
                        help=f"gloo world sizes (default: {' '.join(map(str, defaults.worlds))})")
    for name in ("layers", "heads", "head_dim", "te_layers", "vae_base_dim", "image_side", "text_tokens",
                 "decode_side"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default: {getattr(defaults, name)}")
    parser.add_argument("--timeout", type=float, default=None, help=f"seconds per world size "
                        f"(default: {defaults.timeout:g})")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> MemorySettings:
    r"""The [`MemorySettings`] of the options given (on top of `QUICK` with `--quick`)."""
    values = {item.name: getattr(args, item.name) for item in fields(MemorySettings)
              if getattr(args, item.name, None) is not None}
    if "worlds" in values:
        values["worlds"] = tuple(values["worlds"])
    return replace(QUICK if args.quick else MemorySettings(), **values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.computed_only and args.measured_only:
        raise ValueError("--computed-only and --measured-only exclude each other; pass one (or neither for both).")
    report = run_memory_bench(settings_from_args(args), computed=not args.measured_only,
                              measured=not args.computed_only, progress=lambda line: print(line, flush=True),
                              models=QUICK_MODELS if args.quick else MODELS)
    files = write_memory_outputs(report, args.output_dir)
    print(f"\n{report['markdown']}")
    print(f"wrote {files['json']}, {files['md']} ({report['wall_s']:.0f} s)")
    return report

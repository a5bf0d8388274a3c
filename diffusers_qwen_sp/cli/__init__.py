"""Command line: `python -m diffusers_qwen_sp {generate,serve,calibrate-teacache,bench,bench-teacache,bench-serve,bench-memory,bench-vae,train-scenes,doctor} ...`
(also `diffusers-qwen-sp`).

One module per command, each with `register(subparsers)`, which adds the command's parser and sets `func` to the
function that runs it; [`main`] parses and calls `args.func(args)`. A new command is a module here and an entry in
`COMMANDS`. Only the command line prints; the library it calls returns its results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, bench_memory, bench_serve, bench_teacache, bench_vae, calibrate, doctor, generate, serve, train_scenes
from ._pipeline import check_image_size, load_pipeline


__all__ = ["COMMANDS", "build_parser", "check_image_size", "load_pipeline", "main"]

# The commands, in the order `--help` lists them.
COMMANDS = (
    generate, serve, calibrate, bench, bench_teacache, bench_serve, bench_memory, bench_vae, train_scenes, doctor
)


def build_parser() -> argparse.ArgumentParser:
    r"""The parser of every command in `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="diffusers-qwen-sp",
        description="Run the Qwen-Image family with diffusers_qwen_sp. Launch with torchrun or accelerate launch for "
        "several processes.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    r"""Run the command line `argv` (default: `sys.argv[1:]`); returns the exit code (2 for a `ValueError`)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

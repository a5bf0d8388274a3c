"""Argument types and option groups shared by the commands, and the parallel config the parallelism flags ask for."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..scenes.model import SCENE_DEFAULT_STEPS


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def threshold(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a threshold >= 0 (e.g. 0.2), got {value}")
    return number


def add_model_arguments(parser: argparse.ArgumentParser, default_size: str, default_steps: str) -> None:
    r"""The options of the model and of one pipeline call, for the commands that load a pipeline."""
    parser.add_argument("--model", default=None, help="Hub id or local folder of a Qwen-Image pipeline "
                        "(e.g. Qwen/Qwen-Image); default: the scene model shipped with the package")
    parser.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    parser.add_argument("--image", action="append", default=None,
                        help="input image for edit and layered pipelines (repeat for several)")
    parser.add_argument("--height", type=positive_int, default=None, help=f"default: {default_size} (scene model: 64)")
    parser.add_argument("--width", type=positive_int, default=None, help=f"default: {default_size} (scene model: 64)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"default: {default_steps} (scene model: {SCENE_DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--true-cfg-scale", type=float, default=4.0,
                        help="true classifier-free guidance scale; <= 1 disables CFG")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: this rank's GPU when CUDA is available, else cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="intra-op threads per process on CPU (default: chosen by the size of the work; 1 for "
                        "small models, whose ops are too small to share)")
    parser.set_defaults(default_size=int(default_size), default_steps=int(default_steps))


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    r"""The `parallelism` option group: SP degrees, CFG parallel, the attention kernel, the collective timeout and
    weight sharding."""
    group = parser.add_argument_group(
        "parallelism", "launch with `torchrun --nproc-per-node N -m diffusers_qwen_sp ...` (or accelerate launch)"
    )
    group.add_argument("--ulysses-degree", type=positive_int, default=None,
                       help="all-to-all sequence parallel degree (must divide the 24 heads of Qwen-Image)")
    group.add_argument("--ring-degree", type=positive_int, default=None, help="ring attention degree")
    group.add_argument("--cfg-parallel", action="store_true",
                       help="run the two true-CFG branches on two halves of the processes")
    group.add_argument("--attention-backend", default="auto",
                       help="per-block kernel, named as in diffusers: auto, _native_flash (PyTorch's flash, CPU or "
                       "CUDA), _native_efficient (CUDA), flash (the flash-attn package), math")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="collective timeout in seconds: a dead rank stops the others after this long")
    group.add_argument("--shard-weights", nargs="?", const="world", default=None, choices=("world", "sp"),
                       help="keep only a shard of each transformer block per process (FSDP2), all-gathered block by "
                       "block: over every process (default) or over each SP group ('sp': for TeaCache with "
                       "--cfg-parallel)")


def sequence_parallel_config(args: argparse.Namespace) -> Any:
    r"""The parallel config the flags ask for, or `None` for a single process. Under a launcher the SP degrees default
    to Ulysses over all processes (over half of them with --cfg-parallel)."""
    from ..hooks import SequenceParallelConfig

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = 2 if args.cfg_parallel else 1
    ulysses, ring = args.ulysses_degree, args.ring_degree
    shard_weights = getattr(args, "shard_weights", None) or False
    if world_size == 1 and cfg * (ulysses or 1) * (ring or 1) == 1:
        if shard_weights:
            raise ValueError(
                "--shard-weights shards the transformer over several processes; this is one. Launch with "
                "`torchrun --nproc-per-node N -m diffusers_qwen_sp ...` or leave --shard-weights out."
            )
        return None
    if ulysses is None or ring is None:  # the degree not given takes the processes left
        given = cfg * (ulysses or ring or 1)
        if world_size % given:
            raise ValueError(
                f"{world_size} processes do not split into cfg {cfg} x the given degree {ulysses or ring or 1}; "
                "pass --ulysses-degree and --ring-degree whose product times the CFG degree is the process count."
            )
        if ulysses is None:
            ulysses = world_size // given
        else:
            ring = world_size // given
    return SequenceParallelConfig(
        ulysses_degree=ulysses or 1, ring_degree=ring or 1, cfg_degree=cfg,
        attention_backend=args.attention_backend, timeout=args.timeout, shard_weights=shard_weights,
    )

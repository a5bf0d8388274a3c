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
    group.add_argument("--text-encoder", default="one-rank", choices=("one-rank", "replicated", "sharded"),
                       help="where the text encoder lives: on the first process of the group only, which encodes "
                       "and broadcasts the prompt embeddings (default; the others never load it), on every process, "
                       "or with its decoder layers sharded over the processes (FSDP2)")
    group.add_argument("--parallel-vae", action=argparse.BooleanOptionalAction, default=True,
                       help="decode (and encode reference images) in slabs over the processes, exact to fp32 "
                       "rounding (default); --no-parallel-vae decodes the whole image on every process")


def sequence_parallel_config(args: argparse.Namespace) -> Any:
    r"""The parallel config the flags ask for, or `None` for a single process. Under a launcher the SP degrees default
    to Ulysses over all processes of a replica (over half of them with --cfg-parallel); the world must equal
    `dp x cfg x ring x ulysses` (`dp`: `args.dp_degree`, the data-parallel replicas of `serve`, default 1)."""
    from ..hooks import SequenceParallelConfig
    from ..text_encoder_placement import DEFAULT_TEXT_ENCODER_PLACEMENT

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = getattr(args, "dp_degree", None) or 1
    cfg = 2 if args.cfg_parallel else 1
    ulysses, ring = args.ulysses_degree, args.ring_degree
    shard_weights = getattr(args, "shard_weights", None) or False
    if world_size == 1 and dp * cfg * (ulysses or 1) * (ring or 1) == 1:
        if shard_weights:
            raise ValueError(
                "--shard-weights shards the transformer over several processes; this is one. Launch with "
                "`torchrun --nproc-per-node N -m diffusers_qwen_sp ...` or leave --shard-weights out."
            )
        return None
    if world_size % dp:
        raise ValueError(
            f"--dp-degree {dp} does not divide the {world_size} processes: the world must equal dp x cfg x ring x "
            f"ulysses. Launch `torchrun --nproc-per-node {dp * cfg * (ulysses or 1) * (ring or 1)} ...` or choose "
            "another --dp-degree."
        )
    replica_size = world_size // dp
    if ulysses is None or ring is None:  # the degree not given takes the processes left in each replica
        given = cfg * (ulysses or ring or 1)
        if replica_size % given:
            replicas = f" in each of the {dp} replicas" if dp > 1 else ""
            raise ValueError(
                f"{replica_size} processes{replicas} do not split into cfg {cfg} x the given degree "
                f"{ulysses or ring or 1}; pass --ulysses-degree and --ring-degree whose product times the CFG degree "
                "is the process count" + (" divided by --dp-degree." if dp > 1 else ".")
            )
        if ulysses is None:
            ulysses = replica_size // given
        else:
            ring = replica_size // given
    ulysses, ring = ulysses or 1, ring or 1
    if dp > 1 and dp * cfg * ulysses * ring != world_size:  # dp 1: ParallelGroups names the mismatch
        raise ValueError(
            f"dp {dp} x cfg {cfg} x ring {ring} x ulysses {ulysses} = {dp * cfg * ring * ulysses} processes, but "
            f"{world_size} were launched: the world must equal dp x cfg x ring x ulysses. Launch with "
            f"`torchrun --nproc-per-node {dp * cfg * ring * ulysses} ...` or change the degrees."
        )
    return SequenceParallelConfig(
        ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg, dp_degree=dp,
        attention_backend=args.attention_backend, timeout=args.timeout, shard_weights=shard_weights,
        text_encoder=(getattr(args, "text_encoder", None) or DEFAULT_TEXT_ENCODER_PLACEMENT).replace("-", "_"),
        parallel_vae=getattr(args, "parallel_vae", True),
    )

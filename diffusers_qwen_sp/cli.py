"""Command line: `python -m diffusers_qwen_sp generate ...` (also installed as `diffusers-qwen-sp`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging


logger = logging.get_logger("diffusers_qwen_sp")

# Stock diffusers pipeline class (model_index.json `_class_name`) -> our custom-pipeline name.
_PIPELINE_NAME_BY_STOCK_CLASS = {
    "QwenImagePipeline": "qwen_image",
    "QwenImageEditPipeline": "qwen_image_edit",
    "QwenImageEditPlusPipeline": "qwen_image_edit_plus",
    "QwenImageLayeredPipeline": "qwen_image_layered",
}


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-qwen-sp",
        description="Run the Qwen-Image family with diffusers_qwen_sp. Launch with torchrun or accelerate launch for "
        "several processes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="generate an image and write a PNG",
        description="Generate an image. With no --model, a tiny offline model is used so the command runs anywhere "
        "(it draws noise: use a real checkpoint for pictures).",
    )
    generate.add_argument("--model", default=None, help="Hub id or local folder of a Qwen-Image pipeline "
                          "(e.g. Qwen/Qwen-Image); default: the tiny offline model")
    generate.add_argument("--prompt", default="a red circle on a blue background")
    generate.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    generate.add_argument("--image", action="append", default=None,
                          help="input image for edit and layered pipelines (repeat for several)")
    generate.add_argument("--height", type=_positive_int, default=None, help="default: 1328 (tiny model: 64)")
    generate.add_argument("--width", type=_positive_int, default=None, help="default: 1328 (tiny model: 64)")
    generate.add_argument("--steps", type=_positive_int, default=None, help="default: 50 (tiny model: 4)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--true-cfg-scale", type=float, default=4.0,
                          help="true classifier-free guidance scale; <= 1 disables CFG")
    generate.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                          help="default: bfloat16 on CUDA, float32 on CPU")
    generate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    generate.add_argument("--output", default="output.png", help="PNG path (several images get _0, _1, ... suffixes)")
    _add_parallel_arguments(generate)
    return parser


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "parallelism", "launch with `torchrun --nproc-per-node N -m diffusers_qwen_sp ...` (or accelerate launch)"
    )
    group.add_argument("--ulysses-degree", type=_positive_int, default=None,
                       help="all-to-all sequence parallel degree (must divide the 24 heads of Qwen-Image)")
    group.add_argument("--ring-degree", type=_positive_int, default=None, help="ring attention degree")
    group.add_argument("--attention-backend", default="auto",
                       help="per-block kernel: auto, math, cpu_flash, flash, efficient, flash_attn")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="collective timeout in seconds: a dead rank stops the others after this long")


def _sequence_parallel_config(args: argparse.Namespace) -> Any:
    r"""The SP config the flags ask for, or `None` for a single process. Under a launcher, the degrees default to
    Ulysses over all processes."""
    from .hooks import SequenceParallelConfig

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ulysses, ring = args.ulysses_degree, args.ring_degree
    if world_size == 1 and (ulysses or 1) * (ring or 1) == 1:
        return None
    if ulysses is None and ring is None:
        ulysses = world_size
    return SequenceParallelConfig(
        ulysses_degree=ulysses or 1, ring_degree=ring or 1, attention_backend=args.attention_backend,
        timeout=args.timeout,
    )


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    default = "cpu"
    if torch.cuda.is_available():  # one GPU per local rank under torchrun / accelerate launch
        default = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(args.device or default)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_pipeline(model: str | None, dtype: torch.dtype) -> tuple[Any, bool]:
    r"""Load `model` into our pipeline class for its kind; `None` builds the tiny offline model. Returns `(pipe, tiny)`."""
    from diffusers import DiffusionPipeline

    from .pipelines import PIPELINES_BY_NAME

    if model is None:
        from .testing import build_tiny_pipeline

        return build_tiny_pipeline("qwen_image", pipeline_cls=PIPELINES_BY_NAME["qwen_image"]), True
    config = DiffusionPipeline.load_config(model)
    stock_class = config.get("_class_name")
    name = _PIPELINE_NAME_BY_STOCK_CLASS.get(stock_class)
    if name is None:
        raise ValueError(
            f"{model} holds a {stock_class} pipeline; diffusers_qwen_sp runs {sorted(_PIPELINE_NAME_BY_STOCK_CLASS)}. "
            "Pass a Qwen-Image, Qwen-Image-Edit(-Plus) or Qwen-Image-Layered checkpoint."
        )
    return PIPELINES_BY_NAME[name].from_pretrained(model, torch_dtype=dtype), False


def check_image_size(height: int, width: int, multiple: int) -> None:
    r"""Raise a `ValueError` naming the size and the nearest valid ones unless both are multiples of `multiple`."""
    for label, value in (("height", height), ("width", width)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{label}={value} is not a multiple of {multiple} (the VAE's scale factor times the patch size); "
                f"use {lower} or {lower + multiple}."
            )


def _save_images(images: Any, output: Path) -> list[Path]:
    flat: list[Any] = []
    stack = [images]
    while stack:  # layered pipelines return a list of layers per prompt
        item = stack.pop(0)
        if isinstance(item, (list, tuple)):
            stack[0:0] = list(item)
        else:
            flat.append(item)
    output.parent.mkdir(parents=True, exist_ok=True)
    if len(flat) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(len(flat))]
    for image, path in zip(flat, paths):
        image.save(path)
    return paths


def generate(args: argparse.Namespace) -> list[Path]:
    r"""Run the `generate` command; returns the paths written."""
    from PIL import Image

    device, dtype = _device_and_dtype(args)
    sp_config = _sequence_parallel_config(args)
    pipe, tiny = load_pipeline(args.model, dtype)
    if sp_config is not None:
        pipe.enable_sequence_parallel(sp_config)
    pipe.to(device)
    height = args.height or (64 if tiny else 1328)
    width = args.width or (64 if tiny else 1328)
    steps = args.steps or (4 if tiny else 50)
    check_image_size(height, width, pipe.vae_scale_factor * 2)

    call: dict[str, Any] = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        num_inference_steps=steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.image:
        images = [Image.open(path).convert("RGBA" if "Layered" in type(pipe).__name__ else "RGB") for path in args.image]
        call["image"] = images if len(images) > 1 else images[0]
    elif "Edit" in type(pipe).__name__ or "Layered" in type(pipe).__name__:
        raise ValueError(f"{type(pipe).__name__} edits an input image: pass one with --image PATH.")
    if "Layered" not in type(pipe).__name__:
        call.update(height=height, width=width)

    start = time.perf_counter()
    result = pipe(**call)
    elapsed = time.perf_counter() - start
    if not _is_main_process():  # every rank holds the same image: rank 0 writes it
        return []
    paths = _save_images(result.images, Path(args.output))
    for path in paths:
        print(f"wrote {path}")
    mode = "" if sp_config is None else f" (ulysses {sp_config.ulysses_degree} x ring {sp_config.ring_degree})"
    print(f"{steps} steps at {height}x{width} in {elapsed:.1f} s{mode}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

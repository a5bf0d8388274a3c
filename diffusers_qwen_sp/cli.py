"""Command line: `python -m diffusers_qwen_sp {generate,calibrate-teacache,bench,bench-teacache,train-scenes} ...`
(also `diffusers-qwen-sp`)."""

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

from .scenes.model import (
    SCENE_DEFAULT_PROMPT,
    SCENE_DEFAULT_STEPS,
    SCENE_IMAGE_SIZE,
    SCENE_TEACACHE_COEFFICIENTS,
)


logger = logging.get_logger("diffusers_qwen_sp")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _threshold(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a threshold >= 0 (e.g. 0.2), got {value}")
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
        description="Generate an image. With no --model, the small scene model that ships with the package draws "
        "64x64 scenes of simple shapes, offline (prompts like 'two red circles left of a blue square on a yellow "
        "background'); pass a real checkpoint for anything else.",
    )
    _add_model_arguments(generate, default_size="1328", default_steps="50")
    generate.add_argument("--prompt", default=SCENE_DEFAULT_PROMPT)
    generate.add_argument("--output", default="output.png", help="PNG path (several images get _0, _1, ... suffixes)")
    generate.add_argument("--teacache", type=_threshold, default=None, metavar="THRESHOLD",
                          help="enable TeaCache with this threshold (0.2 is a good start; higher skips more steps)")
    _add_parallel_arguments(generate)

    calibrate = commands.add_parser(
        "calibrate-teacache",
        help="fit TeaCache coefficients for a model",
        description="Run the model uncached over a set of prompts, record (input rel-L1, output rel-L1) per step and "
        "fit a polynomial; prints a TeaCacheConfig(coefficients=[...]) line.",
    )
    _add_model_arguments(calibrate, default_size="1024", default_steps="50")
    calibrate.add_argument("--prompts", nargs="+", default=None,
                           help="prompts to run, one call each (default: 6 generic ones; 12 scenes for the scene model)")
    calibrate.add_argument("--degree", type=_positive_int, default=4, help="degree of the polynomial (default: 4)")

    from .bench import add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="measure stock diffusers, our SP modes, diffusers' context parallelism and TeaCache on this machine",
        description="One run, interleaved, medians: every comparison is a ratio measured in the same run. Writes "
        "JSON, a Markdown table and a PNG plot.",
    )
    add_bench_arguments(bench)

    from .scenes.teacache_curve import add_curve_arguments

    curve = commands.add_parser(
        "bench-teacache",
        help="TeaCache's speed/quality curve on the trained scene model, with sequence parallelism on and off",
        description="For each threshold: speed-up over uncached, PSNR against the uncached image and prompt "
        "faithfulness judged by the scene grammar's checks. Writes JSON, a Markdown table and a PNG of the images.",
    )
    add_curve_arguments(curve)

    from .scenes.train import add_train_arguments

    train = commands.add_parser(
        "train-scenes",
        help="train the scene model from scratch on CPU (the recipe of the shipped weights)",
        description="Train the VAE on procedural scenes, then the transformer by flow matching, and save a "
        "QwenImagePipeline folder; reproducible from --seed. About 45 minutes on 2 CPU cores.",
    )
    add_train_arguments(train)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, default_size: str, default_steps: str) -> None:
    parser.add_argument("--model", default=None, help="Hub id or local folder of a Qwen-Image pipeline "
                        "(e.g. Qwen/Qwen-Image); default: the scene model shipped with the package")
    parser.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    parser.add_argument("--image", action="append", default=None,
                        help="input image for edit and layered pipelines (repeat for several)")
    parser.add_argument("--height", type=_positive_int, default=None, help=f"default: {default_size} (scene model: 64)")
    parser.add_argument("--width", type=_positive_int, default=None, help=f"default: {default_size} (scene model: 64)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"default: {default_steps} (scene model: {SCENE_DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--true-cfg-scale", type=float, default=4.0,
                        help="true classifier-free guidance scale; <= 1 disables CFG")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: this rank's GPU when CUDA is available, else cpu")
    parser.set_defaults(default_size=int(default_size), default_steps=int(default_steps))


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "parallelism", "launch with `torchrun --nproc-per-node N -m diffusers_qwen_sp ...` (or accelerate launch)"
    )
    group.add_argument("--ulysses-degree", type=_positive_int, default=None,
                       help="all-to-all sequence parallel degree (must divide the 24 heads of Qwen-Image)")
    group.add_argument("--ring-degree", type=_positive_int, default=None, help="ring attention degree")
    group.add_argument("--cfg-parallel", action="store_true",
                       help="run the two true-CFG branches on two halves of the processes")
    group.add_argument("--attention-backend", default="auto",
                       help="per-block kernel: auto, math, cpu_flash, flash, efficient, flash_attn")
    group.add_argument("--timeout", type=float, default=600.0,
                       help="collective timeout in seconds: a dead rank stops the others after this long")


def _sequence_parallel_config(args: argparse.Namespace) -> Any:
    r"""The parallel config the flags ask for, or `None` for a single process. Under a launcher the SP degrees default
    to Ulysses over all processes (over half of them with --cfg-parallel)."""
    from .hooks import SequenceParallelConfig

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = 2 if args.cfg_parallel else 1
    ulysses, ring = args.ulysses_degree, args.ring_degree
    if world_size == 1 and cfg * (ulysses or 1) * (ring or 1) == 1:
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
        attention_backend=args.attention_backend, timeout=args.timeout,
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
    r"""Load `model` into our pipeline class for its kind; `None` loads the shipped scene model. Returns
    `(pipe, scene)`, `scene` telling whether it is a scene model (the shipped one or one `train-scenes` wrote), which
    gets the scene model's sizes, steps and TeaCache coefficients."""
    from .scenes import is_scene_model

    from diffusers import DiffusionPipeline

    from .pipelines import PIPELINES_BY_NAME, PIPELINES_BY_STOCK_NAME

    if model is None:
        from .scenes import load_scene_pipeline

        return load_scene_pipeline(pipeline_cls=PIPELINES_BY_NAME["qwen_image"], dtype=dtype), True
    config = DiffusionPipeline.load_config(model)
    stock_class = config.get("_class_name")
    pipeline_cls = PIPELINES_BY_STOCK_NAME.get(stock_class)
    if pipeline_cls is None:
        raise ValueError(
            f"{model} holds a {stock_class} pipeline; diffusers_qwen_sp runs {sorted(PIPELINES_BY_STOCK_NAME)}. "
            "Pass a Qwen-Image, Qwen-Image-Edit(-Plus) or Qwen-Image-Layered checkpoint."
        )
    return pipeline_cls.from_pretrained(model, dtype=dtype), is_scene_model(model)


def check_image_size(height: int, width: int, multiple: int) -> None:
    r"""Raise a `ValueError` naming the size and the nearest valid ones unless both are multiples of `multiple`."""
    for label, value in (("height", height), ("width", width)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{label}={value} is not a multiple of {multiple} (the VAE's scale factor times the patch size); "
                f"use {lower} or {lower + multiple}."
            )


def _prepare(args: argparse.Namespace, sp_config: Any = None) -> tuple[Any, dict[str, Any], int, bool]:
    r"""Load the pipeline on this rank's device and build the call arguments shared by both commands. Returns
    `(pipe, call arguments, steps, scene)`, `scene` telling whether it is a scene model (see [`load_pipeline`])."""
    from PIL import Image

    device, dtype = _device_and_dtype(args)
    pipe, scene = load_pipeline(args.model, dtype)
    if sp_config is not None:
        from .distributed import init_distributed

        # A CPU run on a GPU host needs gloo: NCCL cannot move CPU tensors.
        init_distributed(timeout=sp_config.timeout, backend="gloo" if device.type == "cpu" else None)
        pipe.enable_sequence_parallel(sp_config)  # before .to(device): it selects this rank's GPU
    pipe.to(device)
    kind = type(pipe).__name__
    layered = "Layered" in kind
    steps = args.steps or (SCENE_DEFAULT_STEPS if scene else args.default_steps)
    call: dict[str, Any] = dict(
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        num_inference_steps=steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.image:
        images = [Image.open(path).convert("RGBA" if layered else "RGB") for path in args.image]
        call["image"] = images if len(images) > 1 else images[0]
    elif "Edit" in kind or layered:
        raise ValueError(f"{kind} edits an input image: pass one with --image PATH.")
    if not layered:  # Layered sizes its output from the input image
        height = args.height or (SCENE_IMAGE_SIZE if scene else args.default_size)
        width = args.width or (SCENE_IMAGE_SIZE if scene else args.default_size)
        check_image_size(height, width, pipe.vae_scale_factor * 2)
        call.update(height=height, width=width)
    return pipe, call, steps, scene


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
    r"""Run the `generate` command; returns the paths written (on rank 0; other ranks write nothing)."""
    sp_config = _sequence_parallel_config(args)
    pipe, call, steps, scene = _prepare(args, sp_config)
    if scene:
        from .scenes import parse_prompt

        try:
            parse_prompt(args.prompt)
        except ValueError as error:  # the model only knows its grammar: say so, then draw anyway
            logger.warning(f"The scene model will not draw this faithfully: {error}")
    if args.teacache is not None:
        # The scene model's own coefficients (fitted with calibrate-teacache); Qwen-Image's for everything else.
        coefficients = list(SCENE_TEACACHE_COEFFICIENTS) if scene else None
        pipe.enable_teacache(threshold=args.teacache, num_inference_steps=steps, coefficients=coefficients)

    start = time.perf_counter()
    result = pipe(prompt=args.prompt, **call)
    elapsed = time.perf_counter() - start
    stats = pipe.teacache_stats() if args.teacache is not None else None  # collective under CFG parallel
    if not _is_main_process():  # every rank holds the same image: rank 0 writes it
        return []
    paths = _save_images(result.images, Path(args.output))
    for path in paths:
        print(f"wrote {path}")
    size = f" at {call['height']}x{call['width']}" if "height" in call else ""
    mode = ""
    if sp_config is not None:
        mode = f" (cfg {sp_config.cfg_degree} x ring {sp_config.ring_degree} x ulysses {sp_config.ulysses_degree})"
    print(f"{steps} steps{size} in {elapsed:.1f} s{mode}")
    if stats is not None:
        for branch, entry in stats.items():
            print(f"TeaCache {branch}: computed {entry['computed']}, skipped {entry['skipped']}")
    return paths


def calibrate(args: argparse.Namespace) -> Any:
    r"""Run the `calibrate-teacache` command and print coefficients ready for `TeaCacheConfig`."""
    from .teacache_calibration import DEFAULT_CALIBRATION_PROMPTS, calibrate_teacache, format_coefficients

    pipe, call, steps, scene = _prepare(args)
    if args.prompts:
        prompts = list(args.prompts)
    elif scene:
        from .scenes import scene_prompts

        prompts = scene_prompts(12, seed=0)
    else:
        prompts = list(DEFAULT_CALIBRATION_PROMPTS)
    call["output_type"] = "latent"  # the VAE decode tells nothing about the transformer
    start = time.perf_counter()
    calibration = calibrate_teacache(pipe, prompts, degree=args.degree, **call)
    elapsed = time.perf_counter() - start
    inputs = [pair[0] for pair in calibration.pairs]
    print(f"{len(calibration.pairs)} (input rel-L1, output rel-L1) pairs from {len(prompts)} prompts x {steps} steps "
          f"in {elapsed:.1f} s; fit RMS residual {calibration.residual:.4g}")
    print(f"input rel-L1 range: {min(inputs):.4g} .. {max(inputs):.4g} (the fit is only meaningful inside it)")
    print(format_coefficients(calibration))
    return calibration


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "calibrate-teacache":
            calibrate(args)
        elif args.command == "train-scenes":
            from .scenes.train import run_train_command

            report = run_train_command(args, log=print)
            minutes = sum(report["timings_s"].values()) / 60
            print(f"wrote {args.output} in {minutes:.1f} min; draw with "
                  f"`python -m diffusers_qwen_sp generate --model {args.output} --prompt '...'`")
        elif args.command == "bench-teacache":
            from .scenes.teacache_curve import run_curve_command

            report = run_curve_command(args, progress=lambda line: print(line, flush=True))
            files = report["files"]
            print(f"\n{report['table']}")
            print(f"wrote {files['json']}, {files['md']}, {files['png']} ({report['wall_s']:.0f} s)")
        elif args.command == "bench":
            from .bench import markdown_table, run_bench

            report = run_bench(args, progress=lambda line: print(line, flush=True))
            print(f"\n{markdown_table(report)}")
            files = report["files"]
            print(f"wrote {files['json']}, {files['markdown']}, {files['plot']} ({report['wall_s']:.0f} s)")
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

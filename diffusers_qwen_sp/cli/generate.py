"""`diffusers-qwen-sp generate`: generate an image and write a PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from diffusers.utils import logging

from ..scenes.model import SCENE_DEFAULT_PROMPT, SCENE_TEACACHE_COEFFICIENTS
from ._common import add_model_arguments, add_parallel_arguments, sequence_parallel_config, threshold
from ._pipeline import is_main_process, prepare


logger = logging.get_logger("diffusers_qwen_sp")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image and write a PNG",
        description="Generate an image. With no --model, the small scene model that ships with the package draws "
        "64x64 scenes of simple shapes, offline (prompts like 'two red circles left of a blue square on a yellow "
        "background'); pass a real checkpoint for anything else.",
    )
    add_model_arguments(parser, default_size="1328", default_steps="50")
    parser.add_argument("--prompt", default=SCENE_DEFAULT_PROMPT)
    parser.add_argument("--output", default="output.png", help="PNG path (several images get _0, _1, ... suffixes)")
    parser.add_argument("--teacache", type=threshold, default=None, metavar="THRESHOLD",
                        help="enable TeaCache with this threshold (0.2 is a good start; higher skips more steps)")
    add_parallel_arguments(parser)
    parser.set_defaults(func=run)


def save_images(images: Any, output: Path) -> list[Path]:
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


def run(args: argparse.Namespace) -> list[Path]:
    r"""Run the `generate` command; returns the paths written (on rank 0; other ranks write nothing)."""
    sp_config = sequence_parallel_config(args)
    pipe, call, steps, scene, threads = prepare(args, sp_config)
    if scene:
        from ..scenes import parse_prompt

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
    if not is_main_process():  # every rank holds the same image: rank 0 writes it
        return []
    paths = save_images(result.images, Path(args.output))
    for path in paths:
        print(f"wrote {path}")
    size = f" at {call['height']}x{call['width']}" if "height" in call else ""
    mode = ""
    if sp_config is not None:
        mode = f" (cfg {sp_config.cfg_degree} x ring {sp_config.ring_degree} x ulysses {sp_config.ulysses_degree})"
    on = f", {threads}" if threads is not None else ""
    print(f"{steps} steps{size} in {elapsed:.1f} s{mode}{on}")
    if stats is not None:
        for branch, entry in stats.items():
            print(f"TeaCache {branch}: computed {entry['computed']}, skipped {entry['skipped']}")
    return paths

"""`diffusers-qwen-sp calibrate-teacache`: fit TeaCache coefficients for a model and print them."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._common import add_model_arguments, positive_int
from ._pipeline import prepare


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate-teacache",
        help="fit TeaCache coefficients for a model",
        description="Run the model uncached over a set of prompts, record (input rel-L1, output rel-L1) per step and "
        "fit a polynomial; prints a TeaCacheConfig(coefficients=[...]) line.",
    )
    add_model_arguments(parser, default_size="1024", default_steps="50")
    parser.add_argument("--prompts", nargs="+", default=None,
                        help="prompts to run, one call each (default: 6 generic ones; 12 scenes for the scene model)")
    parser.add_argument("--degree", type=positive_int, default=4, help="degree of the polynomial (default: 4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Any:
    r"""Run the `calibrate-teacache` command and print coefficients ready for `TeaCacheConfig`."""
    from ..teacache_calibration import DEFAULT_CALIBRATION_PROMPTS, calibrate_teacache, format_coefficients

    pipe, call, steps, scene, _ = prepare(args)
    if args.prompts:
        prompts = list(args.prompts)
    elif scene:
        from ..scenes import scene_prompts

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

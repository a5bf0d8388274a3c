"""Fit TeaCache's rescaling polynomial for a model: run it uncached, record how much block 0's modulated input and the
transformer output change from step to step, and fit `output change = poly(input change)`.

[`calibrate_teacache`] fits, [`format_coefficients`] writes the result as a `TeaCacheConfig(...)` line; the command
`python -m diffusers_qwen_sp calibrate-teacache` (`diffusers_qwen_sp/cli/calibrate.py`) runs both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging

from .hooks.teacache import TeaCacheConfig, _apply_teacache, get_teacache_hook, remove_teacache


logger = logging.get_logger(__name__)

DEFAULT_CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photo of a red fox in a snowy forest at sunrise",
    "a bowl of ramen on a wooden table, steam rising, soft window light",
    "a neon-lit city street at night in the rain, reflections on the pavement",
    "a watercolor painting of a lighthouse on a cliff above the sea",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a poster with the words 'OPEN DAILY' in bold letters above a coffee cup",
)


@dataclass
class TeaCacheCalibration:
    r"""
    Result of [`calibrate_teacache`].

    Args:
        coefficients (`list[float]`): the fitted polynomial, highest power first: pass it as
            `TeaCacheConfig(coefficients=...)`.
        pairs (`list[tuple[float, float]]`): every recorded `(input rel-L1, output rel-L1)` pair (one per step after
            the first, per CFG branch and prompt).
        residual (`float`): root-mean-square error of the fit over `pairs`.
        degree (`int`): degree of the polynomial.
        num_inference_steps (`int`): steps per prompt.
        num_prompts (`int`): prompts run.
    """

    coefficients: list[float]
    pairs: list[tuple[float, float]] = field(repr=False)
    residual: float
    degree: int
    num_inference_steps: int
    num_prompts: int

    def __repr__(self) -> str:
        return (
            f"TeaCacheCalibration(coefficients={self.coefficients}, residual={self.residual:.4g}, "
            f"pairs={len(self.pairs)}, degree={self.degree}, num_inference_steps={self.num_inference_steps}, "
            f"num_prompts={self.num_prompts})"
        )


def calibrate_teacache(
    pipe: Any,
    prompts: list[str],
    num_inference_steps: int = 50,
    degree: int = 4,
    **call_kwargs: Any,
) -> TeaCacheCalibration:
    r"""
    Fit TeaCache coefficients for the transformer of `pipe` by running it uncached over `prompts`.

    Every step after the first, per CFG branch, records the relative L1 change of block 0's modulated image input
    (TeaCache's indicator) and of the transformer output against the previous step of the same branch; then
    `numpy.polyfit(inputs, outputs, degree)`. Under sequence parallelism the indicator change is all-reduced like in
    TeaCache itself, so every rank fits the same coefficients.

    Args:
        pipe (`DiffusionPipeline`): one of our pipelines (its transformer must be the staged one), without TeaCache.
        prompts (`list[str]`): prompts to run, one pipeline call each. Varied prompts give a more general fit.
        num_inference_steps (`int`, defaults to `50`): steps per prompt; use the count you will generate with.
        degree (`int`, defaults to `4`): degree of the polynomial.
        **call_kwargs: passed to every pipeline call (e.g. `height`, `width`, `true_cfg_scale`, `negative_prompt`,
            `generator`, `image` for the edit pipelines).

    Returns:
        [`TeaCacheCalibration`]

    Example:

    ```py
    >>> from diffusers_qwen_sp.pipelines import QwenImageSPPipeline
    >>> from diffusers_qwen_sp.teacache_calibration import calibrate_teacache, format_coefficients
    >>> from diffusers_qwen_sp.testing import build_tiny_pipeline

    >>> pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    >>> calibration = calibrate_teacache(pipe, ["a red cat", "a blue dog"], num_inference_steps=8, height=64, width=64)
    >>> len(calibration.coefficients)
    5
    >>> print(format_coefficients(calibration))  # doctest: +SKIP
    TeaCacheConfig(coefficients=[...])
    ```
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"`degree` must be a positive integer, got {degree!r}.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise ValueError(
            f"`num_inference_steps` must be an integer >= 2 (the first step has no previous one), got "
            f"{num_inference_steps!r}."
        )
    for reserved in ("prompt", "num_inference_steps"):
        if reserved in call_kwargs:
            raise ValueError(f"Pass `{reserved}` through the `calibrate_teacache` arguments, not as a call keyword.")
    transformer = pipe.transformer
    if get_teacache_hook(transformer) is not None:
        raise RuntimeError(
            "TeaCache is applied to this pipeline's transformer; calibration needs the uncached model. Call "
            "remove_teacache(pipe.transformer) (or pipe.disable_teacache()) first."
        )

    # Threshold 0 computes every step (bit-identical to no cache); the hook only records.
    hook = _apply_teacache(transformer, TeaCacheConfig(threshold=0.0), record_outputs=True)
    pairs: list[tuple[float, float]] = []
    try:
        for index, prompt in enumerate(prompts):
            start = time.perf_counter()
            with torch.no_grad():
                pipe(prompt=prompt, num_inference_steps=num_inference_steps, **call_kwargs)
            recorded = 0
            for branch, stats in hook.stats().items():
                for step, input_rel in sorted(stats["rel_l1"].items()):
                    output_rel = stats["output_rel_l1"].get(step)
                    if output_rel is None or not (math.isfinite(input_rel) and math.isfinite(output_rel)):
                        continue
                    pairs.append((input_rel, output_rel))
                    recorded += 1
            logger.info(
                f"TeaCache calibration: prompt {index + 1}/{len(prompts)}, {recorded} pairs in "
                f"{time.perf_counter() - start:.1f} s"
            )
    finally:
        if get_teacache_hook(transformer) is hook:
            remove_teacache(transformer)

    if len(pairs) <= degree:
        raise ValueError(
            f"Calibration recorded {len(pairs)} (input, output) pairs, too few to fit a degree-{degree} polynomial "
            f"(needs more than {degree}). Use more prompts or more steps, or a lower degree."
        )
    x = np.array([pair[0] for pair in pairs], dtype=np.float64)
    y = np.array([pair[1] for pair in pairs], dtype=np.float64)
    coefficients = np.polyfit(x, y, degree)
    residual = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    return TeaCacheCalibration(
        coefficients=[float(c) for c in coefficients],
        pairs=pairs,
        residual=residual,
        degree=degree,
        num_inference_steps=num_inference_steps,
        num_prompts=len(prompts),
    )


def format_coefficients(calibration: TeaCacheCalibration | list[float], digits: int = 6) -> str:
    r"""
    A ready-to-paste `TeaCacheConfig(coefficients=[...])` line.

    Args:
        calibration ([`TeaCacheCalibration`] or `list[float]`): a calibration result or the coefficients themselves.
        digits (`int`, defaults to `6`): significant digits per coefficient.

    Example:

    ```py
    >>> from diffusers_qwen_sp.teacache_calibration import format_coefficients

    >>> format_coefficients([-4.5e2, 2.8e2, -4.5e1, 3.2, -2e-2])
    'TeaCacheConfig(coefficients=[-450.0, 280.0, -45.0, 3.2, -0.02])'
    ```
    """
    coefficients = calibration.coefficients if isinstance(calibration, TeaCacheCalibration) else calibration
    # float(f"{c:.{digits}g}") rounds, repr prints the shortest text that reads back to that float
    values = ", ".join(repr(float(f"{float(c):.{digits}g}")) for c in coefficients)
    return f"TeaCacheConfig(coefficients=[{values}])"


__all__ = [
    "DEFAULT_CALIBRATION_PROMPTS",
    "TeaCacheCalibration",
    "calibrate_teacache",
    "format_coefficients",
]

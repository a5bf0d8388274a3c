"""TeaCache's configuration, its indicator and its decision: the parts of TeaCache that hold no state.

[`teacache_decision`] is the only place TeaCache decides anything: from the relative L1 change of the indicator
(block 0's modulated image input, [`teacache_indicator`]), all-reduced over the ranks that hold the rest of the image
and of the batch, rescaled by a polynomial fitted per model and accumulated. The hook ([`~diffusers_qwen_sp.hooks.
teacache.TeaCacheHook`]) keeps the state between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn


if TYPE_CHECKING:
    from ..models import QwenImageBlockInputs


# Rescaling polynomial of Qwen-Image, highest power first (`numpy.poly1d` order). Fitted by the ComfyUI-TeaCache
# contributors on Qwen-Image (input rel-L1 of block 0's modulated input -> output rel-L1); not refitted here. The
# polynomial is negative below rel ~0.0069 and above ~0.426, which is why the absolute value is used.
QWEN_IMAGE_TEACACHE_COEFFICIENTS: tuple[float, ...] = (-4.5e2, 2.8e2, -4.5e1, 3.2, -2e-2)


@dataclass
class TeaCacheConfig:
    r"""
    Configuration of TeaCache.

    Args:
        threshold (`float`, defaults to `0.2`):
            Skip the transformer blocks while the accumulated rescaled change stays below this value. `0` computes
            every step (output identical to no cache); Qwen-Image users report about 1.5x at 0.1, 2x at 0.2 and
            larger speedups with visible changes at 0.4 and above.
        coefficients (`list[float]`, *optional*):
            Rescaling polynomial from the input rel-L1 distance to the output one, highest power first
            (`numpy.poly1d` order). Defaults to the Qwen-Image coefficients [`QWEN_IMAGE_TEACACHE_COEFFICIENTS`]. Fit
            your own with `python -m diffusers_qwen_sp calibrate-teacache` (see
            [`~diffusers_qwen_sp.teacache_calibration.calibrate_teacache`]).
        num_inference_steps (`int`, *optional*):
            Number of denoising steps, used only when the transformer is called outside our pipelines (no step count
            in the cache context) to force the last step to be computed. Our pipelines provide it themselves.
        warmup_steps (`int`, defaults to `0`):
            The first `warmup_steps` steps are always computed. The first step always is (it has nothing to reuse), so
            0 and 1 are the same. The early steps lay out the picture: few-step runs (8 steps) keep it better with 2-3
            warm-up steps.
    """

    threshold: float = 0.2
    coefficients: list[float] | None = None
    num_inference_steps: int | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"TeaCacheConfig.threshold must be a number, got {self.threshold!r}.")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(
                f"TeaCacheConfig.threshold must be a finite number >= 0, got {self.threshold!r}. Use 0 to compute "
                "every step, 0.1-0.4 to skip some."
            )
        self.threshold = float(self.threshold)
        if self.coefficients is None:
            self.coefficients = list(QWEN_IMAGE_TEACACHE_COEFFICIENTS)
        else:
            try:
                coefficients = [float(c) for c in self.coefficients]
            except (TypeError, ValueError):
                raise TypeError(
                    f"TeaCacheConfig.coefficients must be a list of numbers (highest power first), got "
                    f"{self.coefficients!r}."
                ) from None
            if not coefficients or not all(math.isfinite(c) for c in coefficients):
                raise ValueError(
                    f"TeaCacheConfig.coefficients must be a non-empty list of finite numbers (highest power first), "
                    f"got {self.coefficients!r}. Leave it None for the Qwen-Image default {list(QWEN_IMAGE_TEACACHE_COEFFICIENTS)}."
                )
            self.coefficients = coefficients
        if self.num_inference_steps is not None and (
            isinstance(self.num_inference_steps, bool)
            or not isinstance(self.num_inference_steps, int)
            or self.num_inference_steps < 1
        ):
            raise ValueError(
                f"TeaCacheConfig.num_inference_steps must be a positive integer or None, got "
                f"{self.num_inference_steps!r}."
            )
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(
                f"TeaCacheConfig.warmup_steps must be an integer >= 0 (steps always computed at the start), got "
                f"{self.warmup_steps!r}."
            )

    def __repr__(self) -> str:
        return (
            f"TeaCacheConfig(threshold={self.threshold}, coefficients={self.coefficients}, "
            f"num_inference_steps={self.num_inference_steps}, warmup_steps={self.warmup_steps})"
        )


# ---------------------------------------------------------------------------------------------------- indicator


def teacache_indicator(block: nn.Module, inputs: QwenImageBlockInputs) -> torch.Tensor:
    r"""
    The TeaCache indicator: the first block's modulated image input, computed with the block's own modules.

    `img_norm1(hidden_states) * (1 + scale) + shift`, with shift and scale from the attention half of
    `img_mod(temb)`. For `zero_cond_t` models `temb` has `2B` rows (`[t, 0]`) and each token takes its modulation by
    `inputs.modulate_index` (0: the generated target at t, 1: reference images at t = 0).

    Args:
        block (`QwenImageTransformerBlock`): the first transformer block (`transformer.transformer_blocks[0]`).
        inputs ([`QwenImageBlockInputs`]): the result of `transformer.preprocess(...)`.

    Returns:
        `torch.Tensor` of shape `(B, S_img, D)` (this rank's chunk under sequence parallelism).
    """
    # (B or 2B, D) -> (B or 2B, 6D) -> first half (B or 2B, 3D): shift, scale, gate of the attention input
    img_mod1 = block.img_mod(inputs.temb).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(block.img_norm1(inputs.hidden_states), img_mod1, inputs.modulate_index)
    return modulated


# ---------------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class TeaCacheDecision:
    r"""
    What [`teacache_decision`] decided for one step.

    Args:
        compute (`bool`): run the transformer blocks (else reuse the cached residuals).
        rel_l1 (`float`, *optional*): relative L1 distance of the indicator to the previous step's; `None` without a
            previous step.
        rescaled (`float`, *optional*): `|poly(rel_l1)|`, the estimated output change.
        accumulated (`float`): the accumulator after this step (0 after a computed step).
    """

    compute: bool
    rel_l1: float | None
    rescaled: float | None
    accumulated: float


def _polyval(coefficients: list[float], x: float) -> float:
    # Horner's scheme, highest power first like numpy.polyval.
    value = 0.0
    for coefficient in coefficients:
        value = value * x + coefficient
    return value


def teacache_decision(
    current: torch.Tensor,
    previous: torch.Tensor | None,
    accumulated: float,
    *,
    coefficients: list[float],
    threshold: float,
    force_compute: bool = False,
    valid_tokens: int | None = None,
    group: dist.ProcessGroup | None = None,
    batch_group: dist.ProcessGroup | None = None,
) -> TeaCacheDecision:
    r"""
    Decide whether to compute this step or to reuse the cache. The only place TeaCache decides anything.

    `rel = sum|current - previous| / sum|previous|` over the real tokens (both sums all-reduced over `group` when
    given, so every rank of a sequence-parallel group gets the same numbers), `rescaled = |poly(rel)|`, added to the
    accumulator; skip while the accumulator stays below `threshold`, else compute and reset it to 0.

    Args:
        current (`torch.Tensor` of shape `(B, S, D)`): this step's indicator (this rank's chunk under SP).
        previous (`torch.Tensor` of shape `(B, S, D)`, *optional*): the previous step's; `None` forces a computation.
        accumulated (`float`): the accumulator before this step.
        coefficients (`list[float]`): the rescaling polynomial, highest power first.
        threshold (`float`): skip while the accumulator stays below it.
        force_compute (`bool`, defaults to `False`): compute whatever the numbers say (first and last steps).
        valid_tokens (`int`, *optional*): only the first `valid_tokens` tokens of `S` are real; the rest is SP
            padding and is left out of the sums. Default: all.
        group (`ProcessGroup`, *optional*): the SP group to all-reduce the two sums over (never the CFG ranks).
        batch_group (`ProcessGroup`, *optional*): the ranks holding the other parts of the batch (the CFG group when
            a call without true CFG splits its batch over it), summed over after `group`.

    Returns:
        [`TeaCacheDecision`]
    """
    if previous is None:
        return TeaCacheDecision(compute=True, rel_l1=None, rescaled=None, accumulated=0.0)
    if valid_tokens is not None:
        # (B, S_local, D) -> (B, valid, D): SP padding would make this rank's sums differ from a single process'
        current = current[:, :valid_tokens]
        previous = previous[:, :valid_tokens]
    previous = previous.float()
    # (2,) fp32: [sum|cur - prev|, sum|prev|]; a sum of bf16 values over millions of tokens loses the small ones
    sums = torch.stack([(current.float() - previous).abs().sum(), previous.abs().sum()])
    if group is not None:
        # (2,) partial sums of every rank -> (2,) totals of the whole image sequence, identical on all ranks
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if batch_group is not None:
        # (2,) totals of this part of the batch -> (2,) totals of the whole batch, as one process computes them
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=batch_group)
    difference, norm = sums.tolist()
    if norm > 0:
        rel_l1 = difference / norm
    else:
        rel_l1 = 0.0 if difference == 0 else math.inf
    rescaled = abs(_polyval(coefficients, rel_l1)) if math.isfinite(rel_l1) else math.inf
    if force_compute or not math.isfinite(rescaled):
        return TeaCacheDecision(compute=True, rel_l1=rel_l1, rescaled=rescaled, accumulated=0.0)
    accumulated = accumulated + rescaled
    if accumulated < threshold:
        return TeaCacheDecision(compute=False, rel_l1=rel_l1, rescaled=rescaled, accumulated=accumulated)
    return TeaCacheDecision(compute=True, rel_l1=rel_l1, rescaled=rescaled, accumulated=0.0)


__all__ = [
    "QWEN_IMAGE_TEACACHE_COEFFICIENTS",
    "TeaCacheConfig",
    "TeaCacheDecision",
    "teacache_decision",
    "teacache_indicator",
]

"""The vocabulary of sequence-parallel plans: which output of which stage is split, and where the sequence is gathered.

A plan is a dict keyed by submodule path (a `*` matches every item of a ModuleList) whose values say what to do there.
It is data on the model class (`QwenImageSPTransformer2DModel._sp_plan`, as diffusers' `_cp_plan`) and is applied by
one function, [`~diffusers_qwen_sp.hooks.apply_sequence_parallel`].
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitOutput:
    r"""Split output `index` of a stage along `dim` (the image sequence), zero-padding it to a multiple of the SP world."""

    index: int
    dim: int


@dataclass(frozen=True)
class ShardBoundsOutput:
    r"""
    Replace output `index` of a stage with this rank's
    [`~diffusers_qwen_sp.distributed.ShardBounds`] of the sequence split at that stage: the layout then travels with
    the forward to the attention, TeaCache and the gather.
    """

    index: int


@dataclass(frozen=True)
class GatherInput:
    r"""
    All-gather input `index` of a stage along `dim` over the SP group and cut the padding off, using the
    [`~diffusers_qwen_sp.distributed.ShardBounds`] passed as input `bounds_index`, which becomes the whole sequence's.
    """

    index: int
    dim: int
    bounds_index: int


SPPlanEntry = tuple[SplitOutput | ShardBoundsOutput, ...] | GatherInput
SPPlan = dict[str, SPPlanEntry]

__all__ = ["GatherInput", "SPPlan", "SPPlanEntry", "ShardBoundsOutput", "SplitOutput"]

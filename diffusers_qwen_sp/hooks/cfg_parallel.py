"""CFG parallel: the two branches of true classifier-free guidance on two halves of the ranks.

The stock pipelines call the transformer twice per step, under `cache_context("cond")` then `("uncond")`. With
`cfg_degree=2` this hook, outermost on the transformer root, makes CFG rank 0 compute only the conditional call and
CFG rank 1 only the unconditional one; the second call of the step exchanges the two predictions with one all-gather
over the CFG group, so every rank returns both, bit-identical, and applies the same guidance and norm rescale.

Rank 1's first call returns an uninitialised buffer of the right shape that the exchange fills in place; the stock
pipelines only read (or slice, which keeps a view) the conditional prediction after the second call.

Without true CFG (`true_cfg_scale <= 1` or no negative prompt) there is only the conditional call: the CFG ranks split
the batch between them when it divides, and otherwise both compute it whole (the user is told once).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import logging

from ..distributed import ParallelGroups, all_gather_dim0


logger = logging.get_logger(__name__)

CFG_PARALLEL_HOOK = "diffusers_qwen_sp.cfg_parallel"

# Forward arguments that carry the batch along dim 0 (split between CFG ranks when CFG is off).
_BATCHED_ARGUMENTS = (
    "hidden_states",
    "encoder_hidden_states",
    "encoder_hidden_states_mask",
    "timestep",
    "guidance",
    "additional_t_cond",
)

class _NoState(BaseState):
    def reset(self) -> None:
        pass


@dataclass
class _PendingStep:
    """What the conditional call of a step leaves for the unconditional one."""

    output: torch.Tensor  # rank 0: its conditional prediction; rank 1: the buffer to fill with it


class CFGParallelHook(ModelHook):
    r"""Runs each true-CFG branch on its own half of the ranks and exchanges the predictions once per step."""

    _is_stateful = True

    def __init__(self, groups: ParallelGroups) -> None:
        super().__init__()
        if groups.cfg_degree != 2:
            raise ValueError(f"CFG parallel needs cfg_degree=2, got {groups.cfg_degree}.")
        self.groups = groups
        # Only for the cache context (which branch a call is); the per-step exchange state is below.
        self.state_manager = StateManager(_NoState)
        self.true_cfg: bool | None = None  # whether the running call does true CFG: set by our pipelines per call
        self._pending: _PendingStep | None = None
        self._warned_duplicate = False
        self._splitting_batch = False
        self._signature: inspect.Signature | None = None

    @property
    def batch_split_group(self) -> Any:
        r"""
        The CFG group while a call without true CFG runs with its batch split over the CFG ranks, else `None`: then
        each CFG rank holds part of one batch, and a statistic of the whole batch (TeaCache's) is summed over it.
        """
        return self.groups.cfg_group if self._splitting_batch else None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def _bind(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return arguments

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        arguments = self._bind(module, args, kwargs)
        return_dict = arguments.pop("return_dict")
        branch = self.state_manager.context.name
        if self.true_cfg is None and branch in ("cond", "uncond"):
            raise RuntimeError(
                "CFG parallel does not know whether this call does true CFG: call the transformer through a "
                "diffusers_qwen_sp pipeline, or set `hook.true_cfg` (the hook returned by apply_cfg_parallel) before "
                "each call of your own loop."
            )
        if self.true_cfg is False or branch not in ("cond", "uncond"):
            output = self._batch_split_forward(module, arguments)
        elif branch == "cond":
            output = self._cond_forward(module, arguments)
        else:
            output = self._uncond_forward(module, arguments)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _run(self, module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        return self.fn_ref.original_forward(**arguments, return_dict=False)[0]

    def _cond_forward(self, module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        if self._pending is not None:
            raise RuntimeError(
                "CFG parallel got two conditional calls without the unconditional call between them. With true CFG "
                "the transformer must be called under cache_context('cond') then ('uncond') every step."
            )
        if self.groups.cfg_rank == 0:
            output = self._run(module, arguments)
        else:
            hidden_states = arguments["hidden_states"]
            # (B, S_img, C_in) -> (B, S_img, p*p*C_out): filled by the exchange of the unconditional call
            output = hidden_states.new_empty(
                (*hidden_states.shape[:2], module.proj_out.out_features), dtype=module.proj_out.weight.dtype
            )
        self._pending = _PendingStep(output)
        return output

    def _uncond_forward(self, module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError(
                "CFG parallel got an unconditional call without the conditional call before it. The pipelines call "
                "the transformer under cache_context('cond') then ('uncond') each step; keep that order."
            )
        pending, self._pending = self._pending, None
        if self.groups.cfg_rank == 1:
            mine = self._run(module, arguments)
        else:
            mine = pending.output
        # (B, S, C) per CFG rank -> (2B, S, C) -> (2, B, S, C): [conditional, unconditional] on every rank
        gathered = all_gather_dim0(mine, self.groups.cfg_group, 2).unflatten(0, (2, mine.shape[0]))
        if self.groups.cfg_rank == 1:
            if pending.output.dtype != gathered.dtype or pending.output.shape != gathered.shape[1:]:
                raise RuntimeError(
                    f"CFG parallel: the conditional prediction is {gathered.dtype} {tuple(gathered.shape[1:])} but "
                    f"the buffer rank 1 returned for it is {pending.output.dtype} {tuple(pending.output.shape)} (is "
                    "proj_out quantized or cast?). Run without CFG parallel for this model."
                )
            pending.output.copy_(gathered[0])  # the conditional prediction the pipeline already holds
        return gathered[1]

    def _batch_split_forward(self, module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        batch = arguments["hidden_states"].shape[0]
        degree = self.groups.cfg_degree
        if batch % degree:
            if not self._warned_duplicate:
                logger.warning(
                    f"CFG parallel without true CFG: the batch of {batch} does not split over {degree} CFG ranks, so "
                    "both halves of the ranks compute the same images. Enable true CFG (true_cfg_scale > 1 and a "
                    "negative prompt), use an even batch, or drop cfg_degree to use all ranks for the sequence."
                )
                self._warned_duplicate = True
            return self._run(module, arguments)
        share = batch // degree
        rank = self.groups.cfg_rank
        local = dict(arguments)
        for name in _BATCHED_ARGUMENTS:
            value = local.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                local[name] = value[rank * share : (rank + 1) * share]  # (B, ...) -> (B/2, ...)
        if local.get("img_shapes") is not None and len(local["img_shapes"]) == batch:
            local["img_shapes"] = local["img_shapes"][rank * share : (rank + 1) * share]
        if local.get("controlnet_block_samples") is not None:
            local["controlnet_block_samples"] = [
                sample[rank * share : (rank + 1) * share] for sample in local["controlnet_block_samples"]
            ]
        self._splitting_batch = True
        try:
            mine = self._run(module, local)
        finally:
            self._splitting_batch = False
        # (B/2, S, C) per CFG rank -> (B, S, C), the halves in CFG-rank order
        return all_gather_dim0(mine, self.groups.cfg_group, degree)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        self._pending = None
        self.true_cfg = None  # set again by the next pipeline call (or by hand for a hand-written loop)
        return module

    def __repr__(self) -> str:
        return f"CFGParallelHook(cfg_rank={self.groups.cfg_rank}, cfg_ranks={self.groups.cfg_ranks})"


def apply_cfg_parallel(transformer: nn.Module, groups: ParallelGroups) -> CFGParallelHook:
    r"""
    Run the two true-CFG branches on the two CFG halves of `groups` (see the module docstring).

    The hook is the outermost one on the transformer root: caches applied later are re-nested inside it, so each
    branch's cache state lives on the ranks that compute that branch.

    Args:
        transformer ([`QwenImageSPTransformer2DModel`]): the staged transformer.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`]): with `cfg_degree=2`.
    """
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(CFG_PARALLEL_HOOK) is not None:
        raise RuntimeError("CFG parallel is already applied to this transformer; call remove_cfg_parallel first.")
    hook = CFGParallelHook(groups)
    registry.register_hook(hook, CFG_PARALLEL_HOOK)
    return hook


def remove_cfg_parallel(transformer: nn.Module) -> None:
    r"""Undo [`apply_cfg_parallel`]."""
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(CFG_PARALLEL_HOOK, recurse=False)


def get_cfg_parallel_hook(transformer: nn.Module) -> CFGParallelHook | None:
    r"""The CFG-parallel hook on `transformer`, or `None`."""
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(CFG_PARALLEL_HOOK) if registry is not None else None

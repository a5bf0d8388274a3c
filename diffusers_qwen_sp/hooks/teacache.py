"""TeaCache for the staged Qwen-Image transformer: skip all transformer blocks on steps whose input barely changed.

[TeaCache](https://huggingface.co/papers/2411.19108) watches how much the modulated input of the first block changes
from one denoising step to the next (relative L1 distance), maps that through a polynomial fitted per model to an
estimate of how much the transformer output changes, and accumulates the estimates. While the accumulated change stays
below a threshold, the blocks are skipped and the residual they added at the last computed step is reused.

One stateful diffusers `ModelHook` ([`TeaCacheHook`]) sits on the transformer's parameter-free `blocks_stage`. It
receives the block inputs exactly as `preprocess` produced them, already sharded by the sequence-parallel hooks on the
preparation stages, and either runs the blocks or adds the cached residuals: it never embeds, splits or gathers
anything itself, and holds no copy of the forward. CFG parallel on the transformer root wraps it by construction. Its
state lives in a diffusers `StateManager` keyed by cache context (`"cond"`, `"uncond"`), so the two CFG branches never
share an indicator or a residual.

Under sequence parallelism each rank holds a chunk of the image sequence. The decision is made from the L1 sums of
the real (non-padding) tokens of every rank, all-reduced over the SP group, so all ranks of one image take the same
decision, the one a single process would take: a rank that skipped while another computed would leave the other
waiting in a collective forever.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils import logging

from .cfg_parallel import get_cfg_parallel_hook
from .sequence_parallel import get_sequence_parallel_runtime
from .teacache_decision import (
    QWEN_IMAGE_TEACACHE_COEFFICIENTS,
    TeaCacheConfig,
    TeaCacheDecision,
    teacache_decision,
    teacache_indicator,
)


if TYPE_CHECKING:
    from ..models import QwenImageBlockInputs


logger = logging.get_logger(__name__)

TEACACHE_HOOK = "diffusers_qwen_sp.teacache"
# Calibration only: records the transformer output's change per step on `image_output`.
TEACACHE_OUTPUT_HOOK = "diffusers_qwen_sp.teacache_output"

# The stages a transformer must have for TeaCache (see `QwenImageSPTransformer2DModel`).
_BLOCKS_STAGE = "blocks_stage"
_OUTPUT_STAGE = "image_output"


# ---------------------------------------------------------------------------------------------------- the hook


class TeaCacheState(BaseState):
    r"""
    TeaCache state of one CFG branch (one cache context) on one rank.

    Attributes:
        previous_indicator (`torch.Tensor`, *optional*): the indicator of the previous step.
        accumulated (`float`): accumulated rescaled change since the last computed step.
        image_residual, text_residual (`torch.Tensor`, *optional*): what the blocks added to each stream at the last
            computed step (this rank's chunk of the image stream under SP).
        calls (`int`): transformer calls in this context since the last reset.
        step (`int`): the step index of the latest call.
        input_key (`tuple`, *optional*): shapes, dtype and device of the inputs the state was built from.
        computed, skipped (`list[int]`): step indices computed and skipped.
        rel_l1 (`dict[int, float]`): step index -> the indicator's relative L1 change (from the second step on).
        previous_output (`torch.Tensor`, *optional*), output_rel_l1 (`dict[int, float]`): the output of the previous
            step and its relative L1 change, kept only when recording outputs (calibration).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.previous_indicator: torch.Tensor | None = None
        self.accumulated = 0.0
        self.image_residual: torch.Tensor | None = None
        self.text_residual: torch.Tensor | None = None
        self.calls = 0
        self.step = 0
        self.input_key: tuple | None = None
        self.computed: list[int] = []
        self.skipped: list[int] = []
        self.rel_l1: dict[int, float] = {}
        self.previous_output: torch.Tensor | None = None
        self.output_rel_l1: dict[int, float] = {}

    def stats(self, record_outputs: bool) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "computed": list(self.computed),
            "skipped": list(self.skipped),
            "rel_l1": dict(self.rel_l1),
        }
        if record_outputs:
            stats["output_rel_l1"] = dict(self.output_rel_l1)
        return stats


def _input_key(inputs: QwenImageBlockInputs) -> tuple:
    # The whole (unsharded) sequence length: two image sizes can give the same chunk length under SP.
    hidden_states = inputs.hidden_states
    return (
        hidden_states.shape[0],
        inputs.image_shard.seq_len,
        hidden_states.shape[2],
        tuple(inputs.encoder_hidden_states.shape),
        hidden_states.dtype,
        hidden_states.device,
    )


def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    previous = previous.float()
    norm = previous.abs().sum().item()
    difference = (current.float() - previous).abs().sum().item()
    return difference / norm if norm > 0 else (0.0 if difference == 0 else math.inf)


class TeaCacheHook(ModelHook):
    r"""
    The TeaCache `ModelHook` on the transformer's `blocks_stage`. Register it with [`apply_teacache`].

    Args:
        config ([`TeaCacheConfig`]): threshold and coefficients.
        transformer (`nn.Module`): the transformer whose blocks stage it hooks (weakly referenced), for its
            sequence-parallel group.
        record_outputs (`bool`, defaults to `False`):
            Also keep the relative L1 change of the transformer output per step, recorded by a
            [`TeaCacheOutputRecorder`] on `image_output` (for calibration; keeps the previous output in memory).
    """

    _is_stateful = True

    def __init__(self, config: TeaCacheConfig, transformer: nn.Module, record_outputs: bool = False) -> None:
        super().__init__()
        self.config = config
        self.record_outputs = record_outputs
        self.state_manager = StateManager(TeaCacheState)
        self._transformer = weakref.ref(transformer)
        # The states the StateManager handed out since the last reset, by context name: a view for `stats()`.
        self._live_states: dict[str, TeaCacheState] = {}
        self._last_stats: dict[str, dict[str, Any]] = {}

    def reset_state(self, module: nn.Module) -> nn.Module:
        # diffusers resets stateful hooks at the end of every pipeline call: keep that call's stats readable.
        if self._live_states:
            self._last_stats = self.stats()
        self._live_states = {}
        self.state_manager.reset()
        return module

    def stats(self) -> dict[str, dict[str, Any]]:
        r"""Per cache context: step indices computed and skipped in the current call, or else the most recent one."""
        if not self._live_states:
            return copy.deepcopy(self._last_stats)
        return {name: state.stats(self.record_outputs) for name, state in self._live_states.items()}

    def _branch_state(self, key: tuple) -> tuple[TeaCacheState, int, int | None]:
        try:
            context = self.state_manager.context
        except ValueError:
            raise RuntimeError(
                "TeaCache needs a cache context to keep the CFG branches apart. Call the transformer inside "
                "`with transformer.cache_context('cond'):` (the pipelines do this), or remove_teacache(transformer)."
            ) from None
        state = self.state_manager.get_state()
        self._live_states[context.name] = state

        num_steps = context.num_inference_steps
        if num_steps is None:
            num_steps = self.config.num_inference_steps
        step = context.step_index if context.step_index is not None else state.calls

        reason = None
        if state.input_key is not None and state.input_key != key:
            reason = "the input shapes changed"
        elif state.calls > 0 and context.step_index == 0:
            reason = "a new denoising loop started (step_index 0)"
        elif context.step_index is None and num_steps is not None and step >= num_steps:
            reason = f"all {num_steps} steps of the previous loop ran"
        if reason is not None:
            logger.debug(f"TeaCache: resetting the '{context.name}' branch: {reason}.")
            state.reset()
            step = context.step_index if context.step_index is not None else 0
        state.input_key = key
        state.calls += 1
        state.step = step
        return state, step, num_steps

    def new_forward(
        self, module: nn.Module, inputs: QwenImageBlockInputs, controlnet_block_samples: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state, step, num_steps = self._branch_state(_input_key(inputs))

        # Under SP `inputs.hidden_states` is this rank's chunk of the zero-padded image sequence; under CFG parallel
        # without true CFG, this rank's part of the batch. The decision is the one of the whole sequence and batch.
        transformer = self._transformer()
        valid_tokens, group = None, None
        if inputs.image_shard.is_sharded:
            runtime = get_sequence_parallel_runtime(transformer)
            valid_tokens, group = inputs.image_shard.valid_len, runtime.groups.sp_group
        cfg_hook = get_cfg_parallel_hook(transformer)
        batch_group = cfg_hook.batch_split_group if cfg_hook is not None else None

        first = module.blocks[0]
        if _offloaded_as_a_block(first):
            raise RuntimeError(
                "TeaCache reads the first block's modulation weights before deciding whether to run the blocks, but "
                "block-level group offloading loads them only inside that block's forward. Use "
                "enable_group_offload(..., offload_type='leaf_level') with TeaCache (the same memory profile), or "
                "disable TeaCache."
            )
        with torch.no_grad():
            indicator = teacache_indicator(first, inputs)
            force = step < max(1, self.config.warmup_steps) or (num_steps is not None and step == num_steps - 1)
            decision = teacache_decision(
                indicator,
                state.previous_indicator,
                state.accumulated,
                coefficients=self.config.coefficients,
                threshold=self.config.threshold,
                force_compute=force,
                valid_tokens=valid_tokens,
                group=group,
                batch_group=batch_group,
            )
        state.previous_indicator = indicator
        state.accumulated = decision.accumulated
        if decision.rel_l1 is not None:
            state.rel_l1[step] = decision.rel_l1

        if decision.compute:
            encoder_out, hidden_out = self.fn_ref.original_forward(inputs, controlnet_block_samples)
            if self.config.threshold > 0:  # with threshold 0 nothing is ever skipped: keep no residuals
                state.image_residual = (hidden_out - inputs.hidden_states).detach()
                state.text_residual = (encoder_out - inputs.encoder_hidden_states).detach()
            state.computed.append(step)
        else:
            hidden_out = inputs.hidden_states + state.image_residual
            # The text stream is not read after the blocks; it is kept consistent with a computed step anyway.
            encoder_out = inputs.encoder_hidden_states + state.text_residual
            state.skipped.append(step)
        logger.debug(
            f"TeaCache step {step}: rel_l1={decision.rel_l1}, accumulated={decision.accumulated:.4f} -> "
            f"{'compute' if decision.compute else 'skip'}"
        )
        return encoder_out, hidden_out

    def __repr__(self) -> str:
        return (
            f"TeaCacheHook(threshold={self.config.threshold}, coefficients={self.config.coefficients}, "
            f"num_inference_steps={self.config.num_inference_steps}, record_outputs={self.record_outputs})"
        )


def _offloaded_as_a_block(block: nn.Module) -> bool:
    # diffusers' block-level group offloading hooks the first module of each group ("group_offloading" on the block
    # itself); leaf-level offloading hooks the leaves, which load their weights whenever they are called.
    registry = getattr(block, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


class TeaCacheOutputRecorder(ModelHook):
    r"""
    Records, into the [`TeaCacheHook`]'s state of the running branch, how much the transformer output changed since
    the branch's previous step. Sits on `image_output` (after the sequence-parallel gather) while calibrating.
    """

    def __init__(self, teacache: TeaCacheHook) -> None:
        super().__init__()
        self.teacache = teacache

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        state = self.teacache.state_manager.get_state()
        if state.previous_output is not None:
            state.output_rel_l1[state.step] = _relative_l1(output, state.previous_output)
        state.previous_output = output.detach()
        return output


# ---------------------------------------------------------------------------------------------------- apply / remove


def _stage(transformer: nn.Module, name: str) -> nn.Module:
    stage = getattr(transformer, name, None)
    if not isinstance(stage, nn.Module):
        raise TypeError(
            f"TeaCache hooks the staged transformer's `{name}`, which {type(transformer).__name__} does not have. Use "
            "diffusers_qwen_sp.QwenImageSPTransformer2DModel (QwenImageSPTransformer2DModel.from_transformer("
            "transformer) converts a stock one) or one of our pipelines."
        )
    return stage


def get_teacache_hook(transformer: nn.Module) -> TeaCacheHook | None:
    r"""The [`TeaCacheHook`] applied to `transformer`, or `None`."""
    registry = getattr(getattr(transformer, _BLOCKS_STAGE, None), "_diffusers_hook", None)
    return registry.get_hook(TEACACHE_HOOK) if registry is not None else None


def _apply_teacache(transformer: nn.Module, config: TeaCacheConfig, record_outputs: bool = False) -> TeaCacheHook:
    blocks_stage = _stage(transformer, _BLOCKS_STAGE)
    output_stage = _stage(transformer, _OUTPUT_STAGE)
    if get_teacache_hook(transformer) is not None:
        raise RuntimeError("TeaCache is already applied to this transformer; call remove_teacache(transformer) first.")
    if getattr(transformer, "_cache_config", None) is not None:
        raise ValueError(
            f"Caching has already been enabled with {type(transformer._cache_config).__name__}; TeaCache does not "
            "stack with another cache. Call transformer.disable_cache() first."
        )
    hook = TeaCacheHook(config, transformer, record_outputs=record_outputs)
    HookRegistry.check_if_exists_or_initialize(blocks_stage).register_hook(hook, TEACACHE_HOOK)
    if record_outputs:
        HookRegistry.check_if_exists_or_initialize(output_stage).register_hook(
            TeaCacheOutputRecorder(hook), TEACACHE_OUTPUT_HOOK
        )
    # The cache context reaches stateful hooks through the root's (cached) list of child registries.
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config  # what diffusers' enable_cache / disable_cache / is_cache_enabled read
    return hook


def apply_teacache(transformer: nn.Module, config: TeaCacheConfig | None = None) -> TeaCacheHook:
    r"""
    Apply TeaCache to a staged Qwen-Image transformer (also `transformer.enable_cache(TeaCacheConfig(...))`).

    Registers one stateful [`TeaCacheHook`] on the transformer's `blocks_stage`. Inside our pipelines (and any
    pipeline that wraps its transformer calls in `transformer.cache_context(...)`), each CFG branch keeps its own
    state, the first and last steps are always computed, and the state is reset at the end of every call. Composes
    with sequence and CFG parallelism in any order of application: the SP hooks sit on the preparation stages before
    it, CFG parallel on the root around it. Refuses to stack with another cache (`transformer.enable_cache`).

    Args:
        transformer ([`QwenImageSPTransformer2DModel`]): the staged transformer (e.g. `pipe.transformer`).
        config ([`TeaCacheConfig`], *optional*): defaults to `TeaCacheConfig()` (threshold 0.2, Qwen-Image
            coefficients).

    Returns:
        [`TeaCacheHook`]: the registered hook.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_qwen_sp.hooks.teacache import TeaCacheConfig, apply_teacache, remove_teacache, teacache_stats
    >>> from diffusers_qwen_sp.pipelines import QwenImageSPPipeline
    >>> from diffusers_qwen_sp.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs

    >>> pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)  # or .from_pretrained("Qwen/Qwen-Image")
    >>> hook = apply_teacache(pipe.transformer, TeaCacheConfig(threshold=0.2))
    >>> image = pipe(**tiny_pipeline_call_kwargs("qwen_image", num_inference_steps=8)).images
    >>> sorted(teacache_stats(pipe.transformer))
    ['cond', 'uncond']
    >>> remove_teacache(pipe.transformer)
    ```
    """
    config = config if config is not None else TeaCacheConfig()
    if not isinstance(config, TeaCacheConfig):
        raise TypeError(f"`config` must be a TeaCacheConfig, got {type(config).__name__}.")
    hook = _apply_teacache(transformer, config)
    logger.info(f"TeaCache on: {config}")
    return hook


def remove_teacache(transformer: nn.Module) -> None:
    r"""Undo [`apply_teacache`] (also `transformer.disable_cache()`); a no-op when TeaCache is not applied."""
    if get_teacache_hook(transformer) is None:
        return
    for stage_name, hook_name in ((_OUTPUT_STAGE, TEACACHE_OUTPUT_HOOK), (_BLOCKS_STAGE, TEACACHE_HOOK)):
        registry = HookRegistry.check_if_exists_or_initialize(getattr(transformer, stage_name))
        if registry.get_hook(hook_name) is not None:
            registry.remove_hook(hook_name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = None


def teacache_stats(transformer: nn.Module) -> dict[str, dict[str, Any]]:
    r"""
    What TeaCache did in the most recent (or the running) call, per cache context.

    Returns:
        `dict[str, dict]`: e.g. `{"cond": {"computed": [0, 1, 3, 5], "skipped": [2, 4], "rel_l1": {1: 0.21, ...}},
        "uncond": {...}}`. `rel_l1` maps each step from the second on to the indicator's relative L1 change. Empty
        before the first call.

    Raises:
        `ValueError`: TeaCache is not applied to `transformer`.
    """
    hook = get_teacache_hook(transformer)
    if hook is None:
        raise ValueError("TeaCache is not applied to this transformer: call apply_teacache(transformer, config) first.")
    return hook.stats()


__all__ = [
    "QWEN_IMAGE_TEACACHE_COEFFICIENTS",
    "TEACACHE_HOOK",
    "TEACACHE_OUTPUT_HOOK",
    "TeaCacheConfig",
    "TeaCacheDecision",
    "TeaCacheHook",
    "TeaCacheOutputRecorder",
    "TeaCacheState",
    "apply_teacache",
    "get_teacache_hook",
    "remove_teacache",
    "teacache_decision",
    "teacache_indicator",
    "teacache_stats",
]

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils import logging

from .cfg_parallel import get_cfg_parallel_hook
from .sequence_parallel import get_sequence_parallel_runtime


if TYPE_CHECKING:
    from ..models import QwenImageBlockInputs


logger = logging.get_logger(__name__)

TEACACHE_HOOK = "diffusers_qwen_sp.teacache"
# Calibration only: records the transformer output's change per step on `image_output`.
TEACACHE_OUTPUT_HOOK = "diffusers_qwen_sp.teacache_output"

# Rescaling polynomial of Qwen-Image, highest power first (`numpy.poly1d` order). Fitted by the ComfyUI-TeaCache
# contributors on Qwen-Image (input rel-L1 of block 0's modulated input -> output rel-L1); not refitted here. The
# polynomial is negative below rel ~0.0069 and above ~0.426, which is why the absolute value is used.
QWEN_IMAGE_TEACACHE_COEFFICIENTS: tuple[float, ...] = (-4.5e2, 2.8e2, -4.5e1, 3.2, -2e-2)

# The stages a transformer must have for TeaCache (see `QwenImageSPTransformer2DModel`).
_BLOCKS_STAGE = "blocks_stage"
_OUTPUT_STAGE = "image_output"


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

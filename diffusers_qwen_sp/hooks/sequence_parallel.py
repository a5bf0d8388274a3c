"""Sequence parallelism as diffusers `ModelHook`s: split the image sequence at the preparation stages, gather it at
`proj_out`, and run every block's joint attention across ranks (Ulysses, Ring or both).

The plan is data (`QWEN_IMAGE_SP_PLAN`), applied by one function (`apply_sequence_parallel`). The image sequence is
zero-padded to a multiple of the SP world size and split into equal chunks; the attention masks the padding and the
gather cuts it off, so any image token count works. Text tokens stay whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging

from ..attention import ATTENTION_BACKENDS, SequenceParallelAttnProcessor
from ..distributed import ParallelGroups, all_gather_dim0, init_distributed


logger = logging.get_logger(__name__)

SP_SPLIT_HOOK = "diffusers_qwen_sp.sp_split"
SP_GATHER_HOOK = "diffusers_qwen_sp.sp_gather"


@dataclass
class SequenceParallelConfig:
    r"""
    Configuration of sequence parallelism.

    The SP world is `ulysses_degree * ring_degree` processes; with CFG parallel (`cfg_degree=2`) the world is twice
    that. Ulysses ranks are contiguous: with `ulysses_degree=2, ring_degree=2`, ranks (0, 1) and (2, 3) all-to-all and
    (0, 2), (1, 3) pass K/V around their rings.

    Args:
        ulysses_degree (`int`, defaults to `1`):
            All-to-all degree: splits the heads across ranks inside each attention. Must divide the number of heads
            (24 for Qwen-Image: 1, 2, 3, 4, 6, 8, 12, 24).
        ring_degree (`int`, defaults to `1`):
            Ring degree: K/V blocks of the image sequence are passed around the ring and merged by log-sum-exp.
        cfg_degree (`int`, defaults to `1`):
            1, or 2 to run the conditional and unconditional branches of true CFG on separate halves of the ranks.
        attention_backend (`str`, defaults to `"auto"`):
            The per-block kernel: one of `"auto"`, `"math"`, `"cpu_flash"`, `"flash"`, `"efficient"`, `"flash_attn"`.
        timeout (`float`, defaults to `600.0`):
            Collective timeout in seconds used when this package initialises torch.distributed: a dead rank ends the
            others with an error after this long instead of a hang.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    attention_backend: str = "auto"
    timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree", "cfg_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SequenceParallelConfig.{name} must be a positive integer, got {value!r}.")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"SequenceParallelConfig.cfg_degree must be 1 or 2 (two CFG branches), got {self.cfg_degree}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"SequenceParallelConfig.attention_backend={self.attention_backend!r} is unknown; choose one of "
                f"{list(ATTENTION_BACKENDS)}."
            )
        if not self.timeout > 0:
            raise ValueError(f"SequenceParallelConfig.timeout must be positive (seconds), got {self.timeout!r}.")

    @property
    def sp_degree(self) -> int:
        """Processes that share one image sequence: `ulysses_degree * ring_degree`."""
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        """Processes needed: `cfg_degree * ring_degree * ulysses_degree`."""
        return self.cfg_degree * self.sp_degree


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SplitOutput:
    r"""Split output `index` of a stage along `dim` (the image sequence), zero-padding it to a multiple of the SP world."""

    index: int
    dim: int


@dataclass(frozen=True)
class GatherOutput:
    r"""All-gather a module's output along `dim` over the SP group and cut the padding off."""

    dim: int


# Which tensor is split or gathered where. Keys are submodule paths of the transformer (`*` matches every item of a
# ModuleList); a key that matches no submodule is an error.
QWEN_IMAGE_SP_PLAN: dict[str, tuple[SplitOutput, ...] | GatherOutput] = {
    # (timestep, modulate_index (B, S_img)): the per-token modulation index goes with its image token.
    "modulate_index_prepare": (SplitOutput(index=1, dim=1),),
    # (hidden_states (B, S_img, D), image_freqs (S_img, R), text_freqs (S_txt, R)): text stays whole.
    "image_rope_prepare": (SplitOutput(index=0, dim=1), SplitOutput(index=1, dim=0)),
    # (B, S_img/P, p*p*C) -> (B, S_img, p*p*C)
    "proj_out": GatherOutput(dim=1),
}


@dataclass
class SequenceParallelRuntime:
    r"""What the hooks and attention processors of one transformer share while SP is on."""

    config: SequenceParallelConfig
    groups: ParallelGroups
    # Real image tokens of the current forward, recorded by the split; the attention masks the padding after it.
    image_seq_len: int | None = None
    original_processors: dict[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.groups.sp_world_size

    @property
    def rank(self) -> int:
        return self.groups.sp_rank


def _split_along(tensor: torch.Tensor, dim: int, runtime: SequenceParallelRuntime) -> torch.Tensor:
    world, rank = runtime.world_size, runtime.rank
    length = tensor.shape[dim]
    runtime.image_seq_len = length
    if world == 1:  # CFG parallel alone: nothing to shard
        return tensor
    local = -(-length // world)  # ceil(S / P)
    padding = local * world - length
    if padding:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = padding
        # (.., S, ..) -> (.., P * ceil(S/P), ..): zero tokens at the end, masked in attention, cut by the gather
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    # (.., P * S_local, ..) -> (.., S_local, ..): chunk `rank`
    return tensor.narrow(dim, rank * local, local).contiguous()


class SequenceSplitHook(ModelHook):
    r"""Splits chosen outputs of a preparation stage along the image sequence and keeps this rank's chunk."""

    def __init__(self, runtime: SequenceParallelRuntime, splits: tuple[SplitOutput, ...]) -> None:
        super().__init__()
        self.runtime = runtime
        self.splits = splits

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        output = list(output)
        for split in self.splits:
            if output[split.index] is not None:
                output[split.index] = _split_along(output[split.index], split.dim, self.runtime)
        return tuple(output)

    def __repr__(self) -> str:
        return f"SequenceSplitHook(splits={self.splits}, sp_world_size={self.runtime.world_size})"


class SequenceGatherHook(ModelHook):
    r"""All-gathers a module's output along the image sequence over the SP group and removes the padding."""

    def __init__(self, runtime: SequenceParallelRuntime, gather: GatherOutput) -> None:
        super().__init__()
        self.runtime = runtime
        self.gather = gather

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        if runtime.image_seq_len is None:
            raise RuntimeError(
                "The SP gather ran without a split in the same forward: the image sequence was not sharded. Call the "
                "transformer (or its preprocess) normally; do not embed the image outside `image_rope_prepare`."
            )
        dim = self.gather.dim
        world = runtime.world_size
        if world == 1:
            runtime.image_seq_len = None
            return output
        local = output.movedim(dim, 0)  # (.., S/P, ..) -> (S/P, ..)
        # (S/P, ..) on each rank -> (P * S/P, ..): chunks in SP-rank order, the order they were split in
        gathered = all_gather_dim0(local, runtime.groups.sp_group, world)
        gathered = gathered[: runtime.image_seq_len]  # drop the padding
        runtime.image_seq_len = None
        return gathered.movedim(0, dim)

    def __repr__(self) -> str:
        return f"SequenceGatherHook(dim={self.gather.dim}, sp_world_size={self.runtime.world_size})"


# ---------------------------------------------------------------------------------------------------- apply / remove


def _resolve(root: nn.Module, path: str) -> list[nn.Module]:
    modules = [root]
    for part in path.split("."):
        next_modules = []
        for module in modules:
            if part == "*":
                next_modules.extend(module.children())
            elif hasattr(module, part) and isinstance(getattr(module, part), nn.Module):
                next_modules.append(getattr(module, part))
        modules = next_modules
    if not modules:
        raise ValueError(
            f"The SP plan names `{path}`, which is no submodule of {type(root).__name__}. Sequence parallelism needs "
            "the staged transformer: use diffusers_qwen_sp.QwenImageSPTransformer2DModel (or one of our pipelines)."
        )
    return modules


def get_sequence_parallel_runtime(transformer: nn.Module) -> SequenceParallelRuntime | None:
    r"""The runtime of the sequence parallelism applied to `transformer`, or `None` when it is off."""
    registry = getattr(transformer.proj_out, "_diffusers_hook", None) if hasattr(transformer, "proj_out") else None
    hook = registry.get_hook(SP_GATHER_HOOK) if registry is not None else None
    return hook.runtime if hook is not None else None


def apply_sequence_parallel(
    transformer: nn.Module, config: SequenceParallelConfig | None = None, groups: ParallelGroups | None = None
) -> SequenceParallelRuntime:
    r"""
    Shard the transformer's image sequence across processes.

    Registers the split hooks on `modulate_index_prepare` and `image_rope_prepare`, the gather hook on `proj_out`, and
    a sequence-parallel attention processor on every block. Initialises torch.distributed from the launcher's
    environment (torchrun, accelerate launch) when needed.

    Args:
        transformer ([`QwenImageSPTransformer2DModel`]): the staged transformer.
        config ([`SequenceParallelConfig`], *optional*): degrees and attention backend; default: Ulysses over all ranks.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`], *optional*): prebuilt process groups (e.g. shared
            with CFG parallel); built from `config` when omitted.

    Returns:
        `SequenceParallelRuntime`: the state the hooks share (process groups, config).

    Example:

    ```py
    >>> # torchrun --nproc-per-node 4 script.py
    >>> from diffusers_qwen_sp import QwenImageSPTransformer2DModel, SequenceParallelConfig
    >>> from diffusers_qwen_sp.hooks import apply_sequence_parallel, remove_sequence_parallel

    >>> transformer = QwenImageSPTransformer2DModel.from_pretrained("Qwen/Qwen-Image", subfolder="transformer")
    >>> apply_sequence_parallel(transformer, SequenceParallelConfig(ulysses_degree=2, ring_degree=2))
    >>> # ... every rank calls transformer(...) with the same inputs and gets the full output
    >>> remove_sequence_parallel(transformer)
    ```
    """
    if get_sequence_parallel_runtime(transformer) is not None:
        raise RuntimeError("Sequence parallelism is already applied to this transformer; call remove_sequence_parallel first.")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError(
            "diffusers' own context parallelism (`enable_parallelism`) is active on this transformer; it cannot be "
            "combined with diffusers_qwen_sp's sequence parallelism. Load the transformer again without "
            "`enable_parallelism` and use only apply_sequence_parallel / pipe.enable_sequence_parallel."
        )
    if groups is None:
        if config is None:
            init_distributed()
            config = SequenceParallelConfig(ulysses_degree=dist.get_world_size())
        else:
            init_distributed(timeout=config.timeout)
        groups = ParallelGroups.create(config.ulysses_degree, config.ring_degree, config.cfg_degree)
    elif config is None:
        config = SequenceParallelConfig(
            ulysses_degree=groups.ulysses_degree, ring_degree=groups.ring_degree, cfg_degree=groups.cfg_degree
        )
    heads = transformer.config.num_attention_heads
    if heads % config.ulysses_degree:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"ulysses_degree={config.ulysses_degree} does not divide the {heads} attention heads. Use one of {valid} "
            "and make up the rest of the processes with ring_degree."
        )

    runtime = SequenceParallelRuntime(config=config, groups=groups)
    for path, entry in QWEN_IMAGE_SP_PLAN.items():
        for module in _resolve(transformer, path):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if isinstance(entry, GatherOutput):
                registry.register_hook(SequenceGatherHook(runtime, entry), SP_GATHER_HOOK)
            else:
                registry.register_hook(SequenceSplitHook(runtime, entry), SP_SPLIT_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    runtime.original_processors = dict(transformer.attn_processors)
    transformer.set_attn_processor(SequenceParallelAttnProcessor(runtime))
    logger.info(f"Sequence parallelism on: {groups}")
    return runtime


def remove_sequence_parallel(transformer: nn.Module) -> None:
    r"""Undo [`apply_sequence_parallel`]: remove the hooks and restore the previous attention processors."""
    runtime = get_sequence_parallel_runtime(transformer)
    if runtime is None:
        return
    for path, entry in QWEN_IMAGE_SP_PLAN.items():
        name = SP_GATHER_HOOK if isinstance(entry, GatherOutput) else SP_SPLIT_HOOK
        for module in _resolve(transformer, path):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer.set_attn_processor(runtime.original_processors)


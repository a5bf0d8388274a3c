"""Sequence parallelism as diffusers `ModelHook`s: split the image sequence at the preparation stages, gather it at
`image_output`, and run every block's joint attention across ranks (Ulysses, Ring or both).

The plan is data (the model class's `_sp_plan`, see `diffusers_qwen_sp.models.sp_plan`), applied by one function
(`apply_sequence_parallel`). The image sequence is zero-padded to a multiple of the SP world size and split into equal
chunks; the layout ([`~diffusers_qwen_sp.distributed.ShardBounds`]) travels with the forward from the split to the
attention (which masks the padding), TeaCache and the gather (which cuts it off), so any image token count works.
Text tokens stay whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging

from ..attention import SequenceParallelAttnProcessor, check_attention_backend
from ..distributed import ParallelGroups, all_gather_dim0, init_distributed, sp_shard_bounds, take_shard
from ..models.sp_plan import GatherInput, ShardBoundsOutput, SplitOutput, SPPlan, SPPlanEntry
from ..text_encoder_placement import DEFAULT_TEXT_ENCODER_PLACEMENT, TEXT_ENCODER_PLACEMENTS
from .registration import register_hooks


logger = logging.get_logger(__name__)

SP_SPLIT_HOOK = "diffusers_qwen_sp.sp_split"
SP_GATHER_HOOK = "diffusers_qwen_sp.sp_gather"


@dataclass
class SequenceParallelConfig:
    r"""
    Configuration of sequence parallelism.

    The SP world is `ulysses_degree * ring_degree` processes; with CFG parallel (`cfg_degree=2`) a replica is twice
    that, and with `dp_degree` replicas the world is `dp_degree` replicas. Ulysses ranks are contiguous: with
    `ulysses_degree=2, ring_degree=2`, ranks (0, 1) and (2, 3) all-to-all and (0, 2), (1, 3) pass K/V around their
    rings.

    Args:
        ulysses_degree (`int`, defaults to `1`):
            All-to-all degree: splits the heads across ranks inside each attention. Must divide the number of heads
            (24 for Qwen-Image: 1, 2, 3, 4, 6, 8, 12, 24).
        ring_degree (`int`, defaults to `1`):
            Ring degree: K/V blocks of the image sequence are passed around the ring and merged by log-sum-exp.
        cfg_degree (`int`, defaults to `1`):
            1, or 2 to run the conditional and unconditional branches of true CFG on separate halves of the ranks.
        dp_degree (`int`, defaults to `1`):
            Number of independent data-parallel replicas, each `cfg_degree * ring_degree * ulysses_degree` contiguous
            ranks with its own SP and CFG groups. Every rank of a replica runs the same request; different replicas
            run different requests (the server hands each batch to a free replica). A replica of one process runs
            the transformer unsharded.
        attention_backend (`str`, defaults to `"auto"`):
            The per-block kernel, named as in diffusers: `"auto"`, `"_native_flash"` (PyTorch's flash kernel, CPU or
            CUDA), `"_native_efficient"` (PyTorch's memory-efficient CUDA kernel), `"flash"` (the flash-attn package),
            or `"math"` (explicit float32 softmax, any device).
        timeout (`float`, defaults to `600.0`):
            Collective timeout in seconds used when this package initialises torch.distributed: a dead rank ends the
            others with an error after this long instead of a hang.
        shard_weights (`bool` or `str`, defaults to `False`):
            Also shard the transformer blocks' weights with FSDP2 (`diffusers_qwen_sp.weight_sharding`), applied by
            `pipe.enable_sequence_parallel`: `True` or `"world"` over every process of the replica (with
            `dp_degree > 1`, "world" means the replica's ranks: a group spanning replicas would all-gather across
            replicas that run different requests, and hang), `"sp"` over each SP group (for TeaCache under CFG
            parallel). Cannot be undone. At the transformer level `apply_sequence_parallel` does
            not read it: call `apply_weight_sharding(transformer, WeightShardingConfig(group=...), runtime.groups)`.
        text_encoder (`str`, defaults to `"one_rank"`):
            Where the pipeline's text encoder lives (`diffusers_qwen_sp.text_encoder_placement`), applied by
            `pipe.enable_sequence_parallel`: `"one_rank"` (the replica's first rank encodes and broadcasts the
            embeddings; the others drop the encoder, or never load it), `"replicated"` (every rank keeps it) or
            `"sharded"` (its decoder layers over the replica's ranks, FSDP2). The default saves the encoder's whole
            size on every other rank at the cost of one broadcast, which every placement pays anyway.
        parallel_vae (`bool`, defaults to `True`):
            Split the pipeline's VAE decode (and the encode of reference images) into slabs over the replica's ranks
            (`diffusers_qwen_sp.hooks.vae_patch_parallel`), applied by `pipe.enable_sequence_parallel`; exact to fp32
            rounding, faster, and with a peak decode memory per rank that falls with the degree.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    attention_backend: str = "auto"
    timeout: float = 600.0
    shard_weights: bool | str = False
    dp_degree: int = 1
    text_encoder: str = DEFAULT_TEXT_ENCODER_PLACEMENT
    parallel_vae: bool = True

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree", "cfg_degree", "dp_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SequenceParallelConfig.{name} must be a positive integer, got {value!r}.")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"SequenceParallelConfig.cfg_degree must be 1 or 2 (two CFG branches), got {self.cfg_degree}.")
        check_attention_backend(self.attention_backend, owner="SequenceParallelConfig.attention_backend")
        if not self.timeout > 0:
            raise ValueError(f"SequenceParallelConfig.timeout must be positive (seconds), got {self.timeout!r}.")
        if not (isinstance(self.shard_weights, bool) or self.shard_weights in ("world", "sp")):
            raise ValueError(
                "SequenceParallelConfig.shard_weights must be False, True, 'world' (shard over every process) or 'sp' "
                f"(over each SP group), got {self.shard_weights!r}."
            )
        if self.text_encoder not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(
                f"SequenceParallelConfig.text_encoder must be one of {TEXT_ENCODER_PLACEMENTS}, got "
                f"{self.text_encoder!r}."
            )
        if not isinstance(self.parallel_vae, bool):
            raise TypeError(f"SequenceParallelConfig.parallel_vae must be True or False, got {self.parallel_vae!r}.")

    @property
    def weight_sharding_group(self) -> str | None:
        """The group `shard_weights` asks to shard the weights over (`"world"` or `"sp"`), or `None`."""
        if self.shard_weights is False:
            return None
        return "world" if self.shard_weights is True else self.shard_weights

    @property
    def sp_degree(self) -> int:
        """Processes that share one image sequence: `ulysses_degree * ring_degree`."""
        return self.ulysses_degree * self.ring_degree

    @property
    def replica_size(self) -> int:
        """Processes in one replica: `cfg_degree * ring_degree * ulysses_degree`."""
        return self.cfg_degree * self.sp_degree

    @property
    def world_size(self) -> int:
        """Processes needed: `dp_degree * cfg_degree * ring_degree * ulysses_degree`."""
        return self.dp_degree * self.replica_size


# ---------------------------------------------------------------------------------------------------- the hooks


@dataclass
class SequenceParallelRuntime:
    r"""What the hooks and attention processors of one transformer share while SP is on (fixed while it is on)."""

    config: SequenceParallelConfig
    groups: ParallelGroups
    plan: SPPlan
    original_processors: dict[str, Any] = field(default_factory=dict)
    # name -> attention module whose processor must stay the sequence-parallel one while SP is on
    attention_modules: dict[str, nn.Module] = field(default_factory=dict)

    def check_attention_processors(self) -> None:
        r"""
        Raise a `RuntimeError` when an attention processor was replaced after SP was applied (`set_attn_processor`,
        `set_attention_backend`...): such a block would attend only over its own rank's shard, silently.
        """
        for name, module in self.attention_modules.items():
            if not isinstance(module.processor, SequenceParallelAttnProcessor):
                raise RuntimeError(
                    f"The attention processor of `{name}` is now {type(module.processor).__name__}, set after sequence "
                    "parallelism was applied; with it the block would attend only over this rank's shard of the image. "
                    "Remove sequence parallelism first (pipe.disable_sequence_parallel() or remove_sequence_parallel), "
                    "change the processors, then enable it again."
                )

    @property
    def sp_world_size(self) -> int:
        """Ranks sharing one image sequence (`ulysses_degree * ring_degree`)."""
        return self.groups.sp_world_size

    @property
    def sp_rank(self) -> int:
        """This rank's index in the SP group: the chunk of the sequence it holds."""
        return self.groups.sp_rank


class SequenceSplitHook(ModelHook):
    r"""Splits chosen outputs of a preparation stage along the image sequence and keeps this rank's chunk."""

    def __init__(self, runtime: SequenceParallelRuntime, entries: tuple[SplitOutput | ShardBoundsOutput, ...]) -> None:
        super().__init__()
        self.runtime = runtime
        self.splits = tuple(entry for entry in entries if isinstance(entry, SplitOutput))
        self.bounds_outputs = tuple(entry for entry in entries if isinstance(entry, ShardBoundsOutput))

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        output = list(output)
        bounds = None
        for split in self.splits:
            tensor = output[split.index]
            if tensor is None:
                continue
            if bounds is None:
                bounds = sp_shard_bounds(tensor.shape[split.dim], self.runtime.sp_world_size, self.runtime.sp_rank)
            # (.., S, ..) -> (.., ceil(S/P), ..): this rank's chunk of the zero-padded sequence
            output[split.index] = take_shard(tensor, split.dim, bounds)
        for entry in self.bounds_outputs:
            if bounds is None:
                raise RuntimeError(
                    f"{type(module).__name__} yielded no tensor to split, so it has no layout to report: the SP plan's "
                    "ShardBoundsOutput must sit on a stage that also has a SplitOutput."
                )
            output[entry.index] = bounds
        if self.bounds_outputs and bounds.is_sharded:  # once per forward, outside the blocks
            self.runtime.check_attention_processors()
        return tuple(output)

    def __repr__(self) -> str:
        return (
            f"SequenceSplitHook(splits={self.splits}, bounds_outputs={self.bounds_outputs}, "
            f"sp_world_size={self.runtime.sp_world_size})"
        )


class SequenceGatherHook(ModelHook):
    r"""All-gathers a stage's input along the image sequence over the SP group and removes the padding."""

    def __init__(self, runtime: SequenceParallelRuntime, gather: GatherInput) -> None:
        super().__init__()
        self.runtime = runtime
        self.gather = gather

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        args = list(args)
        local, bounds = args[self.gather.index], args[self.gather.bounds_index]
        if bounds.is_sharded:
            dim = self.gather.dim
            # (.., S/P, ..) on each rank -> (P * S/P, ..): chunks in SP-rank order, the order they were split in
            gathered = all_gather_dim0(local.movedim(dim, 0), self.runtime.groups.sp_group, self.runtime.sp_world_size)
            args[self.gather.index] = gathered[: bounds.seq_len].movedim(0, dim)  # drop the padding
            args[self.gather.bounds_index] = sp_shard_bounds(bounds.seq_len, world_size=1, rank=0)
        return tuple(args), kwargs

    def __repr__(self) -> str:
        return f"SequenceGatherHook(gather={self.gather}, sp_world_size={self.runtime.sp_world_size})"


# ---------------------------------------------------------------------------------------------------- apply / remove


def _resolve(root: nn.Module, path: str) -> list[nn.Module]:
    """The submodules a plan key names (`*` matches every item of a ModuleList); raises when it names none."""
    modules = [root]
    for part in path.split("."):
        next_modules = []
        for module in modules:
            if part == "*" and isinstance(module, nn.ModuleList):
                next_modules.extend(module)
            elif part != "*" and isinstance(getattr(module, part, None), nn.Module):
                next_modules.append(getattr(module, part))
            else:  # every module a path reaches must have the next part: no partial matches
                next_modules = []
                break
        modules = next_modules
    if not modules:
        raise ValueError(
            f"The SP plan names `{path}`, which is no submodule of {type(root).__name__}. Sequence parallelism needs "
            "the staged transformer (diffusers_qwen_sp.QwenImageSPTransformer2DModel or one of our pipelines) and a "
            "plan whose keys are its submodules."
        )
    return modules


def _hook_name(entry: SPPlanEntry) -> str:
    return SP_GATHER_HOOK if isinstance(entry, GatherInput) else SP_SPLIT_HOOK


def get_sequence_parallel_runtime(transformer: nn.Module) -> SequenceParallelRuntime | None:
    r"""The runtime of the sequence parallelism applied to `transformer`, or `None` when it is off."""
    return getattr(transformer, "_sp_runtime", None)


def apply_sequence_parallel(
    transformer: nn.Module,
    config: SequenceParallelConfig | None = None,
    groups: ParallelGroups | None = None,
    plan: SPPlan | None = None,
) -> SequenceParallelRuntime:
    r"""
    Shard the transformer's image sequence across processes.

    Walks the plan (default: the model class's `_sp_plan`): split hooks on the stages whose outputs are split
    (`modulate_index_prepare`, `image_rope_prepare`), the gather hook on the stage whose input is gathered
    (`image_output`); then sets a sequence-parallel attention processor on every block. Initialises torch.distributed
    from the launcher's environment (torchrun, accelerate launch) when needed.

    Args:
        transformer ([`QwenImageSPTransformer2DModel`]): the staged transformer.
        config ([`SequenceParallelConfig`], *optional*): degrees and attention backend; default: Ulysses over all ranks.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`], *optional*): prebuilt process groups (e.g. shared
            with CFG parallel); built from `config` when omitted.
        plan (`dict`, *optional*): another plan (see `diffusers_qwen_sp.models.sp_plan`); default
            `type(transformer)._sp_plan`.

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
    from .teacache import TeaCacheConfig  # teacache builds on this module

    cache = getattr(transformer, "_cache_config", None)
    if cache is not None and not isinstance(cache, TeaCacheConfig):
        raise RuntimeError(
            f"A {type(cache).__name__} cache is enabled on this transformer; diffusers' caches decide or cache per rank "
            "on each rank's shard of the image, so ranks can diverge and hang under sequence parallelism. Call "
            "transformer.disable_cache() first, and use TeaCacheConfig for a cache that agrees across ranks."
        )
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
        groups = ParallelGroups.create(config.ulysses_degree, config.ring_degree, config.cfg_degree, config.dp_degree)
    elif config is None:
        config = SequenceParallelConfig(
            ulysses_degree=groups.ulysses_degree,
            ring_degree=groups.ring_degree,
            cfg_degree=groups.cfg_degree,
            dp_degree=groups.dp_degree,
        )
    else:
        given = (config.ulysses_degree, config.ring_degree, config.cfg_degree, config.dp_degree)
        built = (groups.ulysses_degree, groups.ring_degree, groups.cfg_degree, groups.dp_degree)
        if given != built:
            axes = "(ulysses, ring, cfg, dp)"
            if given[3] == built[3] == 1:  # no replicas: the three SP degrees
                axes, given, built = "(ulysses, ring, cfg)", given[:3], built[:3]
            raise ValueError(
                f"config asks for {axes} = {given} but the groups given were built for {built}; pass groups built "
                "with ParallelGroups.create(*the config's degrees), or only one of the two."
            )
    heads = transformer.config.num_attention_heads
    if heads % config.ulysses_degree:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"ulysses_degree={config.ulysses_degree} does not divide the {heads} attention heads. Use one of {valid} "
            "and make up the rest of the processes with ring_degree."
        )

    if plan is None:
        plan = getattr(type(transformer), "_sp_plan", None)
        if plan is None:
            raise ValueError(
                f"{type(transformer).__name__} has no `_sp_plan`; pass `plan=` or use "
                "diffusers_qwen_sp.QwenImageSPTransformer2DModel (QwenImageSPTransformer2DModel.from_transformer "
                "converts a stock one)."
            )
    # Every key resolved and every target checked before anything is hooked, and the hooks registered all or none.
    targets = [(module, path, entry) for path, entry in plan.items() for module in _resolve(transformer, path)]
    seen: dict[int, str] = {}
    for module, path, entry in targets:
        name = _hook_name(entry)
        if (id(module), name) in seen:
            raise ValueError(
                f"The SP plan reaches one {type(module).__name__} through `{seen[id(module), name]}` and `{path}`; "
                "give each submodule one entry."
            )
        seen[id(module), name] = path

    runtime = SequenceParallelRuntime(config=config, groups=groups, plan=dict(plan))
    hooks = [
        (module, (SequenceGatherHook if isinstance(entry, GatherInput) else SequenceSplitHook)(runtime, entry),
         _hook_name(entry))
        for module, _, entry in targets
    ]
    register_hooks(transformer, hooks)

    runtime.original_processors = dict(transformer.attn_processors)
    transformer.set_attn_processor(SequenceParallelAttnProcessor(runtime))
    runtime.attention_modules = {
        name: module for name, module in transformer.named_modules() if hasattr(module, "set_processor")
    }
    transformer._sp_runtime = runtime
    logger.info(f"Sequence parallelism on: {groups}")
    return runtime


def remove_sequence_parallel(transformer: nn.Module) -> None:
    r"""Undo [`apply_sequence_parallel`]: remove the hooks and restore the previous attention processors."""
    runtime = get_sequence_parallel_runtime(transformer)
    if runtime is None:
        return
    for path, entry in runtime.plan.items():
        for module in _resolve(transformer, path):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(_hook_name(entry), recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer.set_attn_processor(runtime.original_processors)
    transformer._sp_runtime = None


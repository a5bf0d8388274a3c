"""Sharded transformer weights with PyTorch's FSDP2 (`fully_shard`), under sequence and CFG parallelism.

Sequence parallelism splits activations, not weights: without this every rank holds the whole transformer (41 GB in
bf16 for Qwen-Image). [`apply_weight_sharding`] shards every transformer block's parameters over a group of ranks
(default: the whole world; with data-parallel replicas, each replica's ranks) with FSDP2, on a 1D `DeviceMesh` built
over a process group of its own:

- **Per block.** `fully_shard(block, reshard_after_forward=True)` on each of `transformer_blocks`, then on the root.
  A block's pre-forward all-gathers its parameters (one collective per block), its post-forward frees them: at rest a
  rank holds `1/N` of every block; while the blocks run it holds one block whole, plus the next one in flight.
- **Prefetch.** Each block's pre-forward issues the next block's all-gather (FSDP2's explicit
  `set_modules_to_forward_prefetch([next_block])`), so it runs while the current block computes. On CUDA FSDP2 runs
  it on its all-gather stream; on CPU (gloo), where streams do nothing, the unshard is made asynchronous (a gloo work
  in gloo's threads, waited for in the next block's pre-forward) or there would be no overlap at all.
- **What stays replicated.** The parameters outside the blocks (`img_in`, `txt_norm`, `txt_in`, `time_text_embed`,
  `norm_out`, `proj_out`: 0.2 % of Qwen-Image) and block 0's `img_mod` (the modulation TeaCache reads to decide
  whether to skip: 0.3 %). The root `fully_shard` ignores them, so it owns no parameters, all-gathers nothing and only
  marks the root of the forward (without it each block would be its own FSDP root, and roots never reshard after
  forward). Because the TeaCache indicator needs no all-gather, a skipped step all-gathers nothing: the blocks are
  not called.
- **Its own process group.** The all-gathers never queue behind the SP all-to-alls and ring exchanges (on NCCL: its
  own communicator and stream).

The SP hooks, CFG parallel, TeaCache and LoRA layers are untouched: FSDP2's hooks fire around each block's forward,
whatever runs inside it. Every rank of the shard group must run the same blocks in the same order; see
[`WeightShardingConfig`] for the one combination where that needs `group="sp"` (TeaCache under true-CFG parallel).

FSDP2 cannot be undone (parameters become `DTensor` shards, module classes are swapped): [`remove_weight_sharding`]
raises. Reload the transformer to run it unsharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging

from .distributed import ParallelGroups, collective_timeout


logger = logging.get_logger(__name__)

WEIGHT_SHARDING_GUARD_HOOK = "diffusers_qwen_sp.weight_sharding_guard"

# Which ranks share (and all-gather) each block's parameters.
SHARD_GROUPS = ("world", "sp")

_NOT_REMOVABLE = (
    "Weight sharding cannot be removed: FSDP2's fully_shard replaced every block parameter with this rank's DTensor "
    "shard and swapped the module classes, and torch offers no way back. Load the transformer (or the pipeline) "
    "again to run it unsharded, or keep it sharded and keep calling it on every rank."
)


@dataclass
class WeightShardingConfig:
    r"""
    Configuration of weight sharding (FSDP2 over the transformer blocks).

    Args:
        group (`str`, defaults to `"world"`):
            The ranks that share each block's parameters. `"world"`: every process of the replica (each holds
            `1/world` of every block; with data-parallel replicas, `dp_degree > 1`, "world" means the replica's
            ranks: a group spanning replicas would all-gather across replicas that run different requests, and
            hang). `"sp"`: the ranks of one sequence-parallel group (`ulysses_degree * ring_degree`); each CFG
            branch then holds a whole copy, split over its SP ranks. Use `"sp"` for TeaCache under CFG parallel with
            true CFG: each branch decides its skips over its own SP group, so the two branches may run the blocks on
            different steps, and a group spanning both would wait on an all-gather that never comes (refused with an
            error at the first call, before any all-gather).
        prefetch (`bool`, defaults to `True`):
            Issue the next block's all-gather in the current block's pre-forward, so that it overlaps the current
            block's compute. `False`: each block all-gathers its parameters when it starts (for measurements).
    """

    group: str = "world"
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.group not in SHARD_GROUPS:
            raise ValueError(
                f"WeightShardingConfig.group must be one of {SHARD_GROUPS}, got {self.group!r}: 'world' shards over "
                "every process, 'sp' over each sequence-parallel group."
            )
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"WeightShardingConfig.prefetch must be a bool, got {self.prefetch!r}.")


@dataclass
class WeightShardingRuntime:
    r"""What [`apply_weight_sharding`] set up on a transformer (fixed while it is on)."""

    config: WeightShardingConfig
    groups: ParallelGroups
    ranks: list[int]  # global ranks of this rank's shard group
    mesh: Any  # the 1D DeviceMesh over them
    replicated: list[str] = field(default_factory=list)  # parameter names kept whole on every rank
    all_gather: Any = None  # the blocks' FSDP2 all-gather (`set_custom_all_gather`); None: FSDP2's own (CUDA)

    @property
    def spans_cfg_branches(self) -> bool:
        """Whether the shard group holds ranks of both CFG branches."""
        return self.groups.cfg_degree > 1 and len(self.ranks) > self.groups.sp_world_size

    def __repr__(self) -> str:
        return (
            f"WeightShardingRuntime(group={self.config.group!r}, ranks={self.ranks}, prefetch={self.config.prefetch}, "
            f"device_type={self.mesh.device_type!r}, replicated={len(self.replicated)} parameters)"
        )


class _WorkGroup(dist.Work):
    """One `Work` for several point-to-point requests: what FSDP2 waits on before it copies the parameters out."""

    def __init__(self, works: list[dist.Work]) -> None:
        super().__init__()
        self._works = works

    def wait(self, timeout: timedelta | None = None) -> bool:
        for work in self._works:
            work.wait()
        return True


# Flat all-gather buffers kept per size: the one in flight (the prefetched block's) and the one being copied out.
_POOLED_BUFFERS = 2


def _storage_use_count(buffer: torch.Tensor) -> int:
    # References to the buffer's memory: `buffer` itself, this call's storage object and one per live view.
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata)


class PointToPointAllGather:
    r"""
    FSDP2's all-gather (the `AllGather` interface of `FSDPModule.set_custom_all_gather`) as one send and one receive
    per peer, straight into the output; for gloo on CPU.

    gloo's own all-gather is about 3x slower than point-to-point for FSDP's flat buffers (2 ranks, 18 MB per rank:
    47 ms vs 16 ms here), and on CPU every byte moved costs the cores that compute. The flat output buffers are kept
    for reuse, as CUDA's caching allocator keeps them reserved: freshly mapped CPU memory page-faults on first write
    (18 ms for 36 MB here, as much as the transfer). A buffer is handed out again only once nothing else refers to its
    memory (FSDP2 dropped it, and every view of it, after copying the parameters out).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(size)
        if not hasattr(torch._C, "_storage_Use_Count"):  # cannot tell when a buffer is free: never reuse
            return torch.empty(size, dtype=dtype, device=device)
        pool = self._buffers.setdefault((numel, dtype, device), [])
        for buffer in pool:
            if _storage_use_count(buffer) == 2:  # `buffer` and the storage object of the call: free
                return buffer.view(size)
        buffer = torch.empty(numel, dtype=dtype, device=device)
        if len(pool) < _POOLED_BUFFERS:
            pool.append(buffer)
        return buffer.view(size)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        world_size, rank = group.size(), group.rank()
        # (P * n,) -> P chunks of (n,): chunk r receives rank r's shard; FSDP2 copied this rank's in already
        chunks = output_tensor.chunk(world_size)
        if chunks[rank].data_ptr() != input_tensor.data_ptr():
            chunks[rank].copy_(input_tensor)
        operations = []
        for peer in range(world_size):
            if peer != rank:
                global_peer = dist.get_global_rank(group, peer)
                # (n,) to every peer, (n,) from every peer into its chunk
                operations.append(dist.P2POp(dist.isend, input_tensor, global_peer, group))
                operations.append(dist.P2POp(dist.irecv, chunks[peer], global_peer, group))
        work = _WorkGroup(dist.batch_isend_irecv(operations))
        if async_op:
            return work  # waited for by FSDP2 before it copies the parameters out
        work.wait()
        return None

    def __repr__(self) -> str:
        return f"PointToPointAllGather(pooled={[key[0] for key in self._buffers]})"


class WeightShardingGuardHook(ModelHook):
    r"""
    On `blocks_stage` when the shard group spans both CFG branches: refuses to run the blocks while TeaCache decides
    per branch (true CFG under CFG parallel), before any all-gather, on every rank alike.

    The branches then may skip different steps; the ranks of one branch would wait on an all-gather the other branch
    never issues. The first step is always computed, so the refusal comes at the first call whatever the order in
    which TeaCache and the sharding were applied.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_transformer", transformer)  # no submodule: the hook is not part of the tree

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        from .hooks.cfg_parallel import get_cfg_parallel_hook
        from .hooks.teacache import get_teacache_hook

        transformer = self._transformer
        cfg_hook = get_cfg_parallel_hook(transformer)
        if cfg_hook is not None and cfg_hook.true_cfg and get_teacache_hook(transformer) is not None:
            transformer.reset_iter_state()  # FSDP2's per-iteration state, left mid-forward by this error
            raise RuntimeError(
                "Weight sharding over the whole world does not compose with TeaCache under CFG parallel with true "
                "CFG: each CFG branch decides its skips on its own ranks, and a shard group spanning both branches "
                "needs them to run the same blocks. Shard over each SP group instead: "
                "pipe.enable_sequence_parallel(..., shard_weights='sp') (WeightShardingConfig(group='sp')); or "
                "disable TeaCache (pipe.disable_teacache())."
            )
        return args, kwargs

    def __repr__(self) -> str:
        return "WeightShardingGuardHook(refuses TeaCache under true-CFG parallel)"


# ---------------------------------------------------------------------------------------------------- apply / remove


def get_weight_sharding(transformer: nn.Module) -> WeightShardingRuntime | None:
    r"""The [`WeightShardingRuntime`] of the sharding applied to `transformer`, or `None`."""
    return getattr(transformer, "_weight_sharding", None)


def _mesh_device_type() -> str:
    # The collectives' device: NCCL all-gathers CUDA tensors, gloo CPU ones (a CPU run on a GPU host uses gloo).
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


def shard_process_group(groups: ParallelGroups, group: str) -> tuple[list[int], dist.ProcessGroup]:
    r"""
    Create the shard process groups of `group` (`"world"`: each replica's ranks; `"sp"`: each SP group), one per
    replica or SP group, and return this rank's ranks and group. Groups of their own: their all-gathers never queue
    behind the SP collectives or the input broadcasts. A collective over every rank.
    """
    world_size = dist.get_world_size()
    if group == "world":  # the replica's ranks: the whole world when dp_degree == 1
        size = groups.replica_size
        layout = [list(range(dp * size, (dp + 1) * size)) for dp in range(world_size // size)]
    else:
        sp = groups.sp_world_size
        layout = [list(range(cfg * sp, (cfg + 1) * sp)) for cfg in range(world_size // sp)]
    seconds = collective_timeout()
    timeout = None if seconds is None else timedelta(seconds=seconds)
    mine = None
    for ranks in layout:  # every rank creates every group, in the same order
        created = dist.new_group(ranks=ranks, timeout=timeout)
        if groups.rank in ranks:
            mine = (ranks, created)
    return mine


def _check_shardable(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(transformer, "blocks_stage"):
        raise TypeError(
            f"Weight sharding needs the staged Qwen-Image transformer, got {type(transformer).__name__}. Use "
            "diffusers_qwen_sp.QwenImageSPTransformer2DModel (from_transformer converts a stock one) or our pipelines."
        )
    if get_weight_sharding(transformer) is not None:
        raise RuntimeError("The transformer's weights are already sharded; apply_weight_sharding runs once per model.")
    if getattr(transformer, "_hf_hook", None) is not None or any(
        getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).keys() & {"group_offloading"}
        for module in transformer.modules()
    ):
        raise ValueError(
            "Weight sharding does not compose with offloading (enable_model_cpu_offload, enable_group_offload, "
            "enable_sequential_cpu_offload): offloading moves whole parameters between devices, FSDP2 holds a shard "
            "of each on this rank's device. Remove model offloading with pipe.remove_all_hooks(), or load the pipeline "
            "again without group offloading, before sharding; sharding already divides the memory."
        )
    for name, parameter in blocks.named_parameters():
        if type(parameter.data) is not torch.Tensor:
            raise ValueError(
                f"transformer_blocks.{name} is a {type(parameter.data).__name__} (quantized?): FSDP2 shards plain "
                "tensors only. Shard the weights in full precision, or quantize without sharding them."
            )
    return blocks


def fully_shard_modules(
    root: nn.Module,
    modules: list[nn.Module],
    process_group: dist.ProcessGroup,
    *,
    prefetch: bool = True,
    ignored_params: set[nn.Parameter] | None = None,
) -> tuple[Any, PointToPointAllGather | None]:
    r"""
    Shard each of `modules` (e.g. a model's blocks) over `process_group` with FSDP2, then mark `root` as the root of
    the forward, which keeps every other parameter of `root` whole and owns none (see the module docstring: per
    module, prefetch, and on CPU an asynchronous point-to-point all-gather). The transformer blocks and the text
    encoder's decoder layers are sharded by this one function.

    Args:
        root (`nn.Module`): the model whose forward runs `modules`.
        modules (`list[nn.Module]`): the modules to shard, in the order the forward runs them (prefetch follows it).
        process_group (`ProcessGroup`): the ranks sharing each module's parameters.
        prefetch (`bool`, defaults to `True`): all-gather the next module while the current one computes.
        ignored_params (`set[nn.Parameter]`, *optional*): parameters inside `modules` to keep whole on every rank.

    Returns:
        `tuple`: the 1D `DeviceMesh` over `process_group` and the CPU all-gather (`None` on CUDA: FSDP2's own).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    ignored_params = set(ignored_params or ())
    # The dimension name "fsdp" tells PEFT that a sharded linear still computes the whole projection: a LoRA added
    # after sharding is then sized from the whole weight, not from this rank's shard as under tensor parallelism.
    mesh = DeviceMesh.from_group(process_group, _mesh_device_type(), mesh_dim_names=("fsdp",))
    sharded_params = {parameter for module in modules for parameter in module.parameters()}
    for module in modules:
        fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=ignored_params or None)
    # The root owns no parameters: it marks the root of the forward, so the modules (non-roots) reshard after use.
    fully_shard(
        root,
        mesh=mesh,
        reshard_after_forward=True,
        ignored_params={parameter for parameter in root.parameters() if parameter not in sharded_params}
        | ignored_params,
    )
    if prefetch:
        for module, following in zip(modules, modules[1:]):
            module.set_modules_to_forward_prefetch([following])
        if mesh.device_type == "cpu":
            # gloo on CPU: a synchronous all-gather blocks the only thread, streams do nothing; an asynchronous one
            # runs in gloo's threads while the module computes (waited for in the next module's pre-forward).
            for module in modules:
                set_async = getattr(module, "_set_unshard_async_op", None)  # FSDP2's, private in torch 2.13
                if set_async is None:
                    logger.warning("This torch cannot make FSDP2's unshard asynchronous: on CPU the prefetch will not "
                                   "overlap the modules' compute.")
                    break
                set_async(True)
    all_gather = None
    if mesh.device_type == "cpu":
        all_gather = PointToPointAllGather()
        for module in modules:
            module.set_custom_all_gather(all_gather)
    return mesh, all_gather


def check_weight_sharding(
    transformer: nn.Module, config: WeightShardingConfig, groups: ParallelGroups | None = None
) -> ParallelGroups:
    r"""
    Every check of [`apply_weight_sharding`], which raise alike on every rank and change nothing (no collective
    either): the staged transformer, not sharded yet, neither offloaded nor quantized, and a group that shards
    something. Returns the groups to shard over. Callers that apply something else that cannot be undone run it first.
    """
    if not isinstance(config, WeightShardingConfig):
        raise TypeError(f"`config` must be a WeightShardingConfig, got {type(config).__name__}.")
    _check_shardable(transformer)
    if not dist.is_initialized():
        raise RuntimeError(
            "Weight sharding needs torch.distributed: launch with `torchrun --nproc-per-node N ...` and enable "
            "sequence parallelism first (pipe.enable_sequence_parallel(..., shard_weights=True))."
        )
    if groups is None:
        from .hooks.sequence_parallel import get_sequence_parallel_runtime

        runtime = get_sequence_parallel_runtime(transformer)
        groups = runtime.groups if runtime is not None else ParallelGroups.create(dist.get_world_size(), 1)
    if config.group == "world" and groups.replica_size == 1 and dist.get_world_size() > 1:
        raise ValueError(
            f"WeightShardingConfig(group='world') with {groups.dp_degree} data-parallel replicas of one process each "
            "shards nothing: 'world' shards over the ranks of one replica. Give each replica several processes "
            "(ulysses_degree, ring_degree or cfg_degree above 1) or leave the weights unsharded."
        )
    if config.group == "sp" and groups.sp_world_size == 1:
        raise ValueError(
            "WeightShardingConfig(group='sp') with one rank per SP group shards nothing. Use group='world' (without "
            "TeaCache under CFG parallel) or a sequence-parallel degree above 1."
        )
    return groups


def apply_weight_sharding(
    transformer: nn.Module, config: WeightShardingConfig | None = None, groups: ParallelGroups | None = None
) -> WeightShardingRuntime:
    r"""
    Shard the transformer blocks' parameters over a group of ranks with FSDP2 (see the module docstring).

    Call it on every rank at the same point (it creates process groups), after sequence/CFG parallelism and after
    loading LoRA adapters (their layers are then sharded with the blocks). On CUDA it moves each block's shard to this
    rank's GPU; move the rest with `pipe.to("cuda")` afterwards, as with sequence parallelism alone. Not undoable:
    [`remove_weight_sharding`] raises.

    Args:
        transformer ([`QwenImageSPTransformer2DModel`]): the staged transformer.
        config ([`WeightShardingConfig`], *optional*): the shard group and the prefetch; default: the whole world.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`], *optional*): the `cfg x ring x ulysses` groups of
            the parallelism applied (`runtime.groups` of `apply_sequence_parallel`); needed for `group="sp"` and to
            guard CFG parallel. Default: the SP runtime's groups, or one Ulysses group over the world.

    Returns:
        [`WeightShardingRuntime`]: the shard group and mesh.

    Example:

    ```py
    >>> # torchrun --nproc-per-node 4 script.py
    >>> from diffusers_qwen_sp import QwenImageSPTransformer2DModel, SequenceParallelConfig
    >>> from diffusers_qwen_sp.hooks import apply_sequence_parallel
    >>> from diffusers_qwen_sp.weight_sharding import WeightShardingConfig, apply_weight_sharding

    >>> transformer = QwenImageSPTransformer2DModel.from_pretrained("Qwen/Qwen-Image", subfolder="transformer")
    >>> runtime = apply_sequence_parallel(transformer, SequenceParallelConfig(ulysses_degree=4))
    >>> apply_weight_sharding(transformer, WeightShardingConfig(), runtime.groups)  # each rank keeps 1/4 of the blocks
    ```
    """
    config = config if config is not None else WeightShardingConfig()
    groups = check_weight_sharding(transformer, config, groups)
    blocks = transformer.transformer_blocks

    ranks, process_group = shard_process_group(groups, config.group)
    # The TeaCache indicator reads block 0's `img_mod` outside the block's forward: keep it whole on every rank.
    indicator_params = set(blocks[0].img_mod.parameters()) if len(blocks) else set()
    block_params = {parameter for block in blocks for parameter in block.parameters()}
    replicated = [
        name
        for name, parameter in transformer.named_parameters()
        if parameter not in block_params or parameter in indicator_params
    ]
    mesh, all_gather = fully_shard_modules(
        transformer, list(blocks), process_group, prefetch=config.prefetch, ignored_params=indicator_params
    )

    runtime = WeightShardingRuntime(
        config=config, groups=groups, ranks=ranks, mesh=mesh, replicated=replicated, all_gather=all_gather
    )
    if runtime.spans_cfg_branches:
        HookRegistry.check_if_exists_or_initialize(transformer.blocks_stage).register_hook(
            WeightShardingGuardHook(transformer), WEIGHT_SHARDING_GUARD_HOOK
        )
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._weight_sharding = runtime
    local, whole = parameter_bytes(blocks)
    if groups.rank == 0:
        logger.info(
            f"Weight sharding on: {len(blocks)} blocks over ranks {ranks} ({mesh.device_type}); this rank holds "
            f"{local / 2**20:.1f} of {whole / 2**20:.1f} MiB of block parameters."
        )
    return runtime


def remove_weight_sharding(transformer: nn.Module) -> None:
    r"""
    A no-op on an unsharded transformer; raises a `RuntimeError` on a sharded one: FSDP2 cannot be undone (reload the
    transformer to run it unsharded).
    """
    if get_weight_sharding(transformer) is not None:
        raise RuntimeError(_NOT_REMOVABLE)


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    r"""
    `(held by this rank, whole)` bytes of `module`'s parameters: a sharded (`DTensor`) parameter counts its local
    shard in the first and its global size in the second; any other counts whole in both.
    """
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for parameter in module.parameters():
        size = parameter.element_size()
        whole += parameter.numel() * size
        local += (parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()) * size
    return local, whole


__all__ = [
    "SHARD_GROUPS",
    "WEIGHT_SHARDING_GUARD_HOOK",
    "PointToPointAllGather",
    "WeightShardingConfig",
    "WeightShardingGuardHook",
    "WeightShardingRuntime",
    "apply_weight_sharding",
    "fully_shard_modules",
    "get_weight_sharding",
    "parameter_bytes",
    "remove_weight_sharding",
]

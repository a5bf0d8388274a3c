"""diffusers `ModelHook`s: sequence-parallel split/gather, CFG parallel and TeaCache."""

from .cfg_parallel import CFG_PARALLEL_HOOK, apply_cfg_parallel, remove_cfg_parallel
from .sequence_parallel import (
    QWEN_IMAGE_SP_PLAN,
    SP_GATHER_HOOK,
    SP_SPLIT_HOOK,
    GatherOutput,
    SequenceParallelConfig,
    SplitOutput,
    apply_sequence_parallel,
    get_sequence_parallel_runtime,
    remove_sequence_parallel,
)
from .teacache import TEACACHE_HOOK, TeaCacheConfig, apply_teacache, remove_teacache, teacache_stats

__all__ = [
    "CFG_PARALLEL_HOOK",
    "QWEN_IMAGE_SP_PLAN",
    "SP_GATHER_HOOK",
    "SP_SPLIT_HOOK",
    "TEACACHE_HOOK",
    "GatherOutput",
    "SequenceParallelConfig",
    "SplitOutput",
    "TeaCacheConfig",
    "apply_cfg_parallel",
    "apply_sequence_parallel",
    "apply_teacache",
    "get_sequence_parallel_runtime",
    "remove_cfg_parallel",
    "remove_sequence_parallel",
    "remove_teacache",
    "teacache_stats",
]

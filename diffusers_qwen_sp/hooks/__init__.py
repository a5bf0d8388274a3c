"""diffusers `ModelHook`s: sequence-parallel split/gather, CFG parallel and TeaCache."""

from .cfg_parallel import CFG_PARALLEL_HOOK, apply_cfg_parallel, get_cfg_parallel_hook, remove_cfg_parallel
from .sequence_parallel import (
    SP_GATHER_HOOK,
    SP_SPLIT_HOOK,
    SequenceParallelConfig,
    apply_sequence_parallel,
    get_sequence_parallel_runtime,
    remove_sequence_parallel,
)
from .teacache import (
    TEACACHE_HOOK,
    TeaCacheConfig,
    apply_teacache,
    get_teacache_hook,
    remove_teacache,
    teacache_stats,
)
from .vae_patch_parallel import (
    PATCH_PARALLEL_VAE_HOOK,
    PatchParallelVAEConfig,
    apply_patch_parallel_vae,
    get_patch_parallel_vae,
    remove_patch_parallel_vae,
)

__all__ = [
    "CFG_PARALLEL_HOOK",
    "SP_GATHER_HOOK",
    "SP_SPLIT_HOOK",
    "TEACACHE_HOOK",
    "SequenceParallelConfig",
    "TeaCacheConfig",
    "apply_cfg_parallel",
    "apply_sequence_parallel",
    "apply_teacache",
    "get_cfg_parallel_hook",
    "get_sequence_parallel_runtime",
    "get_teacache_hook",
    "remove_cfg_parallel",
    "remove_sequence_parallel",
    "remove_teacache",
    "teacache_stats",
    "PATCH_PARALLEL_VAE_HOOK",
    "PatchParallelVAEConfig",
    "apply_patch_parallel_vae",
    "get_patch_parallel_vae",
    "remove_patch_parallel_vae",
]

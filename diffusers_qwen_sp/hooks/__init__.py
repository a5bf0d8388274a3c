"""diffusers `ModelHook`s: sequence-parallel split/gather and TeaCache."""

from .sequence_parallel import (
    QWEN_IMAGE_SP_PLAN,
    GatherOutput,
    SequenceParallelConfig,
    SplitOutput,
    apply_sequence_parallel,
    get_sequence_parallel_runtime,
    remove_sequence_parallel,
)

__all__ = [
    "QWEN_IMAGE_SP_PLAN",
    "GatherOutput",
    "SequenceParallelConfig",
    "SplitOutput",
    "apply_sequence_parallel",
    "get_sequence_parallel_runtime",
    "remove_sequence_parallel",
]

"""torch.distributed for diffusers_qwen_sp, split by concern.

- `groups`: initialising torch.distributed from a launcher and the `cfg x ring x ulysses` process groups
  ([`ParallelGroups`]).
- `collectives`: every collective the package issues (synchronous c10d), and the broadcast of rank 0's inputs.
- `sharding`: the layout of a sequence split over an SP group ([`sp_shard_bounds`]), one function for every user.
- `safety`: cross-rank argument agreement and the classification of collective failures.
- `launch`: [`run_distributed`], several CPU processes with a process group (tests, CPU benchmarks, examples).
- `instrumentation`: [`count_communication`], byte counting installed around the code it measures.
"""

from .collectives import all_gather_dim0, all_to_all_dim0, broadcast_from_rank0, drain, ring_exchange, wait_all
from .groups import ParallelGroups, collective_timeout, init_distributed
from .instrumentation import CommunicationStats, count_communication
from .launch import DistributedProcessError, run_distributed
from .safety import check_same_across_ranks, is_collective_failure
from .sharding import ShardBounds, sp_shard_bounds, take_shard


__all__ = [
    "CommunicationStats",
    "DistributedProcessError",
    "ParallelGroups",
    "ShardBounds",
    "all_gather_dim0",
    "all_to_all_dim0",
    "broadcast_from_rank0",
    "check_same_across_ranks",
    "collective_timeout",
    "count_communication",
    "drain",
    "init_distributed",
    "is_collective_failure",
    "ring_exchange",
    "run_distributed",
    "sp_shard_bounds",
    "take_shard",
    "wait_all",
]

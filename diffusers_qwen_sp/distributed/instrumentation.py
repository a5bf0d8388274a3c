"""Communication accounting for benchmarks, installed around the code it measures.

[`count_communication`] is a `TorchDispatchMode`: while its `with` block is active it sees every collective this rank
issues in eager code, c10d ops (ours in the attention, the SP gather and the CFG exchange, FSDP's) and functional
collectives (diffusers' context parallelism) alike, and adds up its bytes; gather/scatter/reduce-to-one-rank ops,
which nothing here uses, are not counted. Nothing in the collectives or in the transformer blocks records anything,
so the blocks stay free of Python state and `torch.compile` traces them whole; outside the block the mode is not
installed and costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class CommunicationStats:
    r"""
    Bytes this rank sent and received through torch.distributed collectives while [`count_communication`] was active.
    Bytes a rank "sends" to itself (its own chunk of an all-to-all) are not counted.

    Attributes:
        bytes_sent (`int`): bytes sent by this rank.
        bytes_received (`int`): bytes received by this rank.
        calls (`dict[str, int]`): number of calls per operation (`"all_to_all"`, `"all_gather"`, `"p2p"` (one per
            send), `"all_reduce"`, `"broadcast"`, `"reduce_scatter"`).
        bytes_sent_by_op (`dict[str, int]`): `bytes_sent` split by operation.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent_by_op: dict[str, int] = field(default_factory=dict)

    def record(self, op: str, sent: int, received: int, call: bool = True) -> None:
        r"""Add one collective's bytes; `call=False` adds bytes without counting a call (the receive of a P2P pair)."""
        self.bytes_sent += sent
        self.bytes_received += received
        if call:
            self.calls[op] = self.calls.get(op, 0) + 1
        if sent or call:
            self.bytes_sent_by_op[op] = self.bytes_sent_by_op.get(op, 0) + sent


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(tensor) for tensor in tensors)


def _group_size(args: tuple) -> int:
    for arg in args:
        if isinstance(arg, torch.ScriptObject):  # c10d ops take the ProcessGroup itself
            return dist.ProcessGroup.unbox(arg).size()
    if isinstance(args[-1], str):  # functional collectives take the group's name last
        return dist.distributed_c10d._resolve_process_group(args[-1]).size()
    raise RuntimeError("count_communication: a collective without a process group argument.")


# Functional collectives (`torch.distributed._functional_collectives`, what diffusers' context parallelism and
# compiled code call) -> the c10d op of the same traffic, measured the same way.
_FUNCTIONAL = {
    "all_to_all_single": "alltoall_base_",
    "all_gather_into_tensor": "_allgather_base_",
    "reduce_scatter_tensor": "_reduce_scatter_base_",
    "all_reduce": "allreduce_",
    "broadcast": "broadcast_",
}
# c10d ops whose first argument is the output and second the input.
_OUTPUT_FIRST = (
    "alltoall_base_", "alltoall_", "_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_",
    "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
)


def _measure(name: str, args: tuple, functional: bool) -> tuple[str, int, int, bool] | None:
    """(our op name, bytes sent, bytes received, counts as a call) of the collective `name`, or None to ignore it.

    Bytes follow what each rank must move at least: an all-to-all keeps its own chunk, an all-gather receives the
    P - 1 other chunks and sends its own to P - 1 ranks, an all-reduce and a broadcast count once at their size, a
    P2P pair counts one call (the send) with the bytes of each side.
    """
    if functional:
        name = _FUNCTIONAL.get(name, "")
        tensors = args[0]  # functional collectives take (input, ..., group name) and return the output
    else:
        tensors = args[1] if name in _OUTPUT_FIRST else args[0]  # (output, input, group, ...) or (tensors, group, ...)
    if name in ("alltoall_base_", "alltoall_"):
        moved = _nbytes(tensors) * (_group_size(args) - 1) // _group_size(args)
        return "all_to_all", moved, moved, True
    if name in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_"):
        moved = _nbytes(tensors) * (_group_size(args) - 1)
        return "all_gather", moved, moved, True
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        moved = _nbytes(tensors) * (_group_size(args) - 1) // _group_size(args)
        return "reduce_scatter", moved, moved, True
    if name in ("allreduce_", "broadcast_"):
        return ("all_reduce" if name == "allreduce_" else "broadcast"), _nbytes(tensors), _nbytes(tensors), True
    if name == "send":
        return "p2p", _nbytes(tensors), 0, True
    if name == "recv_":
        return "p2p", 0, _nbytes(tensors), False
    return None


class _CommunicationCounter(TorchDispatchMode):
    def __init__(self, stats: CommunicationStats) -> None:
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[-1]
            measured = _measure(name, args, functional=func.namespace == "_c10d_functional")
            if measured is not None:
                self.stats.record(*measured)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_communication() -> Iterator[CommunicationStats]:
    r"""
    Count the bytes the torch.distributed collectives of this rank send and receive inside the `with` block.

    Installed around the measured code, never inside it: the collectives and the blocks hold no counter. It counts
    every collective of the block, whoever issues it (a pipeline's broadcast of rank 0's inputs included), and nested
    blocks each count what runs inside them. Use it on eager code (a compiled region runs its collectives without
    dispatching them through Python).

    Example:

    ```py
    >>> with count_communication() as stats:
    ...     txt_out, img_out = joint_attention(..., groups=groups)
    >>> stats.bytes_sent, stats.calls
    (1572864, {'all_to_all': 2})
    ```
    """
    stats = CommunicationStats()
    with _CommunicationCounter(stats):
        yield stats


__all__ = ["CommunicationStats", "count_communication"]

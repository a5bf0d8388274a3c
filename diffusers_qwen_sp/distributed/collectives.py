"""The collectives of diffusers_qwen_sp, in one place.

All are synchronous c10d calls: the result is complete when the function returns. (Asynchronous functional
collectives read before completion made diffusers' own context parallelism return garbage on some calls.) None of
them counts or records anything: [`~diffusers_qwen_sp.distributed.count_communication`] observes them from outside,
so the blocks that call them stay traceable by `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from diffusers.utils import logging


if TYPE_CHECKING:
    from .groups import ParallelGroups


logger = logging.get_logger(__name__)

# torch renamed all_gather_into_tensor to all_gather_single (2.10+); the old name still works and warns.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def all_gather_dim0(tensor: torch.Tensor, group: dist.ProcessGroup | None, world_size: int) -> torch.Tensor:
    r"""
    All-gather `tensor` over `group`, concatenated along dim 0 in group-rank order: `(N, ...) -> (world_size * N, ...)`.
    """
    tensor = tensor.contiguous()
    output = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(output, tensor, group=group)  # (N, ...) per rank -> (P * N, ...)
    return output


def all_to_all_dim0(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    r"""
    `(P, ...) -> (P, ...)`: chunk `i` of dim 0 goes to group rank `i`; chunk `j` of the result came from rank `j`.
    """
    tensor = tensor.contiguous()  # `empty_like` on a permuted view would keep its strides
    output = torch.empty_like(tensor)
    dist.all_to_all_single(output, tensor, group=group)
    return output


def ring_exchange(send: torch.Tensor, groups: ParallelGroups) -> tuple[list[dist.Work], torch.Tensor]:
    r"""
    Start sending `send` to the next rank of this rank's ring and receiving the previous one's (same shape).

    Returns:
        `tuple[list[dist.Work], torch.Tensor]`: the requests to wait on (see [`wait_all`]) and the receive buffer,
        valid once they completed.
    """
    recv = torch.empty_like(send)
    ring_ranks, ring_rank = groups.ring_ranks, groups.ring_rank
    next_rank = ring_ranks[(ring_rank + 1) % groups.ring_degree]
    prev_rank = ring_ranks[(ring_rank - 1) % groups.ring_degree]
    ops = [
        dist.P2POp(dist.isend, send, next_rank, group=groups.ring_group),
        dist.P2POp(dist.irecv, recv, prev_rank, group=groups.ring_group),
    ]
    return dist.batch_isend_irecv(ops), recv


def wait_all(requests: list[dist.Work]) -> None:
    r"""Wait for every request of [`ring_exchange`]."""
    for request in requests:
        request.wait()


def drain(requests: list[dist.Work]) -> None:
    r"""
    Wait for pending point-to-point requests after an error: a request left pending makes the next collective hang.
    Failures are logged, not raised, so the error being handled stays the one the caller sees.
    """
    for request in requests:
        try:
            request.wait()
        except Exception:  # noqa: BLE001
            logger.warning("A ring P2P request failed while recovering from an error.", exc_info=True)


# ---------------------------------------------------------------------------------------------------------------------
# Broadcast of a structure of tensors
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSlot:
    """Stands for a tensor in the structure rank 0 broadcasts; the data follows by `dist.broadcast`."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _skeleton(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _TensorSlot(tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {key: _skeleton(item, tensors) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_skeleton(item, tensors) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_skeleton(item, tensors) for item in value)
    return value


def _local_tensors(value: Any, skeleton: Any, found: list[torch.Tensor | None]) -> None:
    """This rank's tensor at each tensor slot of `skeleton` (None where the local structure differs)."""
    if isinstance(skeleton, _TensorSlot):
        found.append(value if isinstance(value, torch.Tensor) else None)
    elif isinstance(skeleton, dict):
        for key, item in skeleton.items():
            _local_tensors(value.get(key) if isinstance(value, dict) else None, item, found)
    elif isinstance(skeleton, (list, tuple)):
        same = isinstance(value, (list, tuple)) and len(value) == len(skeleton)
        for index, item in enumerate(skeleton):
            _local_tensors(value[index] if same else None, item, found)


def _fill(skeleton: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if isinstance(skeleton, _TensorSlot):
        return next(tensors)
    if isinstance(skeleton, dict):
        return {key: _fill(item, tensors) for key, item in skeleton.items()}
    if isinstance(skeleton, tuple) and hasattr(skeleton, "_fields"):
        return type(skeleton)(*(_fill(item, tensors) for item in skeleton))
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(item, tensors) for item in skeleton)
    return skeleton


def broadcast_from_rank0(value: Any, group: dist.ProcessGroup | None = None) -> Any:
    r"""
    Return rank 0's `value` on every rank of `group`: tensors, and tuples, lists, dicts and named tuples of them
    (other leaves such as `None` or numbers are taken from rank 0 too).

    Used so that every rank denoises the same prompt embeddings and initial latents. Each received tensor lands on
    the device of this rank's own tensor at the same place (its default device if it has none there). A no-op
    without an initialised process group or with a group of one rank. Every rank of `group` must call it.

    Args:
        value (`Any`): this rank's value; only rank 0's is used.
        group (`ProcessGroup`, *optional*): the group to broadcast over; defaults to the world.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    source = dist.get_global_rank(group, 0) if group is not None else 0
    is_source = dist.get_rank() == source
    use_cuda = "nccl" in str(dist.get_backend(group))
    default_device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    # 1. The structure, with tensors replaced by (shape, dtype) slots, as a pickled object.
    source_tensors: list[torch.Tensor] = []
    holder = [_skeleton(value, source_tensors) if is_source else None]
    dist.broadcast_object_list(holder, src=source, group=group, device=default_device if use_cuda else None)
    skeleton = holder[0]

    # 2. The tensor data, one broadcast per tensor, on a device the backend can use.
    if is_source:
        for tensor in source_tensors:
            comm = tensor.contiguous()
            if use_cuda and comm.device.type != "cuda":
                comm = comm.to(default_device)
            dist.broadcast(comm, src=source, group=group)
        return value
    slots: list[_TensorSlot] = []
    _skeleton_slots(skeleton, slots)
    local: list[torch.Tensor | None] = []
    _local_tensors(value, skeleton, local)
    received = []
    for slot, mine in zip(slots, local):
        device = mine.device if mine is not None else default_device
        comm_device = default_device if use_cuda and device.type != "cuda" else device
        buffer = torch.empty(slot.shape, dtype=slot.dtype, device=comm_device)
        dist.broadcast(buffer, src=source, group=group)
        received.append(buffer.to(device))
    return _fill(skeleton, iter(received))


def _skeleton_slots(skeleton: Any, slots: list[_TensorSlot]) -> None:
    if isinstance(skeleton, _TensorSlot):
        slots.append(skeleton)
    elif isinstance(skeleton, dict):
        for item in skeleton.values():
            _skeleton_slots(item, slots)
    elif isinstance(skeleton, (list, tuple)):
        for item in skeleton:
            _skeleton_slots(item, slots)
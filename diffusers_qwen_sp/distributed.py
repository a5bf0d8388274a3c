"""Process groups for sequence parallelism (Ulysses x Ring) and CFG parallelism.

All process-group state lives in one small object, [`ParallelGroups`], built once after `torch.distributed` is
initialised and passed to whoever needs it (attention, split/gather hooks, caches). Nothing here is a module-level
global.

Rank layout (Ulysses ranks contiguous, so that the bandwidth-hungry all-to-all stays inside a node):

    rank = cfg_idx * (ring_degree * ulysses_degree) + ring_idx * ulysses_degree + ulysses_idx

The sequence-parallel (SP) group of a rank is the `ring_degree * ulysses_degree` ranks sharing its `cfg_idx`; inside
it the rank's index is `sp_rank = ring_idx * ulysses_degree + ulysses_idx`, which is also the index of the image
chunk the rank holds.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from diffusers.utils import logging


logger = logging.get_logger(__name__)

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------------------------------
# Communication accounting
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CommunicationStats:
    r"""
    Bytes this rank sent and received through the package's collectives (attention, SP gather, CFG exchange) while [`count_communication`] was
    active. Bytes a rank "sends" to itself (its own chunk of an all-to-all) are not counted.

    Attributes:
        bytes_sent (`int`): bytes sent by this rank.
        bytes_received (`int`): bytes received by this rank.
        calls (`dict[str, int]`): number of calls per operation (`"all_to_all"`, `"all_gather"`, `"p2p"`).
        bytes_sent_by_op (`dict[str, int]`): `bytes_sent` split by operation.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent_by_op: dict[str, int] = field(default_factory=dict)

    def record(self, op: str, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes_sent_by_op[op] = self.bytes_sent_by_op.get(op, 0) + sent


# A context variable, not a global counter: accounting is scoped to a `with` block (and to the current thread/task).
_ACTIVE_STATS: ContextVar[CommunicationStats | None] = ContextVar("diffusers_qwen_sp_comm_stats", default=None)


@contextlib.contextmanager
def count_communication() -> Iterator[CommunicationStats]:
    r"""
    Count the bytes the package's collectives send and receive on this rank inside the `with` block. Costs
    nothing when not active. Nested blocks count in the innermost one only.

    Example:

    ```py
    >>> with count_communication() as stats:
    ...     txt_out, img_out = joint_attention(..., groups=groups)
    >>> stats.bytes_sent, stats.calls
    (1572864, {'all_to_all': 2})
    ```
    """
    stats = CommunicationStats()
    token = _ACTIVE_STATS.set(stats)
    try:
        yield stats
    finally:
        _ACTIVE_STATS.reset(token)


def record_communication(op: str, sent: int, received: int) -> None:
    """Add one collective's bytes to the active [`count_communication`] block, if any."""
    stats = _ACTIVE_STATS.get()
    if stats is not None:
        stats.record(op, sent, received)



# torch renamed all_gather_into_tensor to all_gather_single (2.10+); the old name still works and warns.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def all_gather_dim0(tensor: torch.Tensor, group: dist.ProcessGroup | None, world_size: int) -> torch.Tensor:
    r"""
    All-gather `tensor` over `group`, concatenated along dim 0 in group-rank order: `(N, ...) -> (world_size * N, ...)`.

    Synchronous c10d (the result is complete when it returns), counted by [`count_communication`].
    """
    tensor = tensor.contiguous()
    output = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(output, tensor, group=group)  # (N, ...) per rank -> (P * N, ...)
    moved = tensor.numel() * tensor.element_size() * (world_size - 1)
    record_communication("all_gather", moved, moved)
    return output


def init_distributed(timeout: float = 600.0, backend: str | None = None) -> None:
    r"""
    Initialise the default process group from the launcher environment, if it is not initialised yet.

    `torchrun` and `accelerate launch` set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. When
    CUDA is available the backend is NCCL and the current CUDA device is set to `LOCAL_RANK`; otherwise it is gloo.

    Args:
        timeout (`float`, defaults to `600.0`):
            Collective timeout in seconds, passed to `init_process_group`. A rank that waits longer on a collective
            raises instead of hanging forever.
        backend (`str`, *optional*):
            Force a backend (`"nccl"`, `"gloo"`, ...). Defaults to NCCL with CUDA, gloo without.

    Raises:
        `RuntimeError`: if no process group exists and the launcher environment variables are missing.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch.")
    if dist.is_initialized():
        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None and dist.get_backend() == "nccl" and torch.cuda.current_device() != int(local_rank):
            # A process group started by the user without set_device: NCCL needs one GPU per local rank.
            torch.cuda.set_device(int(local_rank))
        return
    missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and the launcher environment variables {missing} are not set. "
            "Launch the script with `torchrun --nproc-per-node N script.py ...` or "
            "`accelerate launch --num_processes N script.py ...`, or call "
            "`torch.distributed.init_process_group` yourself before building the parallel groups."
        )
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout), init_method="env://"
    )
    if rank == 0:
        logger.info(f"Initialised torch.distributed: backend={backend}, world_size={world_size}.")


def _new_group(ranks: list[int], world_size: int) -> dist.ProcessGroup | None:
    """A process group over `ranks`; the default group when it covers the world. Collective over all ranks."""
    if len(ranks) == world_size:
        return dist.group.WORLD
    # `new_group` does not inherit the default group's timeout (gloo subgroups would wait 30 minutes on a dead peer).
    seconds = collective_timeout()
    return dist.new_group(ranks=ranks, timeout=None if seconds is None else timedelta(seconds=seconds))


def collective_timeout(group: dist.ProcessGroup | None = None) -> float | None:
    r"""
    The collective timeout of `group` (default: the world) in seconds: how long a collective waits for the other ranks
    before it raises. `None` without an initialised process group or when the backend does not tell.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    for device_type in ("cpu", "cuda"):
        try:
            timeout = group._get_backend(torch.device(device_type)).options._timeout
        except Exception:  # noqa: BLE001 - private API: no backend for this device, or another torch version
            continue
        if isinstance(timeout, timedelta):
            return timeout.total_seconds()
    return None


class _Missing:
    """Stands for an entry one rank has and another lacks in [`check_same_across_ranks`]."""

    def __repr__(self) -> str:
        return "nothing"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Missing)

    def __hash__(self) -> int:
        return 0


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays whose `==` is elementwise
        return repr(a) == repr(b)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_across_ranks(
    values: dict[str, Any],
    group: dist.ProcessGroup | None = None,
    what: str = "call the pipeline with the same arguments",
) -> None:
    r"""
    Raise the same `ValueError` on every rank of `group` unless every rank passed equal `values`.

    Ranks that shard one computation must agree on what they compute: a rank given, say, a different step count runs
    a different sequence of collectives, which ends in a hang or a timeout long after the cause. One
    `all_gather_object` of `values` finds it before the work starts. Every rank of `group` must call it. A no-op
    without an initialised process group or with a group of one rank.

    Args:
        values (`dict[str, Any]`):
            Small, picklable descriptions of this rank's inputs, e.g. `{"num_inference_steps": 50, "height": 1024}`.
            Describe large objects by what must agree (a tensor by its shape, an image by its size).
        group (`ProcessGroup`, *optional*): the ranks that must agree; defaults to the world.
        what (`str`): the end of the error message, telling what every rank must do.

    Raises:
        `ValueError`: on every rank, naming each differing entry and the value of every rank, e.g.
            `num_inference_steps differs across ranks: rank 0 has 50, rank 1 has 30; every rank must call the
            pipeline with the same arguments.`

    Example:

    ```py
    >>> check_same_across_ranks({"num_inference_steps": steps, "prompt": prompt})
    ```
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, values, group=group)  # one dict per rank, in group-rank order
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(gathered)))
    keys = list(dict.fromkeys(key for entry in gathered for key in entry))
    differences = []
    for key in keys:
        per_rank = [entry.get(key, _Missing()) for entry in gathered]
        if all(_equal(value, per_rank[0]) for value in per_rank[1:]):
            continue
        distinct: list[tuple[Any, list[int]]] = []  # (value, ranks holding it) in order of first appearance
        for rank, value in zip(ranks, per_rank):
            for seen, holders in distinct:
                if _equal(value, seen):
                    holders.append(rank)
                    break
            else:
                distinct.append((value, [rank]))
        parts = [
            f"rank {holders[0]} has {_short_repr(value)}"
            if len(holders) == 1
            else f"ranks {', '.join(map(str, holders))} have {_short_repr(value)}"
            for value, holders in distinct
        ]
        differences.append(f"{key} differs across ranks: {', '.join(parts)}")
    if differences:
        raise ValueError("; ".join(differences) + f"; every rank must {what}.")


@dataclass(repr=False)
class ParallelGroups:
    r"""
    The process groups of a `cfg x ring x ulysses` device mesh, seen from the current rank.

    Build it with [`ParallelGroups.create`]. A group of size 1 is `None` and the code using it must not issue
    collectives on it (its rank is 0 and its size 1).

    Attributes:
        ulysses_degree, ring_degree, cfg_degree (`int`): the mesh degrees.
        sp_group (`ProcessGroup` or `None`): the sequence-parallel group (`ring_degree * ulysses_degree` ranks).
        sp_rank, sp_world_size (`int`): the rank inside the SP group and its size. `sp_rank` is the index of the
            sequence chunk this rank holds.
        ulysses_group, ulysses_rank: the all-to-all group (contiguous ranks) and the rank inside it.
        ring_group, ring_rank: the ring group and the rank inside it.
        ring_ranks (`list[int]`): the global ranks of the ring, in ring order (for point-to-point sends).
        cfg_group, cfg_rank: the group across CFG branches and the rank inside it (the branch index).
        sp_ranks, ulysses_ranks, cfg_ranks (`list[int]`): the global ranks of each group.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    rank: int = 0
    world_size: int = 1
    sp_group: dist.ProcessGroup | None = None
    sp_rank: int = 0
    sp_ranks: list[int] = field(default_factory=lambda: [0])
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_rank: int = 0
    ulysses_ranks: list[int] = field(default_factory=lambda: [0])
    ring_group: dist.ProcessGroup | None = None
    ring_rank: int = 0
    ring_ranks: list[int] = field(default_factory=lambda: [0])
    cfg_group: dist.ProcessGroup | None = None
    cfg_rank: int = 0
    cfg_ranks: list[int] = field(default_factory=lambda: [0])

    @property
    def sp_world_size(self) -> int:
        """Size of the sequence-parallel group: `ring_degree * ulysses_degree`."""
        return self.ring_degree * self.ulysses_degree

    @classmethod
    def create(cls, ulysses_degree: int, ring_degree: int, cfg_degree: int = 1) -> "ParallelGroups":
        r"""
        Build the groups of a `cfg_degree x ring_degree x ulysses_degree` mesh over the default process group.

        Every rank must call this with the same degrees, at the same point of the program: each `new_group` is a
        collective over all ranks and the groups are created in the same order on every rank.

        Args:
            ulysses_degree (`int`): all-to-all (head-sharding) degree; must divide the number of attention heads.
            ring_degree (`int`): ring-attention degree.
            cfg_degree (`int`, defaults to `1`): number of CFG branches run in parallel (1 or 2).

        Returns:
            [`ParallelGroups`] for the current rank. Without an initialised process group only the trivial mesh
            `(1, 1, 1)` is accepted.

        Example:

        ```py
        >>> from diffusers_qwen_sp.distributed import ParallelGroups, init_distributed

        >>> init_distributed()  # under `torchrun --nproc-per-node 4 ...`
        >>> groups = ParallelGroups.create(ulysses_degree=2, ring_degree=2)
        >>> groups.sp_world_size
        4
        ```
        """
        degrees = {"ulysses_degree": ulysses_degree, "ring_degree": ring_degree, "cfg_degree": cfg_degree}
        for name, value in degrees.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        product = cfg_degree * ring_degree * ulysses_degree
        if product != world_size:
            raise ValueError(
                f"cfg_degree * ring_degree * ulysses_degree = {cfg_degree} * {ring_degree} * {ulysses_degree} = "
                f"{product}, but the world size is {world_size}"
                + ("" if initialised else " (torch.distributed is not initialised)")
                + ". Choose degrees whose product equals the number of processes, e.g. "
                f"ulysses_degree={world_size}, ring_degree=1, cfg_degree=1."
            )
        if not initialised:
            return cls()

        rank = dist.get_rank()
        sp_size = ring_degree * ulysses_degree
        cfg_idx, sp_rank = divmod(rank, sp_size)
        ring_idx, ulysses_idx = divmod(sp_rank, ulysses_degree)

        def global_rank(cfg: int, ring: int, ulysses: int) -> int:
            return cfg * sp_size + ring * ulysses_degree + ulysses

        groups = cls(
            ulysses_degree=ulysses_degree,
            ring_degree=ring_degree,
            cfg_degree=cfg_degree,
            rank=rank,
            world_size=world_size,
            sp_rank=sp_rank,
            ulysses_rank=ulysses_idx,
            ring_rank=ring_idx,
            cfg_rank=cfg_idx,
            sp_ranks=[global_rank(cfg_idx, r, u) for r in range(ring_degree) for u in range(ulysses_degree)],
            ulysses_ranks=[global_rank(cfg_idx, ring_idx, u) for u in range(ulysses_degree)],
            ring_ranks=[global_rank(cfg_idx, r, ulysses_idx) for r in range(ring_degree)],
            cfg_ranks=[global_rank(c, ring_idx, ulysses_idx) for c in range(cfg_degree)],
        )

        # Every rank walks every group in the same order and keeps the one it belongs to; size-1 groups are skipped
        # on all ranks alike (no collective ever runs on them).
        degrees = {"cfg": cfg_degree, "ring": ring_degree, "ulysses": ulysses_degree}
        mine = {"cfg": cfg_idx, "ring": ring_idx, "ulysses": ulysses_idx}

        def group_along(*varying: str) -> dist.ProcessGroup | None:
            if math.prod(degrees[axis] for axis in varying) == 1:
                return None
            fixed = [axis for axis in degrees if axis not in varying]
            kept = None
            for fixed_values in itertools.product(*(range(degrees[axis]) for axis in fixed)):
                coordinates = dict(zip(fixed, fixed_values))
                ranks = [
                    global_rank(**{**coordinates, **dict(zip(varying, values))})
                    for values in itertools.product(*(range(degrees[axis]) for axis in varying))
                ]
                group = _new_group(ranks, world_size)
                if all(mine[axis] == coordinates[axis] for axis in fixed):
                    kept = group
            return kept

        groups.sp_group = group_along("ring", "ulysses")
        groups.ulysses_group = group_along("ulysses")
        groups.ring_group = group_along("ring")
        groups.cfg_group = group_along("cfg")
        return groups

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}/{self.world_size}, cfg={self.cfg_degree}, "
            f"ring={self.ring_degree}, "
            f"ulysses={self.ulysses_degree}; sp_rank={self.sp_rank}, ring_rank={self.ring_rank}, "
            f"ulysses_rank={self.ulysses_rank}, cfg_rank={self.cfg_rank}; sp_ranks={self.sp_ranks}, "
            f"ring_ranks={self.ring_ranks}, ulysses_ranks={self.ulysses_ranks}, cfg_ranks={self.cfg_ranks})"
        )


def is_collective_failure(error: BaseException) -> bool:
    r"""
    Whether `error` came out of a torch.distributed collective (a peer that died, closed its connection or did not
    arrive in time), as opposed to an error of this rank's own computation.

    `DistError` and its subclasses are; so is a `RuntimeError` raised inside the `torch.distributed` package, which is
    how gloo reports a closed connection (`Connection closed by peer`) or a timeout (`Timed out waiting ...`).
    """
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:  # the innermost Python frame: where the C++ error surfaced
        traceback = traceback.tb_next
    package = os.path.dirname(os.path.abspath(dist.__file__))
    return os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(package + os.sep)


class ShardBounds(NamedTuple):
    """Where one rank's chunk of a zero-padded, evenly split sequence lies."""

    start: int
    """First global position of the chunk (in the padded sequence)."""
    end: int
    """One past the last global position of the chunk."""
    local_len: int
    """Chunk length, the same on every rank: `ceil(seq_len / world_size)`."""
    padded_len: int
    """`local_len * world_size`."""
    valid_len: int
    """How many positions of the chunk are real tokens (`< seq_len`); the rest is padding."""


def sp_shard_bounds(seq_len: int, world_size: int, rank: int) -> ShardBounds:
    r"""
    Bounds of chunk `rank` when a sequence of `seq_len` tokens is zero-padded to a multiple of `world_size` and split
    into `world_size` equal chunks (the layout [`~diffusers_qwen_sp.attention.joint_attention`] expects).

    Args:
        seq_len (`int`): number of real tokens.
        world_size (`int`): number of chunks (the SP world size).
        rank (`int`): chunk index (the SP rank).

    Example:

    ```py
    >>> sp_shard_bounds(5, 4, 2)  # chunks of 2: [0, 2) [2, 4) [4, 6) [6, 8); positions 5.. are padding
    ShardBounds(start=4, end=6, local_len=2, padded_len=8, valid_len=1)
    ```
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need world_size >= 1 and 0 <= rank < world_size, got world_size={world_size}, rank={rank}.")
    if seq_len < 0:
        raise ValueError(f"`seq_len` must be >= 0, got {seq_len}.")
    local_len = -(-seq_len // world_size)
    start = rank * local_len
    end = start + local_len
    valid_len = max(0, min(end, seq_len) - start)
    return ShardBounds(start, end, local_len, local_len * world_size, valid_len)


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

"""The rank protocol's messages, and the groups they travel over: [`RankGroup`] (the collectives of one replica, from
its leader) and [`ControlLink`] (rank 0 and the leader of another replica). See `engine` for the protocol."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import ParallelGroups, is_collective_failure
from ..hooks.sequence_parallel import get_sequence_parallel_runtime
from .model import ServedModel
from .protocol import WorkItem


_MAX_ERROR_CHARS = 500


class FatalServeError(RuntimeError):
    """The service cannot go on (a rank died or got stuck, the process group failed, a second stop signal)."""


@dataclass(frozen=True)
class RunBatch:
    items: list[WorkItem]


@dataclass(frozen=True)
class Idle:
    pass


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class Abort:
    """The service failed elsewhere: every rank of the replica raises [`FatalServeError`] with `reason`."""

    reason: str


@dataclass(frozen=True)
class Progress:
    """A remote replica's heartbeat to rank 0 while its batch runs."""


@dataclass(frozen=True)
class Fatal:
    """A remote replica's leader to rank 0: a collective of the replica failed; the service must stop."""

    reason: str


@dataclass
class Report:
    r"""The end of a round, as the replica's leader saw it (sent to rank 0 by the leaders of other replicas)."""

    images: list[list[Any]] | None = None
    error: str | None = None  # for the 500: the first failing rank's error
    error_detail: str | None = None  # for the log: every failing rank's error
    seconds: float = 0.0
    computed: int = 0
    skipped: int = 0
    stop: bool = False


def describe_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def root_collective_error(error: BaseException) -> str:
    """The innermost collective failure of `error`'s chain, in one short line (gloo's source location cut off)."""
    found, seen = error, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if is_collective_failure(error):
            found = error
        error = error.__cause__ or error.__context__
    lines = str(found).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "")  # "[.../pair.cc:537] Read error ..."
    text = text.split(". This is typically")[0]
    return f"{type(found).__name__}: {text}"[:200]


def is_fatal(error: BaseException) -> bool:
    """Whether `error` leaves the ranks out of step: a collective failure anywhere in its chain, or an interrupt."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, FatalServeError)):
        return True
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if is_collective_failure(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class RankGroup:
    r"""
    The collectives of the rank protocol over one replica, from its leader `ranks[0]` (no-ops for one rank).

    Args:
        group (`ProcessGroup`, *optional*): the replica's group; default: the world.
        ranks (`list[int]`, *optional*): its global ranks in group order; default: every rank of the world.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, ranks: list[int] | None = None) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if ranks is None:
            ranks = list(range(dist.get_world_size())) if initialised else [0]
        self.group = group
        self.ranks = list(ranks)
        self.source = self.ranks[0]
        self.active = initialised and len(self.ranks) > 1
        backend = str(dist.get_backend(group)) if self.active else ""
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def broadcast(self, command: Any) -> Any:
        if not self.active:
            return command
        holder = [command]
        dist.broadcast_object_list(holder, src=self.source, group=self.group)
        return holder[0]

    def agree(self, failed: bool, stop: bool) -> tuple[bool, bool]:
        """`(failed on any rank, stop asked on any rank)`: one all-reduce, the same answer on every rank."""
        if not self.active:
            return failed, stop
        flags = torch.tensor([int(failed), int(stop)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)  # (2,) per rank -> (2,) elementwise max
        return bool(flags[0].item()), bool(flags[1].item())

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * len(self.ranks)
        dist.all_gather_object(gathered, value, group=self.group)  # one value per rank, in `ranks` order
        return gathered


class ControlLink:
    r"""
    Rank 0 and the leader of replica `replica`: picklable messages over a two-rank gloo group (CPU objects, also
    when the world is NCCL). Used by one thread on each side: feeder `replica` on rank 0, the leader's main thread.
    """

    def __init__(self, group: dist.ProcessGroup, replica: int, leader: int, heartbeat_s: float) -> None:
        self.group = group
        self.replica = replica
        self.leader = leader
        self.heartbeat_s = heartbeat_s
        self.broken = False
        self._last_sent = time.monotonic()

    def __repr__(self) -> str:
        return f"ControlLink(replica={self.replica}, ranks=[0, {self.leader}], broken={self.broken})"

    def send(self, message: Any) -> None:
        try:
            dist.broadcast_object_list([message], src=dist.get_rank(), group=self.group)
        except BaseException:
            self.broken = True
            raise
        self._last_sent = time.monotonic()

    def receive(self) -> Any:
        holder = [None]
        peer = self.leader if dist.get_rank() == 0 else 0
        try:
            dist.broadcast_object_list(holder, src=peer, group=self.group)
        except BaseException:
            self.broken = True
            raise
        return holder[0]

    def progress(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """The pipeline's `callback_on_step_end` on a remote leader: a [`Progress`] heartbeat, at most every
        `heartbeat_s`. A failure here is fatal (rank 0 is gone), not an error of the batch."""
        if time.monotonic() - self._last_sent >= self.heartbeat_s:
            try:
                self.send(Progress())
            except BaseException as error:  # noqa: BLE001 - re-raised as fatal
                raise FatalServeError(f"rank 0 is gone ({root_collective_error(error)})") from error
        return {}


def replica_layout(served: ServedModel, groups: ParallelGroups | None) -> ParallelGroups:
    """The parallel layout the engine serves with: `groups`, the pipeline's, or one replica spanning the world."""
    if groups is not None:
        return groups
    runtime = get_sequence_parallel_runtime(getattr(served.pipe, "transformer", None))
    if runtime is not None:
        return runtime.groups
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return ParallelGroups(
            rank=dist.get_rank(), world_size=world, replica_ranks=list(range(world)), replica_rank=dist.get_rank(),
            ulysses_degree=world, replica_group=dist.group.WORLD if world > 1 else None,
        )
    return ParallelGroups()


__all__ = [
    "Abort", "ControlLink", "FatalServeError", "Fatal", "Idle", "Progress", "RankGroup", "Report", "RunBatch", "Stop",
    "describe_error", "is_fatal", "replica_layout", "root_collective_error",
]

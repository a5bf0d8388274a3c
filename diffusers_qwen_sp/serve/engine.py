"""The rank loop: rank 0 hands work to the group, every rank runs the pipeline, the results come back to rank 0.

Every collective of the service runs from one thread per rank (the engine's), in the same order on every rank. A
round is:

1. rank 0 broadcasts a command: run a batch (the validated [`WorkItem`]s, plain picklable values), idle (a heartbeat,
   sent when no work came within `heartbeat_s`, so that waiting ranks never reach the collective timeout and a dead
   rank is noticed even when no request comes), or stop (drained: every rank returns);
2. for a batch, every rank calls the pipeline with the same arguments (rank 0's noise and prompt embeddings are
   broadcast inside the call); an exception is caught and remembered;
3. every rank all-reduces (MAX) `[batch failed here, stop signal received here]`: all agree whether the batch
   failed and whether to drain. A failed batch gathers every rank's error for the answer (500); a good one is
   answered with rank 0's images.

A collective that fails (a rank died: gloo sees the closed connection at once; a rank is stuck: the collective
timeout) cannot be recovered from, since the ranks are no longer in step: rank 0 answers everything in flight and
queued with 503 and every rank raises [`FatalServeError`].

Replicas (`--dp-degree`) slot in above this loop: each replica would run it over its own SP group, with its leader
taking batches from rank 0's queue; only one replica (the whole world) exists today.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.utils import logging

from ..distributed import check_same_across_ranks, collective_timeout, is_collective_failure
from .batching import Batch, RequestQueue
from .metrics import ServeMetrics
from .model import ServedModel, pipeline_call, split_images, transformer_calls
from .protocol import APIError, WorkItem
from .state import BROKEN, DRAINING, ServiceState


logger = logging.get_logger(__name__)

# Heartbeat: at most this often when idle, and well inside the collective timeout.
MAX_HEARTBEAT_S = 1.0
HEARTBEATS_PER_TIMEOUT = 8
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


@dataclass
class _Outcome:
    images: list[list[Any]] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _root_collective_error(error: BaseException) -> str:
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


def _is_fatal(error: BaseException) -> bool:
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
    r"""The collectives of the rank protocol over the world (no-ops in a single process)."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        backend = str(dist.get_backend()) if self.active else ""
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.timeout = collective_timeout() if self.active else None

    def broadcast(self, command: Any) -> Any:
        if not self.active:
            return command
        holder = [command]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def agree(self, failed: bool, stop: bool) -> tuple[bool, bool]:
        """`(failed on any rank, stop asked on any rank)`: one all-reduce, the same answer on every rank."""
        if not self.active:
            return failed, stop
        flags = torch.tensor([int(failed), int(stop)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # (2,) per rank -> (2,) elementwise max
        return bool(flags[0].item()), bool(flags[1].item())

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


class Engine:
    r"""
    Runs the rank loop on this rank (see the module docstring). Construct it on every rank after the pipeline is
    loaded, from the thread that will call [`run`]; the construction checks that every rank serves the same thing.

    Args:
        served ([`ServedModel`]): the loaded pipeline.
        queue ([`RequestQueue`]): rank 0's request queue (other ranks never touch theirs).
        state ([`ServiceState`]): the status shown by `/health`; its `stop_signals` start a drain.
        metrics ([`ServeMetrics`]): updated on rank 0.
        fingerprint (`dict`): what every rank must agree on (model, parallelism, TeaCache), checked collectively.
    """

    def __init__(
        self,
        served: ServedModel,
        queue: RequestQueue,
        state: ServiceState,
        metrics: ServeMetrics,
        fingerprint: dict[str, Any],
    ) -> None:
        self.served = served
        self.queue = queue
        self.state = state
        self.metrics = metrics
        self.group = RankGroup()
        timeout = self.group.timeout
        self.heartbeat_s = MAX_HEARTBEAT_S
        if timeout is not None:
            self.heartbeat_s = min(MAX_HEARTBEAT_S, timeout / HEARTBEATS_PER_TIMEOUT)
        self._batch: Batch | None = None
        # Raises the same ValueError on every rank if a rank was started with other flags or another model.
        check_same_across_ranks(fingerprint, what="start `serve` with the same model and flags")

    @property
    def is_leader(self) -> bool:
        return self.group.rank == 0

    def __repr__(self) -> str:
        return (f"Engine(rank={self.group.rank}/{self.group.world_size}, {self.served!r}, "
                f"heartbeat_s={self.heartbeat_s:g})")

    def run(self) -> None:
        r"""Serve until drained (returns on every rank) or until the group fails ([`FatalServeError`] on every rank)."""
        try:
            self._lead() if self.is_leader else self._follow()
        except BaseException as error:  # noqa: BLE001 - every way out of the loop but a drain is fatal
            reason = self._fatal_reason(error)
            if self.is_leader:
                self._fail_everything(reason)
            raise FatalServeError(reason) from error

    # ------------------------------------------------------------------------------------------------ rank 0

    def _lead(self) -> None:
        draining = False
        while True:
            if self.state.stop_signals and not draining:
                draining = True
                self.state.set(DRAINING, "shutting down: finishing the requests already accepted")
                self.queue.close(APIError(503, "The server is shutting down and takes no new requests.",
                                          code="service_unavailable"))
                logger.warning(f"Stop signal: draining {len(self.queue)} queued request(s), then exiting.")
            batch = self.queue.next_batch(self.heartbeat_s)
            if batch is not None:
                command: Any = RunBatch(batch.items)
            elif draining and len(self.queue) == 0:
                command = Stop("drained")
            else:
                command = Idle()
            self._batch = batch  # answered with 503 if the group fails from here on
            self.group.broadcast(command)
            if isinstance(command, Stop):
                return
            outcome = self._execute(command)
            failed, stop = self.group.agree(outcome.error is not None, self.state.stop_signals > 0)
            if stop and not self.state.stop_signals:  # another rank got the signal
                self.state.stop_signals = 1
            if batch is not None:
                self._answer(batch, outcome, failed)
            self._batch = None

    def _answer(self, batch: Batch, outcome: _Outcome, failed: bool) -> None:
        self.metrics.batch_size.observe(batch.num_images)
        self.metrics.batch_seconds.observe(outcome.seconds)
        self.queue.record_batch_seconds(outcome.seconds)
        if failed:
            errors = self.group.gather(None if outcome.error is None else _describe(outcome.error))
            where = [f"rank {rank}: {text}" for rank, text in enumerate(errors) if text is not None]
            shown = where[0] if self.group.active else where[0].split(": ", 1)[1]
            logger.error(
                f"A batch of {len(batch.entries)} request(s) failed ({'; '.join(where)}); the service goes on."
            )
            self.metrics.batches.inc(outcome="failed")
            batch.fail(APIError(500, f"Generating the image failed: {shown}", code="generation_failed"))
            return
        computed, skipped = transformer_calls(self.served, batch.items)
        self.metrics.transformer_calls.inc(computed, result="computed")
        self.metrics.transformer_calls.inc(skipped, result="skipped")
        self.metrics.batches.inc(outcome="ok")
        self.metrics.images.inc(batch.num_images)
        for entry, images in zip(batch.entries, outcome.images):
            entry.future.set_result(images)

    def _fail_everything(self, reason: str) -> None:
        error = APIError(503, f"The service is unavailable: {reason}", code="service_unavailable")
        self.state.set(BROKEN, reason)
        if self._batch is not None:
            self._batch.fail(error)
        self.queue.fail_all(error)

    # ------------------------------------------------------------------------------------------------ other ranks

    def _follow(self) -> None:
        while True:
            command = self.group.broadcast(None)
            if isinstance(command, Stop):
                return
            outcome = self._execute(command)
            failed, _ = self.group.agree(outcome.error is not None, self.state.stop_signals > 0)
            if isinstance(command, RunBatch):
                if failed:
                    self.group.gather(None if outcome.error is None else _describe(outcome.error))
                else:
                    transformer_calls(self.served, command.items)  # a collective under CFG parallel + TeaCache

    # ------------------------------------------------------------------------------------------------ every rank

    def _execute(self, command: Any) -> _Outcome:
        if not isinstance(command, RunBatch):
            return _Outcome()
        start = time.monotonic()
        if self._batch is not None:
            for entry in self._batch.entries:
                self.metrics.queue_wait.observe(start - entry.enqueued_at)
        try:
            output = self.served.pipe(**pipeline_call(command.items))
            images = split_images(command.items, list(output.images))
        except BaseException as error:  # noqa: BLE001 - sorted below
            if _is_fatal(error):
                raise
            logger.debug("The batch raised.", exc_info=True)
            return _Outcome(error=error, seconds=time.monotonic() - start)
        return _Outcome(images=images, seconds=time.monotonic() - start)

    def _fatal_reason(self, error: BaseException) -> str:
        where = f"rank {self.group.rank} of {self.group.world_size}"
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return f"{where} was interrupted (a second stop signal)"
        if _is_fatal(error):
            limit = "" if self.group.timeout is None else f" within the collective timeout of {self.group.timeout:g} s"
            return (
                f"{where} lost the process group ({_root_collective_error(error)}): another rank died, was killed or "
                f"did not answer{limit}. The ranks are out of step, so the service stops; restart it."
            )
        return f"{where} failed outside a batch ({_describe(error)}); the service stops."


__all__ = ["Engine", "FatalServeError", "Idle", "RankGroup", "RunBatch", "Stop"]

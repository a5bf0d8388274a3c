"""The rank loop: rank 0 hands work to the replicas, every rank of a replica runs the pipeline, the results come back
to rank 0.

The world is `dp x cfg x ring x ulysses`: `dp_degree` replicas of contiguous ranks, each an independent copy of the
model with its own SP/CFG groups (see [`~diffusers_qwen_sp.distributed.ParallelGroups`]). Rank 0 holds the HTTP
server and the request queue and leads replica 0; every other replica has its own leader (its first rank).

Inside a replica, every collective of the service runs from one thread per rank, in the same order on every rank. A
round, over the replica's group, from its leader:

1. the leader broadcasts a command: run a batch (the validated [`WorkItem`]s, plain picklable values), idle (a
   heartbeat, sent when no work came within `heartbeat_s`, so that waiting ranks never reach the collective timeout
   and a dead rank is noticed even when no request comes), stop (drained: every rank returns) or abort (the service
   failed elsewhere: every rank raises [`FatalServeError`]);
2. for a batch, every rank calls the pipeline with the same arguments (the leader's noise and prompt embeddings are
   broadcast inside the call); an exception is caught and remembered;
3. every rank all-reduces (MAX) `[batch failed here, stop signal received here]`: all agree whether the batch
   failed and whether to drain. A failed batch gathers every rank's error for the answer (500); a good one is
   answered with the leader's images.

Rank 0 runs the rounds of replica 0 in its main thread; for every other replica a feeder thread on rank 0 takes a
batch from the shared queue whenever its replica is free (or an idle heartbeat), sends the command to that replica's
leader over a two-rank gloo group `[0, leader]` of its own, and receives a [`Report`] (the images or the error, the
transformer calls, the stop flag); while the batch runs, the leader sends a [`Progress`] heartbeat at most every
`heartbeat_s` (from the pipeline's step callback), so a long batch never reaches the collective timeout. Each group is
used by one thread on each rank: replica 0's and the pipeline's by rank 0's main thread, control group `d` by feeder
`d` on rank 0 and by the main thread of replica `d`'s leader. With `dp_degree == 1` there is no control group and
the replica is the world.

A collective that fails (a rank died: gloo sees the closed connection at once; a rank is stuck: the collective
timeout) cannot be recovered from, since the ranks are no longer in step: rank 0 answers everything in flight and
queued with 503, the other replicas are told to abort (or see rank 0 leave; replica 0's batch in flight stops at its
next step), and every rank raises [`FatalServeError`]. The messages and the groups they travel over are in `ranks`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from diffusers.utils import logging

from ..distributed import ParallelGroups, check_same_across_ranks, collective_timeout
from .batching import Batch, RequestQueue
from .metrics import ServeMetrics
from .model import ServedModel, run_batch, transformer_calls
from .protocol import APIError
from .ranks import (
    Abort,
    ControlLink,
    Fatal,
    FatalServeError,
    Idle,
    Progress,
    RankGroup,
    Report,
    RunBatch,
    Stop,
    describe_error,
    is_fatal,
    replica_layout,
    root_collective_error,
)
from .state import BROKEN, DRAINING, ServiceState

logger = logging.get_logger(__name__)

# Heartbeat: at most this often when idle, and well inside the collective timeout.
MAX_HEARTBEAT_S = 1.0
HEARTBEATS_PER_TIMEOUT = 8


@dataclass
class _Outcome:
    images: list[list[Any]] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


class Engine:
    r"""
    Runs the rank loop on this rank (see the module docstring). Construct it on every rank after the pipeline is
    loaded, from the thread that will call [`run`]; the construction checks that every rank serves the same thing and
    creates the control groups of the replicas (a collective over every rank).

    Args:
        served ([`ServedModel`]): the loaded pipeline.
        queue ([`RequestQueue`]): rank 0's request queue (other ranks never touch theirs).
        state ([`ServiceState`]): the status shown by `/health`; its `stopping` starts a drain.
        metrics ([`ServeMetrics`]): updated on rank 0.
        fingerprint (`dict`): what every rank must agree on (model, parallelism, TeaCache), checked collectively.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`], *optional*): the replica layout; default: the
            pipeline's sequence-parallel groups, or one replica over the world.
    """

    def __init__(
        self,
        served: ServedModel,
        queue: RequestQueue,
        state: ServiceState,
        metrics: ServeMetrics,
        fingerprint: dict[str, Any],
        groups: ParallelGroups | None = None,
    ) -> None:
        self.served = served
        self.queue = queue
        self.state = state
        self.metrics = metrics
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1
        self.layout = replica_layout(served, groups)
        self.group = RankGroup(self.layout.replica_group, self.layout.replica_ranks)
        self.timeout = collective_timeout() if self.world_size > 1 else None
        self.heartbeat_s = MAX_HEARTBEAT_S
        if self.timeout is not None:
            self.heartbeat_s = min(MAX_HEARTBEAT_S, self.timeout / HEARTBEATS_PER_TIMEOUT)
        # Raises the same ValueError on every rank if a rank was started with other flags or another model.
        check_same_across_ranks(fingerprint, what="start `serve` with the same model and flags")
        self.links: dict[int, ControlLink] = {}
        for replica in range(1, self.layout.dp_degree):  # every rank creates every group, in the same order
            leader = replica * self.layout.replica_size
            timeout = None if self.timeout is None else timedelta(seconds=self.timeout)
            group = dist.new_group([0, leader], timeout=timeout, backend="gloo")
            if self.rank in (0, leader):
                self.links[replica] = ControlLink(group, replica, leader, self.heartbeat_s)
        self._lock = threading.Lock()
        self._fatal: str | None = None
        self._in_flight: dict[int, Batch] = {}
        self._queue_closed = threading.Event()
        self._feeders: list[threading.Thread] = []
        self._aborted = False  # told to abort by rank 0 (which then no longer listens to this replica)

    @property
    def is_leader(self) -> bool:
        """Whether this is rank 0 (the HTTP server, the queue and replica 0)."""
        return self.rank == 0

    @property
    def is_replica_leader(self) -> bool:
        """Whether this rank leads its replica (rank 0 leads replica 0)."""
        return self.rank == self.group.source

    def __repr__(self) -> str:
        return (f"Engine(rank={self.rank}/{self.world_size}, replica={self.layout.dp_rank}/{self.layout.dp_degree} "
                f"ranks {self.group.ranks}, {self.served!r}, heartbeat_s={self.heartbeat_s:g})")

    def run(self) -> None:
        r"""Serve until drained (returns on every rank) or until a group fails ([`FatalServeError`] on every rank)."""
        try:
            if self.is_leader:
                self._lead()
            elif self.is_replica_leader:
                self._lead_remote()
            else:
                self._follow()
        except BaseException as error:  # noqa: BLE001 - every way out of the loop but a drain is fatal
            reason = self._fatal_reason(error)
            if self.is_leader:
                self._set_fatal(reason)  # answers everything with 503; the feeders abort their replicas
                for feeder in self._feeders:
                    feeder.join(2 * self.heartbeat_s + 1.0)
            elif self.is_replica_leader:
                link = self.links[self.layout.dp_rank]
                if not (link.broken or self._aborted):  # the replica failed; rank 0 waits for the report: say why
                    try:
                        link.send(Fatal(reason))
                    except BaseException:  # noqa: BLE001 - rank 0 sees this process leave instead
                        pass
            raise FatalServeError(reason) from error

    # ------------------------------------------------------------------------------------------------ rank 0

    def _lead(self) -> None:
        self._feeders = [
            threading.Thread(target=self._feed, args=(link,), name=f"serve-replica-{replica}", daemon=True)
            for replica, link in self.links.items()
        ]
        for feeder in self._feeders:
            feeder.start()
        draining = False
        while True:
            if self.state.stopping and not draining:
                draining = True
                self.state.set(DRAINING, "shutting down: finishing the requests already accepted")
                self.queue.close(APIError(503, "The server is shutting down and takes no new requests.",
                                          code="service_unavailable"))
                self._queue_closed.set()
                logger.warning(f"Stop signal: draining {len(self.queue)} queued request(s), then exiting.")
            batch = self.queue.next_batch(self.heartbeat_s)
            self._track(0, batch)  # answered with 503 if the service fails from here on
            if self._fatal is not None:  # a remote replica failed
                self._round(Abort(self._fatal))
            if batch is not None:
                command: Any = RunBatch(batch.items)
                self._started(batch)
            elif draining and len(self.queue) == 0 and not any(feeder.is_alive() for feeder in self._feeders):
                command = Stop("drained")
            else:
                busy = [feeder for feeder in self._feeders if feeder.is_alive()]
                if draining and batch is None and busy:  # the closed queue returns at once: wait for the replicas
                    busy[0].join(self.heartbeat_s)
                command = Idle()
            # With other replicas, one of them failing ends this batch at its next step (nothing to keep in step).
            report = self._round(command, on_step=self._stop_if_fatal if self.links else None)
            if report is None:
                return
            if report.stop:  # another rank got the signal: drain (a signal of ours would count as a second one)
                self.state.drain_requested.set()
            if batch is not None:
                self._answer(batch, report, replica=0)
            self._track(0, None)

    def _feed(self, link: ControlLink) -> None:
        """Feeder thread of a remote replica on rank 0: one batch (or heartbeat) at a time, over its control group."""
        try:
            while True:
                batch = self.queue.next_batch(self.heartbeat_s)
                self._track(link.replica, batch)
                if self._fatal is not None:
                    link.send(Abort(self._fatal))
                    return
                if batch is not None:
                    command: Any = RunBatch(batch.items)
                    self._started(batch)
                elif self._queue_closed.is_set() and len(self.queue) == 0:
                    command = Stop("drained")
                else:
                    command = Idle()
                link.send(command)
                if isinstance(command, Stop):
                    return
                message = link.receive()
                while isinstance(message, Progress):
                    if self._fatal is not None:  # the leader is mid-batch; it sees rank 0 leave
                        return
                    message = link.receive()
                if isinstance(message, Fatal):
                    self._set_fatal(message.reason)
                    return
                if message.stop:
                    self.state.drain_requested.set()
                if batch is not None:
                    self._answer(batch, message, replica=link.replica)
                self._track(link.replica, None)
        except BaseException as error:  # noqa: BLE001 - the replica is lost: the service stops
            if self._fatal is None:
                limit = "" if self.timeout is None else f" within the collective timeout of {self.timeout:g} s"
                self._set_fatal(
                    f"rank 0 of {self.world_size} lost the process group of replica {link.replica} (led by rank "
                    f"{link.leader}: {root_collective_error(error)}): another rank died, was killed or did not answer"
                    f"{limit}. The ranks are out of step, so the service stops; restart it."
                )

    def _stop_if_fatal(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """Replica 0's `callback_on_step_end`: raise once another replica failed the service."""
        if self._fatal is not None:
            raise FatalServeError(self._fatal)
        return {}

    def _track(self, replica: int, batch: Batch | None) -> None:
        """Remember the batch `replica` runs (answered with 503 if the service fails), or forget it."""
        with self._lock:
            if batch is None:
                self._in_flight.pop(replica, None)
            else:
                self._in_flight[replica] = batch
            fatal = self._fatal
        if batch is not None and fatal is not None:
            batch.fail(self._unavailable(fatal))

    def _started(self, batch: Batch) -> None:
        now = time.monotonic()
        for entry in batch.entries:
            self.metrics.queue_wait.observe(now - entry.enqueued_at)

    def _answer(self, batch: Batch, report: Report, replica: int) -> None:
        self.metrics.batch_size.observe(batch.num_images)
        self.metrics.batch_seconds.observe(report.seconds)
        self.queue.record_batch_seconds(report.seconds)
        outcome = "failed" if report.error is not None else "ok"
        self.metrics.replica_batches.inc(replica=str(replica), outcome=outcome)
        self.metrics.batches.inc(outcome=outcome)
        if report.error is not None:
            logger.error(
                f"A batch of {len(batch.entries)} request(s) failed on replica {replica} ({report.error_detail}); "
                "the service goes on."
            )
            batch.fail(APIError(500, f"Generating the image failed: {report.error}", code="generation_failed"))
            return
        self.metrics.transformer_calls.inc(report.computed, result="computed")
        self.metrics.transformer_calls.inc(report.skipped, result="skipped")
        self.metrics.images.inc(batch.num_images)
        for entry, images in zip(batch.entries, report.images):
            try:
                entry.future.set_result(images)
            except InvalidStateError:  # answered with 503 meanwhile: another replica failed the service
                pass

    @staticmethod
    def _unavailable(reason: str) -> APIError:
        return APIError(503, f"The service is unavailable: {reason}", code="service_unavailable")

    def _set_fatal(self, reason: str) -> None:
        """The service failed (the first reason is kept): answer everything in flight and queued with 503."""
        with self._lock:
            if self._fatal is None:
                self._fatal = reason
                logger.error(f"The service stops: {reason}")
            reason = self._fatal
            in_flight = list(self._in_flight.values())
        error = self._unavailable(reason)
        self.state.set(BROKEN, reason)
        for batch in in_flight:
            batch.fail(error)
        self.queue.fail_all(error)

    # ------------------------------------------------------------------------------------------------ leaders

    def _round(self, command: Any, on_step: Callable[..., dict] | None = None) -> Report | None:
        """One round of this rank's replica, from its leader; `None` after a stop, [`FatalServeError`] after abort."""
        self.group.broadcast(command)
        if isinstance(command, Stop):
            return None
        if isinstance(command, Abort):
            self._aborted = True
            raise FatalServeError(command.reason)
        outcome = self._execute(command, on_step)
        failed, stop = self.group.agree(outcome.error is not None, self.state.stopping)
        report = Report(seconds=outcome.seconds, stop=stop)
        if not isinstance(command, RunBatch):
            return report
        if failed:
            errors = self.group.gather(None if outcome.error is None else describe_error(outcome.error))
            where = [f"rank {rank}: {text}" for rank, text in zip(self.group.ranks, errors) if text is not None]
            report.error = where[0] if self.group.active else where[0].split(": ", 1)[1]
            report.error_detail = "; ".join(where)
        else:
            report.images = outcome.images
            report.computed, report.skipped = transformer_calls(self.served, command.items)
        return report

    def _lead_remote(self) -> None:
        link = self.links[self.layout.dp_rank]
        while True:
            try:
                command = link.receive()
            except BaseException as error:  # noqa: BLE001 - rank 0 is gone
                self._lost_rank_0(error)
            report = self._round(command, on_step=link.progress)
            if report is None:
                return
            try:
                link.send(report)
            except BaseException as error:  # noqa: BLE001 - rank 0 is gone
                self._lost_rank_0(error)

    def _lost_rank_0(self, error: BaseException) -> None:
        """Between rounds (the replica's ranks wait for a command): tell them to abort, then raise."""
        reason = self._fatal_reason(error)
        try:
            self.group.broadcast(Abort(reason))
        except BaseException:  # noqa: BLE001 - its ranks see this process leave instead
            pass
        raise FatalServeError(reason) from error

    # ------------------------------------------------------------------------------------------------ other ranks

    def _follow(self) -> None:
        while True:
            command = self.group.broadcast(None)
            if isinstance(command, Stop):
                return
            if isinstance(command, Abort):
                raise FatalServeError(command.reason)
            outcome = self._execute(command)
            failed, _ = self.group.agree(outcome.error is not None, self.state.stopping)
            if isinstance(command, RunBatch):
                if failed:
                    self.group.gather(None if outcome.error is None else describe_error(outcome.error))
                else:
                    transformer_calls(self.served, command.items)  # a collective under CFG parallel + TeaCache

    # ------------------------------------------------------------------------------------------------ every rank

    def _execute(self, command: Any, on_step: Callable[..., dict] | None = None) -> _Outcome:
        if not isinstance(command, RunBatch):
            return _Outcome()
        start = time.monotonic()
        try:
            images = run_batch(self.served, command.items, on_step)
        except BaseException as error:  # noqa: BLE001 - sorted below
            if is_fatal(error):
                raise
            logger.debug("The batch raised.", exc_info=True)
            return _Outcome(error=error, seconds=time.monotonic() - start)
        return _Outcome(images=images, seconds=time.monotonic() - start)

    def _fatal_reason(self, error: BaseException) -> str:
        where = f"rank {self.rank} of {self.world_size}"
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return f"{where} was interrupted (a second stop signal)"
        if isinstance(error, FatalServeError) and not error.__cause__:
            return str(error)  # an abort, or a remote replica's failure, already explained
        if is_fatal(error):
            limit = "" if self.timeout is None else f" within the collective timeout of {self.timeout:g} s"
            return (
                f"{where} lost the process group ({root_collective_error(error)}): another rank died, was killed or "
                f"did not answer{limit}. The ranks are out of step, so the service stops; restart it."
            )
        return f"{where} failed outside a batch ({describe_error(error)}); the service stops."


__all__ = [
    "Abort", "ControlLink", "Engine", "FatalServeError", "Idle", "Progress", "RankGroup", "Report", "RunBatch", "Stop",
]

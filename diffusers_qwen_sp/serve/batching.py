"""The bounded request queue between the HTTP thread and the engine, and the grouping of compatible requests.

The HTTP thread [`RequestQueue.submit`]s validated [`WorkItem`]s and awaits their futures; the engine thread takes
[`Batch`]es with [`RequestQueue.next_batch`]: the oldest request decides the batch's key (size, steps, guidance,
negative prompt, adapter), and compatible requests queued behind it join until the batch holds `max_batch_size`
images or `batch_wait_s` has passed since it was taken. Incompatible requests keep their place in the queue.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from .protocol import APIError, WorkItem


@dataclass(eq=False)
class Pending:
    r"""A queued request: its item, the future its HTTP handler awaits, and when it arrived."""

    item: WorkItem
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Batch:
    r"""Requests run by one pipeline call (all with the same [`WorkItem.key`])."""

    entries: list[Pending]
    taken_at: float = field(default_factory=time.monotonic)

    @property
    def items(self) -> list[WorkItem]:
        return [entry.item for entry in self.entries]

    @property
    def num_images(self) -> int:
        return sum(entry.item.n for entry in self.entries)

    def fail(self, error: BaseException) -> None:
        """Answer every request of the batch with `error` (those not answered yet; safe when two threads race)."""
        for entry in self.entries:
            with contextlib.suppress(InvalidStateError):  # answered between the check and the set
                if not entry.future.done():
                    entry.future.set_exception(error)


class RequestQueue:
    r"""
    A bounded FIFO of [`Pending`] requests shared by the HTTP thread (producer) and the engine thread (consumer).

    Args:
        max_queue (`int`): requests that may wait; [`submit`] raises 429 beyond it.
        max_batch_size (`int`): most images in one [`Batch`] (a request with more images runs alone).
        batch_wait_s (`float`): how long a batch waits for compatible requests once its first one is taken.
    """

    def __init__(self, max_queue: int, max_batch_size: int, batch_wait_s: float) -> None:
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._entries: deque[Pending] = deque()
        self._condition = threading.Condition()
        self._closed: APIError | None = None
        self._batch_seconds: float | None = None  # moving average, for Retry-After

    def __len__(self) -> int:
        with self._condition:
            return len(self._entries)

    def __repr__(self) -> str:
        return (f"RequestQueue(depth={len(self)}/{self.max_queue}, max_batch_size={self.max_batch_size}, "
                f"batch_wait_s={self.batch_wait_s:g})")

    def submit(self, item: WorkItem, refuse: APIError | None = None) -> Pending:
        r"""
        Queue `item`; raises `refuse` if given (the service is not taking work), the queue's closing error once
        [`close`]d, or a 429 [`APIError`] with `Retry-After` when `max_queue` requests wait already.
        """
        with self._condition:
            if refuse is not None:
                raise refuse
            if self._closed is not None:
                raise self._closed
            if len(self._entries) >= self.max_queue:
                raise APIError(
                    429,
                    f"The queue is full ({self.max_queue} requests waiting, --max-queue); retry later.",
                    code="queue_full", error_type="rate_limit_error",
                    headers={"Retry-After": str(self._retry_after_locked())},
                )
            pending = Pending(item)
            self._entries.append(pending)
            self._condition.notify_all()
            return pending

    def _retry_after_locked(self) -> int:
        per_batch = self._batch_seconds if self._batch_seconds is not None else 1.0
        batches_ahead = math.ceil(len(self._entries) / self.max_batch_size)
        return max(1, math.ceil(per_batch * batches_ahead))

    def record_batch_seconds(self, seconds: float) -> None:
        """Feed the duration of a batch into the estimate behind `Retry-After`."""
        with self._condition:
            previous = self._batch_seconds
            self._batch_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def close(self, error: APIError) -> None:
        """Refuse new requests with `error` from now on; what is queued stays to be taken (drain) or failed."""
        with self._condition:
            if self._closed is None:
                self._closed = error
            self._condition.notify_all()

    def fail_all(self, error: BaseException) -> int:
        """Close the queue and answer every waiting request with `error`; returns how many were answered."""
        with self._condition:
            if self._closed is None:
                self._closed = error if isinstance(error, APIError) else APIError(503, str(error))
            entries = list(self._entries)
            self._entries.clear()
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
        return len(entries)

    def next_batch(self, timeout: float) -> Batch | None:
        r"""
        The next batch, or `None` when no request arrived within `timeout` seconds (or the queue is closed and
        empty). Waits up to `batch_wait_s` for compatible requests when the batch is not full.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while not self._entries:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed is not None:
                    return None
                self._condition.wait(remaining)
            first = self._entries.popleft()
            batch = Batch([first])
            fill_until = time.monotonic() + self.batch_wait_s
            while True:
                self._take_compatible_locked(batch)
                remaining = fill_until - time.monotonic()
                if batch.num_images >= self.max_batch_size or remaining <= 0 or self._closed is not None:
                    return batch
                self._condition.wait(remaining)

    def _take_compatible_locked(self, batch: Batch) -> None:
        key = batch.entries[0].item.key
        kept: deque[Pending] = deque()
        while self._entries:
            entry = self._entries.popleft()
            if entry.item.key == key and batch.num_images + entry.item.n <= self.max_batch_size:
                batch.entries.append(entry)
            else:
                kept.append(entry)
        self._entries = kept


__all__ = ["Batch", "Pending", "RequestQueue"]

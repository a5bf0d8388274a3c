"""Prometheus metrics of the service, rendered in the text exposition format (no client library needed).

[`ServeMetrics`] holds every metric the service exports; counters and histograms are updated from the HTTP thread
and the engine thread (one lock), gauges that mirror live state (queue depth, status) are read when `/metrics` is
rendered.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any


PREFIX = "diffusers_qwen_sp_"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...], lock: threading.Lock) -> None:
        self.name = PREFIX + name
        self.help_text = help_text
        self.label_names = label_names
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}.")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, key)} {_number(v)}" for key, v in items]


class Gauge(_Metric):
    r"""A gauge whose value is read from `read()` when rendered: `[(labels, value), ...]`."""

    kind = "gauge"

    def __init__(self, *args: Any, read: Callable[[], Iterable[tuple[dict[str, str], float]]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read = read

    def render(self) -> list[str]:
        lines = self.header()
        for labels, value in self._read():
            lines.append(f"{self.name}{_labels(self.label_names, self._key(labels))} {_number(value)}")
        return lines


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args: Any, buckets: tuple[float, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buckets = tuple(buckets) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count
        if not self.label_names:  # exported from the start, zeros included
            self._series[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            series[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is >= value
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> float:
        with self._lock:
            series = self._series.get(self._key(labels))
            return series[-1] if series else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        lines = self.header()
        for key, series in items:
            cumulative = 0.0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


class ServeMetrics:
    r"""
    Every metric of the service (names prefixed `diffusers_qwen_sp_`):

    - `requests_total{endpoint, outcome}`: answered requests; outcome `ok`, `bad_request`, `unauthorized`,
      `too_large`, `queue_full`, `failed` (500), `unavailable` (503), `not_found`.
    - `queue_depth`, `queue_capacity`, `status{status}` (1 for the current one of loading, ready, draining, broken).
    - `batch_size` (images per pipeline call), `batches_total{outcome}`, `batch_seconds`.
    - `replica_batches_total{replica, outcome}`: pipeline calls per data-parallel replica (`--dp-degree`; replica `0`
      is rank 0's).
    - `request_latency_seconds{endpoint}` (arrival to answer), `queue_wait_seconds` (arrival to start of its batch).
    - `images_total`: images generated.
    - `transformer_calls_total{result}`: transformer forwards `computed`, or `skipped` by TeaCache.
    """

    def __init__(self, queue_depth: Callable[[], int], queue_capacity: int, status: Callable[[], str]) -> None:
        lock = threading.Lock()
        self.requests = Counter("requests_total", "Answered HTTP requests.", ("endpoint", "outcome"), lock)
        self.batch_size = Histogram("batch_size", "Images per pipeline call.", (), lock, buckets=BATCH_SIZE_BUCKETS)
        self.batches = Counter("batches_total", "Pipeline calls by outcome.", ("outcome",), lock)
        self.replica_batches = Counter("replica_batches_total", "Pipeline calls by data-parallel replica and outcome.",
                                       ("replica", "outcome"), lock)
        self.batch_seconds = Histogram("batch_seconds", "Duration of a pipeline call.", (), lock,
                                       buckets=LATENCY_BUCKETS)
        self.latency = Histogram("request_latency_seconds", "From a request's arrival to its answer.",
                                 ("endpoint",), lock, buckets=LATENCY_BUCKETS)
        self.queue_wait = Histogram("queue_wait_seconds", "From a request's arrival to the start of its batch.", (),
                                    lock, buckets=LATENCY_BUCKETS)
        self.images = Counter("images_total", "Images generated.", (), lock)
        self.transformer_calls = Counter(
            "transformer_calls_total", "Transformer forwards: computed, or skipped by TeaCache.", ("result",), lock
        )
        statuses = ("loading", "ready", "draining", "broken")
        self._gauges = [
            Gauge("queue_depth", "Requests waiting to run.", (), lock, read=lambda: [({}, queue_depth())]),
            Gauge("queue_capacity", "Most requests that may wait (--max-queue).", (), lock,
                  read=lambda: [({}, queue_capacity)]),
            Gauge("status", "1 for the service's current status.", ("status",), lock,
                  read=lambda: [({"status": s}, float(status() == s)) for s in statuses]),
        ]
        # Both results always appear, so a dashboard sees 0 skipped rather than no series.
        for result in ("computed", "skipped"):
            self.transformer_calls.inc(0, result=result)
        self.images.inc(0)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for metric in (self.requests, *self._gauges, self.batch_size, self.batches, self.replica_batches,
                       self.batch_seconds, self.latency, self.queue_wait, self.images, self.transformer_calls):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


__all__ = ["Counter", "Gauge", "Histogram", "ServeMetrics"]

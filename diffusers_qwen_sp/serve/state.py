"""[`ServiceState`]: the service's status, shared by the HTTP thread (which reads it) and the engine (which sets it).

`loading -> ready -> draining` (a stop signal: finish what was accepted, refuse the rest) or `-> broken` (a rank died,
got stuck or the process group failed: answer 503 and exit non-zero). A stop signal only bumps a counter, which is
safe from a signal handler; the engine turns it into `draining` on its next round, and the HTTP thread refuses new
work as soon as it sees it.
"""

from __future__ import annotations

import threading

from .protocol import APIError


LOADING, READY, DRAINING, BROKEN = "loading", "ready", "draining", "broken"


class ServiceState:
    r"""The service's status and the reason for it; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = LOADING
        self._reason = "loading the model"
        self.stop_signals = 0
        """Stop signals this process received (SIGTERM, SIGINT); written by signal handlers, read by every thread. A
        second one stops at once, so only this process's own signals count here."""
        self.drain_requested = threading.Event()
        """Set when another rank reported a stop signal: drain as for one signal of our own (never a second)."""

    @property
    def stopping(self) -> bool:
        """Whether a drain was asked for, by a signal to this process or by another rank."""
        return self.stop_signals > 0 or self.drain_requested.is_set()

    @property
    def status(self) -> str:
        with self._lock:
            status = self._status
        if status in (LOADING, READY) and self.stopping:
            return DRAINING
        return status

    @property
    def reason(self) -> str:
        with self._lock:
            if self._status in (LOADING, READY) and self.stopping:
                return "shutting down: finishing the requests already accepted"
            return self._reason

    def set(self, status: str, reason: str) -> None:
        with self._lock:
            if self._status == BROKEN:  # final
                return
            self._status = status
            self._reason = reason

    def refusal(self) -> APIError | None:
        r"""The 503 to answer a new request with, or `None` when the service takes work."""
        status = self.status
        if status == READY:
            return None
        messages = {
            LOADING: "The model is still loading; retry shortly.",
            DRAINING: "The server is shutting down and takes no new requests.",
            BROKEN: f"The service is unavailable: {self.reason}",
        }
        return APIError(503, messages[status], code="service_unavailable",
                        headers={"Retry-After": "5"} if status == LOADING else None)

    def __repr__(self) -> str:
        return f"ServiceState({self.status}: {self.reason})"


__all__ = ["BROKEN", "DRAINING", "LOADING", "READY", "ServiceState"]

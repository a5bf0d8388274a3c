"""[`Service`]: one process of the image service. Rank 0 runs the HTTP server in a thread and the engine in the
calling thread; every other rank runs the engine only. The whole group loads the model once, in parallel.

Threads of rank 0: the calling (normally main) thread loads the pipeline, then runs the [`Engine`] loop, which issues
every collective of replica 0 and its pipeline calls; with `--dp-degree N`, one `serve-replica-D` thread per other
replica hands it batches over its own control group; the `serve-http` thread runs uvicorn (its own event loop) and
only queues validated work and waits for results. Stop signals (SIGTERM, SIGINT) are handled in the main thread by
bumping a counter: the first drains (finish what was accepted, refuse the rest with 503, exit 0), a second stops at
once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.utils import logging

from .batching import RequestQueue
from .config import ServeConfig
from .engine import Engine, FatalServeError
from .metrics import ServeMetrics
from .model import ServedModel
from .state import BROKEN, READY, ServiceState


logger = logging.get_logger(__name__)

# How long uvicorn may take to start listening, and to finish the responses in flight when stopping.
_HTTP_START_S = 30.0
_HTTP_STOP_S = 10.0


class HttpThread:
    r"""uvicorn serving `app` on `host:port` from a daemon thread (it installs no signal handlers there)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=int(_HTTP_STOP_S), lifespan="off")
        self.server = uvicorn.Server(config)
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="serve-http", daemon=True)
        self.url: str | None = None

    def start(self) -> str:
        """Start listening; returns the base URL (with the real port when `port` was 0)."""
        self._thread.start()
        deadline = time.monotonic() + _HTTP_START_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Could not listen on {self.host}:{self.server.config.port} (address in use, or not an address of "
                    "this machine?); choose another --port or --host. uvicorn's log above says why."
                )
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        """Stop accepting connections, let the responses in flight finish, and join the thread."""
        self.server.should_exit = True
        self._thread.join(_HTTP_STOP_S + 5.0)


class Service:
    r"""
    The image service on this rank. [`run`] blocks until the service drained (returns) or failed (raises).

    Args:
        config ([`ServeConfig`]): what to serve and how.
        load (`Callable[[ServeConfig], ServedModel]`): loads the pipeline on this rank (initialising
            torch.distributed and enabling SP, CFG parallel and TeaCache as configured); run on every rank.
        on_listening (`Callable[[str], None]`, *optional*): called on rank 0 with the base URL once the HTTP server
            listens (the model is still loading then; `/health` says when it is ready).
        on_ready (`Callable[[ServedModel], None]`, *optional*): called on rank 0 once the service takes requests.

    Example:

    ```py
    >>> service = Service(ServeConfig(port=0), load=my_loader, on_listening=print)
    >>> threading.Thread(target=service.run).start()  # a test; the CLI runs it in the main thread
    >>> service.request_stop()  # as SIGTERM: drain, then run() returns
    ```
    """

    def __init__(
        self,
        config: ServeConfig,
        load: Callable[[ServeConfig], ServedModel],
        on_listening: Callable[[str], None] | None = None,
        on_ready: Callable[[ServedModel], None] | None = None,
    ) -> None:
        self.config = config
        self.load = load
        self.on_listening = on_listening
        self.on_ready = on_ready
        self.rank = int(os.environ.get("RANK", "0"))
        self.state = ServiceState()
        self.queue = RequestQueue(config.max_queue, config.effective_max_batch_size, config.batch_wait_ms / 1000)
        self.metrics = ServeMetrics(lambda: len(self.queue), config.max_queue, lambda: self.state.status)
        self.served: ServedModel | None = None
        self.http: HttpThread | None = None
        self.engine: Engine | None = None

    def __repr__(self) -> str:
        return f"Service(rank={self.rank}, {self.state!r}, {self.config!r})"

    @property
    def url(self) -> str | None:
        return None if self.http is None else self.http.url

    def request_stop(self) -> None:
        """What SIGTERM does: the first call drains and ends [`run`]; a second one (by a signal) stops at once."""
        self.state.stop_signals += 1

    def run(self) -> None:
        r"""Listen (rank 0), load the model (every rank), serve until drained. Raises [`FatalServeError`] when a rank
        fails, after answering what was in flight with 503."""
        from .app import build_app

        if self.rank == 0:
            warning = self.config.exposure_warning()
            if warning is not None:
                logger.warning(warning)
            app = build_app(self.config, self.queue, self.state, self.metrics, lambda: self.served)
            self.http = HttpThread(app, self.config.host, self.config.port)
            url = self.http.start()
            if self.on_listening is not None:
                self.on_listening(url)
        try:
            self.served = self.load(self.config)
            self.engine = Engine(self.served, self.queue, self.state, self.metrics, self._fingerprint())
            self.state.set(READY, "ready")
            if self.rank == 0 and self.on_ready is not None:
                self.on_ready(self.served)
            self.engine.run()
        except BaseException as error:
            reason = str(error) if isinstance(error, FatalServeError) else f"{type(error).__name__}: {error}"
            self.state.set(BROKEN, reason)
            self.queue.fail_all(self.state.refusal())
            if self.http is not None:
                time.sleep(self.config.broken_grace_s)  # health checks and in-flight requests see the 503
            raise
        finally:
            if self.http is not None:
                self.http.stop()

    def _fingerprint(self) -> dict[str, Any]:
        """What every rank must agree on before serving (checked collectively by the engine)."""
        config = self.config
        return {
            "model": config.model,
            "ulysses_degree": config.ulysses_degree,
            "ring_degree": config.ring_degree,
            "cfg_parallel": config.cfg_parallel,
            "dp_degree": config.dp_degree,
            "teacache": config.teacache,
            "dtype": config.dtype,
            # each changes the sequence of collectives (or, for a missing adapter, raises on one rank only)
            "shard_weights": config.shard_weights,
            "text_encoder": config.text_encoder,
            "parallel_vae": config.parallel_vae,
            "attention_backend": config.attention_backend,
            "loras": config.loras,
            "pipeline": type(self.served.pipe).__name__ if self.served is not None else None,
        }


@contextmanager
def stop_signals_drain(service: Service) -> Iterator[None]:
    r"""
    While inside, SIGTERM and SIGINT drain `service` (the first) or stop it at once (a second: `KeyboardInterrupt`).
    Only from the main thread (elsewhere signals cannot be handled, and nothing is installed).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        # Signal-safe: bump a counter (no locks, no logging); the engine acts on it within a heartbeat.
        service.request_stop()
        if service.state.stop_signals > 1:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_service(
    config: ServeConfig,
    load: Callable[[ServeConfig], ServedModel],
    on_listening: Callable[[str], None] | None = None,
    on_ready: Callable[[ServedModel], None] | None = None,
) -> None:
    r"""
    Run the image service on this rank until it drained (after SIGTERM / SIGINT: returns) or a rank failed
    ([`FatalServeError`]). Call it on every rank of the group (`torchrun ... -m diffusers_qwen_sp serve` does).

    Args:
        config ([`ServeConfig`]): what to serve and how.
        load (`Callable[[ServeConfig], ServedModel]`): loads the pipeline on this rank.
        on_listening (`Callable[[str], None]`, *optional*): called on rank 0 with the base URL.
        on_ready (`Callable[[ServedModel], None]`, *optional*): called on rank 0 once requests are taken.
    """
    service = Service(config, load, on_listening, on_ready)
    with stop_signals_drain(service):
        service.run()


__all__ = ["HttpThread", "Service", "run_service", "stop_signals_drain"]

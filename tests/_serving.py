"""What the serve tests share: decoding answers, a bounded wait, the OpenAI client, and watching a service break."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import openai
from PIL import Image


def pixels(b64: str) -> np.ndarray:
    """A `b64_json` answer as `(H, W, 3)` int16 RGB (differences never wrap)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def client(url: str, key: str = "none") -> openai.OpenAI:
    """The official client on `url`, with no retries (a test sees every answer) and a bound on every request."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll `condition` until it holds; an `AssertionError` naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.02)


def wait_until_health_is_broken(url: str, within: float) -> list[tuple[int, str]]:
    """Poll `/health` until it answers 503 (or the server is gone); the `(status code, status)` pairs it answered."""
    statuses: list[tuple[int, str]] = []

    def broken() -> bool:
        try:
            response = httpx.get(f"{url}/health", timeout=2)
        except httpx.HTTPError:
            return True  # already gone: the caller's assertion on the statuses tells
        statuses.append((response.status_code, response.json()["status"]))
        return response.status_code == 503

    wait_for(broken, within, "health to turn 503")
    return statuses


class ServingWorld:
    r"""
    `run_distributed(serve_rank, world_size, folder)` in a thread of the test: the ranks of one service, rank 0
    listening. `serve_rank(rank, world_size, folder)` must write `rank{N}.pid` and, on rank 0, the base URL into
    `folder/url`. The constructor returns once every rank loaded the model (`/health` answers 200).
    """

    def __init__(self, serve_rank: Callable[..., str], folder: Path, world_size: int = 2, timeout: float = 150,
                 collective_timeout: float = 10.0) -> None:
        from diffusers_qwen_sp.distributed import run_distributed

        self.folder = folder
        self.world_size = world_size
        self.results: list | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.results = run_distributed(serve_rank, world_size, str(folder), timeout=timeout,
                                               collective_timeout=collective_timeout, return_exceptions=True)
            except BaseException as error:  # noqa: BLE001 - asserted by the tests
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        wait_for(lambda: (folder / "url").exists() or not self.thread.is_alive(), 60, "rank 0 to listen")
        assert (folder / "url").exists(), (self.error, self.results)
        self.url = (folder / "url").read_text()
        wait_for(lambda: httpx.get(f"{self.url}/health").status_code == 200 or not self.thread.is_alive(), 60,
                 "every rank to load the model")
        assert self.thread.is_alive(), (self.error, self.results)

    def pid(self, rank: int) -> int:
        return int((self.folder / f"rank{rank}.pid").read_text())

    def finish(self, within: float) -> list:
        """Wait for every rank to return; their results (an exception for a rank that raised)."""
        self.thread.join(within)
        assert not self.thread.is_alive(), f"the ranks did not exit within {within} s"
        assert self.error is None, self.error
        return self.results

    def kill_all(self) -> None:
        for rank in range(self.world_size):
            try:
                os.kill(self.pid(rank), signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass

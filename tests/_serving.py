"""What the serve tests share: decoding answers, a bounded wait, the OpenAI client, and watching a service break."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

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

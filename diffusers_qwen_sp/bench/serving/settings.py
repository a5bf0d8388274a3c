"""The options of a `bench-serve` run ([`ServeBenchSettings`]), its presets, and the server configurations it starts
([`ServerSpec`])."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Where `bench-serve` writes by default: `benchmarks/results/<device>/serve.*`, beside `bench` and `doctor` results.
RESULTS_ROOT = Path("benchmarks") / "results"
# The files of a run, by kind.
OUTPUT_NAMES = {"json": "serve.json", "markdown": "serve.md", "plot": "serve.png"}

# The three targets of the benchmark: (what, bar). Ratios are computed from rows of the same run.
TARGETS: dict[str, dict[str, Any]] = {
    "batching_speedup": dict(bar=2.0, op=">=", what="images/s with batching over without, at the highest concurrency"),
    "server_overhead": dict(bar=0.10, op="<=", what="p50 latency of the server at concurrency 1 over the in-process "
                            "pipeline call, minus 1"),
    "dp_speedup": dict(bar=1.6, op=">=", what="images/s of two replicas (dp 2) over one, at the highest concurrency"),
}


@dataclass(frozen=True)
class ServerSpec:
    r"""
    One server configuration of the benchmark: batching on or off, and how many replicas.

    Args:
        dp (`int`): data-parallel replicas (`--dp-degree`); above 1 the service starts under torchrun with that many
            processes.
        max_batch_size (`int`): `--max-batch-size` (1: batching off).
        batch_wait_ms (`float`): `--batch-wait-ms`.
    """

    dp: int
    max_batch_size: int
    batch_wait_ms: float

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def key(self) -> str:
        return f"{'batch' if self.batching else 'nobatch'}-dp{self.dp}"

    @property
    def name(self) -> str:
        batching = (f"batching {self.max_batch_size} / {self.batch_wait_ms:g} ms" if self.batching
                    else "no batching")
        return f"server, {batching}, dp {self.dp}"

    def serve_flags(self) -> list[str]:
        r"""The `serve` flags of this configuration."""
        flags = ["--max-batch-size", str(self.max_batch_size), "--batch-wait-ms", f"{self.batch_wait_ms:g}"]
        if self.dp > 1:
            flags += ["--dp-degree", str(self.dp)]
        return flags


@dataclass(frozen=True)
class ServeBenchSettings:
    r"""
    One `bench-serve` run.

    Args:
        model (`str`, *optional*): what `serve --model` and `generate --model` load; default: the scene model.
        concurrencies (`tuple[int, ...]`, defaults to `(1, 4, 16)`): clients sending at once (closed loop: each sends
            its next request when its previous one is answered). Must include 1 (the overhead target).
        requests (`tuple[int, ...]`, defaults to `(8, 16, 32)`): requests per concurrency and round.
        rounds (`int`, defaults to `3`): every round measures every configuration at every concurrency, in an order
            rotated per round, so a slow moment of the machine hits all configurations alike.
        dp_degrees (`tuple[int, ...]`, defaults to `(1, 2)`): replicas per configuration.
        batching (`tuple[bool, ...]`, defaults to `(True, False)`): batching on (`max_batch_size`) and / or off (1).
        max_batch_size (`int`, defaults to `16`), batch_wait_ms (`float`, defaults to `10.0`): the batching config.
        steps (`int`, *optional*), size (`int`, *optional*): `num_inference_steps` and `size` of every request (and of
            the in-process and `generate` baselines); default: the model's own (the scene model: 20 steps, 64x64).
        generate_runs (`int`, defaults to `1`): `generate` processes per round for the one-process-per-image
            baseline (0 skips it).
        threads (`int`, *optional*): `--threads` for the services and the baselines; default: each chooses (one
            thread for small models, see `diffusers_qwen_sp.threads`).
        warmup (`int`, defaults to `1`): warm-up rounds per server (at the highest concurrency) and calls in process.
        startup_timeout (`float`, defaults to `300`), request_timeout (`float`, defaults to `300`): seconds.
        output_dir (`str`, *optional*): default `benchmarks/results/<device>/`.
        preset (`str`, defaults to `"default"`): recorded in the report (`"quick"` for [`PRESETS`]' quick one).

    Example:

    ```py
    >>> settings = ServeBenchSettings(dp_degrees=(1,), concurrencies=(1, 8), requests=(8, 32))
    >>> [spec.name for spec in settings.servers]
    ['server, batching 16 / 10 ms, dp 1', 'server, no batching, dp 1']
    ```
    """

    model: str | None = None
    concurrencies: tuple[int, ...] = (1, 4, 16)
    requests: tuple[int, ...] = (8, 16, 32)
    rounds: int = 3
    dp_degrees: tuple[int, ...] = (1, 2)
    batching: tuple[bool, ...] = (True, False)
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    steps: int | None = None
    size: int | None = None
    generate_runs: int = 1
    threads: int | None = None
    warmup: int = 1
    startup_timeout: float = 300.0
    request_timeout: float = 300.0
    output_dir: str | None = None
    preset: str = "default"
    prompt_seed: int = field(default=1234, repr=False)

    def __post_init__(self) -> None:
        def positive_ints(name: str, values: Any) -> None:
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}.")

        positive_ints("concurrencies", self.concurrencies)
        positive_ints("requests", self.requests)
        positive_ints("dp_degrees", self.dp_degrees)
        if 1 not in self.concurrencies:
            raise ValueError(f"concurrencies must include 1 (the server-overhead target), got {self.concurrencies!r}.")
        if list(self.concurrencies) != sorted(set(self.concurrencies)):
            raise ValueError(f"concurrencies must be increasing without repeats, got {self.concurrencies!r}.")
        if len(self.requests) != len(self.concurrencies):
            raise ValueError(
                f"requests needs one count per concurrency {self.concurrencies!r}, got {self.requests!r}."
            )
        short = [(c, n) for c, n in zip(self.concurrencies, self.requests) if n < c]
        if short:
            raise ValueError(f"each concurrency needs at least as many requests as clients, got (clients, requests) "
                             f"{short}; raise --requests.")
        if not self.batching or len(set(self.batching)) != len(self.batching):
            raise ValueError(f"batching must be (True,), (False,) or (True, False), got {self.batching!r}.")
        for name in ("rounds", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if True in self.batching and self.max_batch_size < 2:
            raise ValueError(f"batching on needs max_batch_size >= 2, got {self.max_batch_size}.")
        for name in ("generate_runs", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        for name in ("steps", "size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (the model's default), got {value!r}.")
        for name in ("batch_wait_ms", "startup_timeout", "request_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")

    @property
    def servers(self) -> list[ServerSpec]:
        r"""The server configurations, batching on before off, one replica before two."""
        return [
            ServerSpec(dp=dp, max_batch_size=self.max_batch_size if on else 1,
                       batch_wait_ms=self.batch_wait_ms if on else 0.0)
            for on in sorted(self.batching, reverse=True)
            for dp in sorted(self.dp_degrees)
        ]

    @property
    def top_concurrency(self) -> int:
        return max(self.concurrencies)

    def request_body(self, prompt: str, seed: int) -> dict[str, Any]:
        r"""The JSON body of one request (one image, `b64_json`), and the fields the baselines get from it."""
        body: dict[str, Any] = {"prompt": prompt, "n": 1, "seed": seed, "response_format": "b64_json"}
        if self.size is not None:
            body["size"] = f"{self.size}x{self.size}"
        if self.steps is not None:
            body["num_inference_steps"] = self.steps
        return body


# `--quick`: what tests/test_bench_serve.py runs (seconds of measuring; most of the time is starting processes).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": dict(concurrencies=(1, 4), requests=(3, 8), rounds=1, dp_degrees=(1,), steps=4, generate_runs=1,
                  startup_timeout=120.0, request_timeout=120.0),
}


def device_slug(device: str, device_name: str) -> str:
    r"""The results folder of a device, as `doctor` names it: `"cpu"`, or the GPU's name (`"NVIDIA H200"` ->
    `"nvidia-h200"`)."""
    name = device_name if device == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


__all__ = ["OUTPUT_NAMES", "PRESETS", "RESULTS_ROOT", "TARGETS", "ServeBenchSettings", "ServerSpec", "device_slug"]

"""The load `bench-serve` applies: closed-loop HTTP clients ([`drive`]) and the same requests run as pipeline calls in
this process ([`InProcessPipeline`]), both returning a [`Measurement`]."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .settings import ServeBenchSettings


@dataclass
class Measurement:
    r"""
    One (configuration, concurrency, round): every request's latency and the wall-clock time of them all.

    Args:
        concurrency (`int`): clients sending at once.
        latencies_s (`list[float]`): seconds from sending to the full answer, per successful request.
        wall_s (`float`): from the first request sent to the last answer.
        images (`int`): images received.
        errors (`list[str]`): one line per failed request.
    """

    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    images: int = 0
    errors: list[str] = field(default_factory=list)
    batches: int | None = None
    """Pipeline calls the service made for these requests (from its `/metrics`; `None` where not known)."""
    cpu_s: float | None = None
    """CPU seconds the serving processes (or this process, in process) used meanwhile: other processes on the machine
    hardly inflate it."""
    client_cpu_s: float | None = None
    """CPU seconds the clients (this process) used meanwhile."""


class RequestPlan:
    r"""The requests of a run: scene-grammar prompts and seeds, the same sequence for every configuration."""

    def __init__(self, settings: ServeBenchSettings) -> None:
        from ...scenes.grammar import scene_prompts

        self.settings = settings
        self.prompts = scene_prompts(64, settings.prompt_seed)

    def body(self, index: int) -> dict[str, Any]:
        return self.settings.request_body(self.prompts[index % len(self.prompts)], seed=index)


def batches_so_far(url: str) -> int | None:
    r"""The pipeline calls (batches) a service has made so far, from the `batch_size` histogram of its `/metrics`."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("diffusers_qwen_sp_batch_size_count ")), None)
    return None if line is None else int(float(line.split()[-1]))


def drive(url: str, plan: RequestPlan, concurrency: int, count: int, timeout: float, start_index: int = 0
          ) -> Measurement:
    r"""
    Send `count` image requests to `url` from `concurrency` clients, each sending its next request when the previous
    one is answered (closed loop), and time every one; count the batches the service ran for them.
    """
    import httpx

    batches_before, client_cpu_before = batches_so_far(url), time.process_time()
    measurement = Measurement(concurrency)
    lock = threading.Lock()
    next_index = iter(range(start_index, start_index + count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def client_loop(client: httpx.Client) -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/images/generations", json=plan.body(index))
                elapsed = time.perf_counter() - start
                data = response.json().get("data") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as error:
                with lock:
                    measurement.errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                if data and all(item.get("b64_json") for item in data):
                    measurement.latencies_s.append(elapsed)
                    measurement.images += len(data)
                else:
                    measurement.errors.append(f"HTTP {response.status_code}: {response.text[:300]}")

    with httpx.Client(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-serve-client") as pool:
            for future in [pool.submit(client_loop, client) for _ in range(concurrency)]:
                future.result()
        measurement.wall_s = time.perf_counter() - started
    measurement.client_cpu_s = time.process_time() - client_cpu_before
    batches_after = batches_so_far(url)
    if batches_before is not None and batches_after is not None:
        measurement.batches = batches_after - batches_before
    return measurement


class InProcessPipeline:
    r"""
    The served pipeline loaded in this process by the service's own loader (`serve`'s device, dtype and CPU-thread
    choice), called with the arguments the service would pass for each request: the reference the server's overhead
    is measured against.
    """

    def __init__(self, settings: ServeBenchSettings) -> None:
        import torch

        from ...cli.serve import load_for_serving
        from ...serve import ServeConfig

        self.requested_threads = settings.threads
        self.served = load_for_serving(ServeConfig(model=settings.model, threads=settings.threads))
        self.threads = torch.get_num_threads()

    def run(self, plan: RequestPlan, count: int, start_index: int = 0) -> Measurement:
        r"""`count` requests one after the other (concurrency 1), each timed from its arguments to its images."""
        from ...serve.model import pipeline_call
        from ...serve.protocol import parse_request

        measurement = Measurement(1)
        started, cpu_before = time.perf_counter(), time.process_time()
        for index in range(start_index, start_index + count):
            start = time.perf_counter()
            item = parse_request(plan.body(index), self.served.limits, "generation")
            images = self.served.pipe(**pipeline_call([item])).images
            measurement.latencies_s.append(time.perf_counter() - start)
            measurement.images += len(images)
        measurement.wall_s = time.perf_counter() - started
        measurement.cpu_s = time.process_time() - cpu_before
        measurement.batches = count
        return measurement

    def expected_server_threads(self, processes_per_host: int) -> int:
        r"""The intra-op threads a `serve` process with `processes_per_host` local processes chooses (as
        `load_for_serving` does it), for the report."""
        from ...threads import choose_cpu_threads

        pipe, limits = self.served.pipe, self.served.limits
        if pipe.device.type != "cpu":
            return self.threads
        width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        tokens = (limits.default_size // limits.size_multiple) ** 2
        return choose_cpu_threads(image_tokens=tokens, width=width, requested=self.requested_threads,
                                  processes_per_host=processes_per_host).num_threads


__all__ = ["InProcessPipeline", "Measurement", "RequestPlan", "batches_so_far", "drive"]

"""[`run_serve_bench`]: start every service, measure them interleaved with the baselines, stop them, and
[`write_serve_outputs`] (`serve.json`, `serve.md`, `serve.png`)."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers.utils import logging

from ..instrumentation import cpu_name, rotated
from ..report import software_versions
from ..run import json_safe
from .load import InProcessPipeline, Measurement, RequestPlan, drive
from .plot import write_serve_plot
from .processes import ServerFailed, ServerProcess, time_generate
from .report import markdown_report, summarise, target_ratios
from .settings import OUTPUT_NAMES, RESULTS_ROOT, ServeBenchSettings, device_slug


logger = logging.get_logger(__name__)

IN_PROCESS, GENERATE = "in-process", "generate"
METHOD = (
    "Every service runs as its own process(es) (`python -m diffusers_qwen_sp serve --port 0`; dp 2 under torchrun, one "
    "process per replica), all started before measuring and stopped (SIGTERM, drained) at the end. Clients are closed "
    "loops (each sends its next request when its previous one is answered; httpx, one image per request, b64_json). "
    "Each round measures every configuration at every concurrency, the order rotated per round; the in-process call "
    "(the service's own loader and pipeline arguments, the same threads, in the benchmark's process) and one "
    "`generate` process per image (start-up, imports and model loading included) join the rotation at concurrency 1. "
    "images/s = images / summed wall-clock of the rounds; p50 and p95 over every request's latency (send to full "
    "answer). Each service first answers one untimed warm-up batch."
)


def _server_row(server: ServerProcess, threads: int) -> dict[str, Any]:
    spec = server.spec
    return dict(name=spec.name, key=spec.key, kind="server", dp=spec.dp, batching=spec.batching,
                max_batch_size=spec.max_batch_size, batch_wait_ms=spec.batch_wait_ms, processes=spec.dp,
                threads_per_process=threads, command=" ".join(server.command), status="ok", reason="", points=[])


def _generate_measurement(settings: ServeBenchSettings, plan: RequestPlan, start_index: int, folder: Path,
                          pipeline_s: list[float]) -> Measurement:
    measurement = Measurement(1)
    for index in range(start_index, start_index + settings.generate_runs):
        body = plan.body(index)
        timing = time_generate(settings, body["prompt"], body["seed"], folder / f"generate_{index}.png")
        measurement.latencies_s.append(timing["wall_s"])
        measurement.wall_s += timing["wall_s"]
        measurement.cpu_s = (measurement.cpu_s or 0.0) + timing["cpu_s"]
        measurement.images += 1
        pipeline_s.append(timing["pipeline_s"])
    measurement.batches = measurement.images
    return measurement


def run_serve_bench(settings: ServeBenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    r"""
    Measure the service on this machine (see [`~diffusers_qwen_sp.bench.serving`]) and return the report (the content
    of `serve.json`). Every process it starts is stopped before it returns, whatever happens.

    Args:
        settings ([`ServeBenchSettings`]): what to start and how to load it.
        progress (`Callable[[str], None]`, *optional*): receives a line per phase and measurement (default: the
            logger).

    Raises:
        `ValueError`: under a launcher (the benchmark starts its own processes).

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.serving import PRESETS, ServeBenchSettings, run_serve_bench, write_serve_outputs
    >>> report = run_serve_bench(ServeBenchSettings(**PRESETS["quick"]))  # about 20 s on 2 cores
    >>> target = report["targets"]["batching_speedup"]  # images/s with batching over without, at concurrency 4
    >>> target["value"] >= 1.0, target["bar"]
    (True, 2.0)
    >>> write_serve_outputs(report, "bench-results/serve")["markdown"]
    PosixPath('bench-results/serve/serve.md')
    ```
    """
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("bench-serve starts its own services: run `python -m diffusers_qwen_sp bench-serve` without "
                         "torchrun or accelerate launch (use --dp-degrees to choose the replicas).")
    progress = progress or logger.info
    plan = RequestPlan(settings)
    start, loads = time.perf_counter(), [_load_average()]
    servers: dict[str, ServerProcess] = {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        for spec in settings.servers:
            servers[spec.key] = ServerProcess(spec, settings)
        progress(f"bench-serve: started {len(servers)} service(s); loading the in-process pipeline meanwhile ...")
        pipeline = InProcessPipeline(settings)
        for key, server in servers.items():
            rows[key] = _server_row(server, pipeline.expected_server_threads(server.spec.dp))
            try:
                server.wait_ready()
            except ServerFailed as error:
                server.stop()
                status = "skipped" if "not implemented" in server.failure_reason() else "failed"
                rows[key].update(status=status, reason=server.failure_reason())
                progress(f"bench-serve: {server.spec.name}: {status}: {server.failure_reason()}")
                logger.debug(str(error))
                continue
            rows[key]["startup_s"] = server.ready_s
            progress(f"bench-serve: {server.spec.name} ready in {server.ready_s:.1f} s at {server.url}")
        ready = [key for key in servers if rows[key]["status"] == "ok"]
        rows[IN_PROCESS] = dict(name="in-process pipeline call", key=IN_PROCESS, kind=IN_PROCESS, processes=1,
                                threads_per_process=pipeline.threads, status="ok", reason="", points=[])
        generate_pipeline_s: list[float] = []
        rows[GENERATE] = dict(name="one `generate` process per image", key=GENERATE, kind=GENERATE, processes=1,
                              threads_per_process=pipeline.threads, status="ok", reason="", points=[],
                              pipeline_s=generate_pipeline_s)
        if not settings.generate_runs:
            rows[GENERATE].update(status="skipped", reason="--generate-runs 0")

        # Warm-up, untimed: one full batch per service, and calls in process.
        for key in ready:
            spec = servers[key].spec
            clients = min(settings.top_concurrency, spec.max_batch_size * spec.dp)
            for _ in range(settings.warmup):
                drive(servers[key].url, plan, clients, clients, settings.request_timeout)
        pipeline.run(plan, settings.warmup)

        measured: dict[tuple[str, int], list[Measurement]] = {}
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
            for round_index in range(settings.rounds):
                loads.append(_load_average())
                for c_index, (concurrency, count) in enumerate(zip(settings.concurrencies, settings.requests)):
                    # The same requests (prompts, seeds) for every configuration of this round and concurrency.
                    first = round_index * sum(settings.requests) + sum(settings.requests[:c_index])
                    units = [key for key in ready if rows[key]["status"] == "ok"]
                    if concurrency == 1:
                        units += [IN_PROCESS] + ([GENERATE] if rows[GENERATE]["status"] == "ok" else [])
                    for unit in rotated(units, round_index + c_index):
                        if unit == IN_PROCESS:
                            measurement = pipeline.run(plan, count, first)
                        elif unit == GENERATE:
                            try:
                                measurement = _generate_measurement(settings, plan, first, Path(folder),
                                                                    generate_pipeline_s)
                            except RuntimeError as error:
                                rows[GENERATE].update(status="failed", reason=str(error).splitlines()[0])
                                continue
                        else:
                            server = servers[unit]
                            cpu_before = server.cpu_seconds()
                            measurement = drive(server.url, plan, concurrency, count, settings.request_timeout,
                                                first)
                            measurement.cpu_s = server.cpu_seconds() - cpu_before
                            if server.popen.poll() is not None:
                                rows[unit].update(status="failed", reason=f"exited with code {server.popen.returncode} "
                                                  f"while measured: {server.failure_reason()}")
                        measured.setdefault((unit, concurrency), []).append(measurement)
                        rate = measurement.images / measurement.wall_s if measurement.wall_s else 0.0
                        progress(f"bench-serve: round {round_index + 1}/{settings.rounds}, {rows[unit]['name']}, "
                                 f"concurrency {concurrency}: {rate:.2f} images/s"
                                 + (f", {len(measurement.errors)} failed" if measurement.errors else ""))
    finally:
        for server in servers.values():  # all drain at once
            server.request_stop()
        for server in servers.values():
            code = server.stop()
            if server.spec.key in rows:
                rows[server.spec.key].update(
                    exit_code=code, drained=any("Drained and stopped." in line for line in server.lines),
                    pids=sorted(server.pids), pids_alive_after_stop=server.alive_pids(),
                )

    loads.append(_load_average())
    for (unit, concurrency), measurements in measured.items():
        rows[unit]["points"].append(summarise(measurements))
    for row in rows.values():
        row["points"].sort(key=lambda point: point["concurrency"])
        if row["status"] == "ok" and not row["points"]:
            row.update(status="failed", reason="nothing was measured")
    report = _report(settings, pipeline, list(rows.values()), time.perf_counter() - start)
    report["load_average_1min"] = loads
    return report


def _load_average() -> float:
    """The 1-minute load average (processes running or waiting for a core), 0 where the OS does not tell."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _report(settings: ServeBenchSettings, pipeline: InProcessPipeline, rows: list[dict[str, Any]], wall_s: float
            ) -> dict[str, Any]:
    import torch

    from ...serve.protocol import parse_request

    limits, device = pipeline.served.limits, pipeline.served.pipe.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    item = parse_request(RequestPlan(settings).body(0), limits, "generation")  # what every request asks for
    inputs = dict(height=item.height, width=item.width, steps=item.num_inference_steps,
                  true_cfg_scale=item.true_cfg_scale, negative_prompt=item.negative_prompt, images_per_request=item.n)
    data = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(settings).items()}
    description = pipeline.served.description
    report: dict[str, Any] = dict(
        schema=1,
        command="python -m diffusers_qwen_sp bench-serve",
        date=datetime.date.today().isoformat(),
        wall_s=wall_s,
        title=(f"bench-serve: {description}, {item.width}x{item.height} px, {inputs['steps']} steps, "
               f"{device_name if device.type == 'cuda' else f'{os.cpu_count()}-core CPU'}"),
        environment=dict(device=device.type, device_name=device_name, **software_versions()),
        settings=data,
        model=dict(description=description, names=list(limits.names)),
        inputs=inputs,
        threads_per_process=pipeline.threads,
        top_concurrency=settings.top_concurrency,
        rows=rows,
        targets=target_ratios(rows, settings.top_concurrency),
        method=METHOD,
    )
    return report


def default_output_dir(report: dict[str, Any]) -> Path:
    r"""`benchmarks/results/<device>/` of the machine a report was measured on."""
    env = report["environment"]
    return RESULTS_ROOT / device_slug(env["device"], env["device_name"])


def write_serve_outputs(report: dict[str, Any], output_dir: str | Path | None = None) -> dict[str, Path]:
    r"""Write `serve.json`, `serve.md` and `serve.png` into `output_dir` (default: `benchmarks/results/<device>/`);
    records their paths under `report["files"]` and returns them by kind (`"json"`, `"markdown"`, `"plot"`)."""
    folder = Path(output_dir) if output_dir is not None else default_output_dir(report)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / name for kind, name in OUTPUT_NAMES.items()}
    report["files"] = {kind: str(path) for kind, path in paths.items()}
    write_serve_plot(report, paths["plot"])
    paths["markdown"].write_text("# diffusers_qwen_sp bench-serve\n\n" + markdown_report(report))
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return paths


__all__ = ["default_output_dir", "run_serve_bench", "write_serve_outputs"]

"""`python -m diffusers_qwen_sp bench-serve`: the image service under load, against running the pipeline yourself.

One run starts the real service (`python -m diffusers_qwen_sp serve --port 0`) in every configuration asked for,
batching on (`--max-batch-size 16 --batch-wait-ms 10`) and off (`--max-batch-size 1`), one replica and two (`--dp-degree
2` under torchrun), and measures each with closed-loop HTTP clients at concurrency 1, 4 and 16: images/s and the p50
/ p95 latency of a request. Two baselines join the rotation at concurrency 1: the same requests run as pipeline calls
in the benchmark's own process (the service's own loader and call arguments, the same CPU threads: what the server
adds), and one `python -m diffusers_qwen_sp generate` process per image (what a user without a server pays).

Rounds are interleaved (every configuration at every concurrency once per round, the order rotated per round), so
every ratio is between numbers of the same run. The report names three targets, each computed from its rows:
batching on / off at the highest concurrency (bar 2x), the server's p50 at concurrency 1 over the in-process call's
(bar +10%), two replicas over one at the highest concurrency (bar 1.6x).

Writes `serve.json` (every latency of every request), `serve.md` (the table and the targets) and `serve.png` (images/s
against concurrency; latency bars) into `benchmarks/results/<device>/` by default. No process outlives the run.

The package: [`settings`] (options, presets, server configurations), [`processes`] (the services and `generate`
runs), [`load`] (the clients and the in-process calls), [`report`] (points, targets, Markdown), [`plot`] and [`run`].
"""

from .load import InProcessPipeline, Measurement, RequestPlan, batches_so_far, drive
from .processes import ServerFailed, ServerProcess, cpu_seconds, descendants, is_alive, server_command, time_generate
from .report import markdown_report, point_at, summarise, target_ratios
from .run import default_output_dir, run_serve_bench, write_serve_outputs
from .settings import OUTPUT_NAMES, PRESETS, RESULTS_ROOT, TARGETS, ServeBenchSettings, ServerSpec, device_slug


__all__ = [
    "OUTPUT_NAMES",
    "PRESETS",
    "RESULTS_ROOT",
    "TARGETS",
    "InProcessPipeline",
    "Measurement",
    "RequestPlan",
    "ServeBenchSettings",
    "ServerFailed",
    "ServerProcess",
    "ServerSpec",
    "batches_so_far",
    "cpu_seconds",
    "default_output_dir",
    "descendants",
    "device_slug",
    "drive",
    "is_alive",
    "markdown_report",
    "point_at",
    "run_serve_bench",
    "server_command",
    "summarise",
    "target_ratios",
    "time_generate",
    "write_serve_outputs",
]

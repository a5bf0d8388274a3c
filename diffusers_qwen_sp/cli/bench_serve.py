"""`diffusers-qwen-sp bench-serve`: the image service under load (batching on / off, one replica / two) against an
in-process pipeline call and one `generate` process per image (the measuring is `diffusers_qwen_sp.bench.serving`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..bench.serving import PRESETS, ServeBenchSettings, markdown_report, run_serve_bench, write_serve_outputs
from ._common import positive_int


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value}")
    return value == "on"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="measure the image service: images/s and p50/p95 latency by concurrency, batching and replicas",
        description="Start `serve` in each configuration (batching on / off, --dp-degree 1 / 2 under torchrun), drive "
        "it with concurrent HTTP clients, and compare with the same requests run in process and with one `generate` "
        "process per image. Interleaved rounds: every ratio is between numbers of the same run. Writes serve.json, "
        "serve.md and serve.png (default: benchmarks/results/<device>/). Run it without torchrun.",
    )
    defaults = ServeBenchSettings.__dataclass_fields__
    parser.add_argument("--quick", action="store_true",
                        help="seconds of measuring (concurrency 1 and 4, dp 1, 4 steps): what the test runs")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results/<device>/")
    parser.add_argument("--model", default=None, help="what `serve` loads (default: the scene model)")
    parser.add_argument("--concurrency", dest="concurrencies", type=positive_int, nargs="+", default=None,
                        help=f"clients sending at once, increasing, with 1 (default: "
                        f"{' '.join(map(str, defaults['concurrencies'].default))})")
    parser.add_argument("--requests", type=positive_int, nargs="+", default=None,
                        help=f"requests per concurrency and round (default: "
                        f"{' '.join(map(str, defaults['requests'].default))})")
    parser.add_argument("--dp-degrees", type=positive_int, nargs="+", default=None,
                        help="replicas of each configuration (default: 1 2)")
    parser.add_argument("--batching", type=_on_off, nargs="+", default=None, metavar="{on,off}",
                        help="batching on and / or off (default: on off)")
    for name, kind in (("rounds", positive_int), ("max_batch_size", positive_int), ("batch_wait_ms", float),
                       ("steps", positive_int), ("size", positive_int), ("generate_runs", int),
                       ("threads", positive_int), ("warmup", int), ("startup_timeout", float),
                       ("request_timeout", float)):
        default = defaults[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help="default: the model's own" if default is None else f"default: {default:g}")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ServeBenchSettings:
    r"""The [`ServeBenchSettings`] of the options given over the preset (`--quick` or the default one)."""
    preset = "quick" if args.quick else "default"
    values: dict[str, Any] = {**PRESETS[preset], "preset": preset}
    for item in fields(ServeBenchSettings):
        value = getattr(args, item.name, None)
        if value is not None:
            values[item.name] = tuple(value) if isinstance(value, list) else value
    return ServeBenchSettings(**values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    report = run_serve_bench(settings, progress=lambda line: print(line, flush=True))
    files = write_serve_outputs(report, settings.output_dir)
    print(f"\n{markdown_report(report)}")
    print(f"wrote {files['json']}, {files['markdown']}, {files['plot']} ({report['wall_s']:.0f} s)")
    return report

"""[`run_bench`]: spawn the processes, measure, and write `bench.json`, `bench.md` and `bench.png`."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..distributed import run_distributed
from .markdown import markdown_table
from .plot import write_plot
from .report import _ratio, _row_report, build_report
from .rows import plan_rows, scaling_rows, transformer_config
from .settings import BenchSettings, settings_from_args
from .worker import _bench_worker


logger = logging.get_logger(__name__)


def json_safe(value: Any) -> Any:
    r"""`value` with non-finite floats as `None` and keys as strings: what `json.dumps(allow_nan=False)` takes."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_outputs(report: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    r"""Write `bench.json`, `bench.md` and `bench.png` into `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "bench.json", "markdown": output_dir / "bench.md", "plot": output_dir / "bench.png"}
    report["files"] = {name: str(path) for name, path in paths.items()}
    report["plot_renderer"] = write_plot(report, paths["plot"])
    paths["markdown"].write_text("# diffusers_qwen_sp bench\n\n" + markdown_table(report))
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return paths


def _scaling_degrees(settings: BenchSettings) -> list[int]:
    if settings.device != "cuda" or not settings.scaling or "forward" not in settings.phases:
        return []
    return [p for p in (2, 4, 8) if p < settings.world]


def run_bench(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    r"""
    Run `python -m diffusers_qwen_sp bench` with parsed `args` (see [`add_bench_arguments`]): spawn the processes,
    measure, write `bench.json`, `bench.md` and `bench.png` into `args.output_dir`, and return the report (the
    content of `bench.json`, plus `report["files"]`, the paths written). `progress` receives a line per phase
    (default: the logger).

    Raises:
        `ValueError`: invalid options, or a launcher's environment (the bench spawns its own processes).
    """
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "The bench spawns its own processes: run `python -m diffusers_qwen_sp bench` without torchrun or "
            "accelerate launch (use --world to choose how many)."
        )
    settings = settings_from_args(args)
    config = transformer_config(settings)
    heads = config["num_attention_heads"]
    rows = plan_rows(settings, heads)
    backend = "nccl" if settings.device == "cuda" else "gloo"
    if settings.device == "cuda" and settings.world > torch.cuda.device_count():
        raise ValueError(f"--world {settings.world} needs that many GPUs; {torch.cuda.device_count()} are visible.")
    progress = progress or logger.info
    progress(
        f"bench: {len(rows)} rows on {settings.world} {backend} process(es), preset {settings.preset}, "
        f"{config['num_layers']} layers x {heads} heads x {config['attention_head_dim']}, "
        f"{settings.height}x{settings.width} px, {settings.steps} steps ..."
    )
    start = time.perf_counter()
    results = run_distributed(_bench_worker, settings.world, settings, tuple(rows), timeout=settings.timeout,
                              backend=backend)
    scaling: list[dict[str, Any]] = []
    for processes in _scaling_degrees(settings):
        progress(f"bench: SP scaling run on {processes} processes ...")
        run_settings = replace(settings, world=processes, phases=("forward",))
        specs = scaling_rows(processes, heads)
        run_results = run_distributed(_bench_worker, processes, run_settings, tuple(specs),
                                      timeout=settings.timeout, backend=backend)
        run_config = run_results[0]["config"]
        scaling.append(dict(
            processes=processes,
            rows=[_row_report(spec, run_results, run_config, run_settings) for spec in specs],
        ))
        stock_time = scaling[-1]["rows"][0].get("per_forward_s")
        for row in scaling[-1]["rows"]:
            row["forward_speedup_vs_stock"] = _ratio(stock_time, row.get("per_forward_s"))
    report = build_report(settings, rows, results, scaling, time.perf_counter() - start)
    paths = write_outputs(report, Path(getattr(args, "output_dir", None) or "bench-results"))
    return {**report, "files": {name: str(path) for name, path in paths.items()}}

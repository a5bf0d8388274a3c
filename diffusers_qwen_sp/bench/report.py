"""The report of a bench run: per-row medians, spreads and ratios between rows of the same run, PSNR against the stock
row, and the SP scaling ([`build_report`], the content of `bench.json`)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

import torch

from .instrumentation import _max_abs_diff
from .rows import RowSpec, analytic_bytes_per_forward
from .settings import BenchSettings


# Rounds of a row spreading more than this fraction of their median get the row named as noisy.
NOISY_SPREAD = 0.2
# Parity bar of the fp32 test suite: a forward that differs more than this from the stock one is flagged.
FP32_TOLERANCE = 1e-4
PSNR_NOTE = (
    "PSNR compares the final latents of a row with the stock row's (peak = the stock latents' range). With random "
    "weights it measures how far a cached trajectory drifts from the uncached one on this model; it is no judgement "
    "of image quality."
)


def psnr(value: torch.Tensor, reference: torch.Tensor, peak: float | None = None) -> float:
    r"""PSNR in dB of `value` against `reference`; `peak` defaults to the reference's range. `inf` when identical."""
    reference = reference.double()
    if peak is None:
        peak = (reference.max() - reference.min()).item()
    mse = (value.double() - reference).pow(2).mean().item()
    if mse == 0:
        return math.inf
    if not math.isfinite(mse):
        return -math.inf
    return 10 * math.log10(peak**2 / mse)


def software_versions() -> dict[str, Any]:
    r"""The CPU count and the versions of torch, diffusers, this package, Python and the platform: the part of a
    report's `environment` every benchmark shares."""
    import diffusers

    from .. import __version__

    return dict(
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        diffusers_qwen_sp=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
    )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> float | None:
    """How noisy the machine was for a row: the interquartile range of its rounds over their median (from 4 rounds
    on, so that one disturbed round does not count), else (slowest - fastest) / median."""
    if len(values) < 2:
        return None
    if len(values) >= 4:
        low, _, high = statistics.quantiles(values, n=4)
    else:
        low, high = min(values), max(values)
    return (high - low) / statistics.median(values)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _row_report(
    spec: RowSpec,
    results: list[dict[str, Any]],
    config: dict[str, Any],
    settings: BenchSettings,
) -> dict[str, Any]:
    first = results[0]["rows"][spec.name]
    error = next((r["rows"][spec.name]["error"] for r in results if r["rows"][spec.name]["error"]), "")
    row: dict[str, Any] = dict(
        name=spec.name, key=spec.key, kind=spec.kind, processes=spec.processes, ulysses=spec.ulysses,
        ring=spec.ring, cfg=spec.cfg, teacache_threshold=spec.teacache,
        status="n/a" if error else "ok", reason=error,
    )
    if spec.per_forward:
        row["forward_times_s"] = first["forward_times"]
        row["forward_cpu_times_s"] = first["forward_cpu_times"]
        row["per_forward_s"] = _median(first["forward_times"])
        row["forward_spread"] = _spread(first["forward_times"])
        measured = [r["rows"][spec.name].get("forward_bytes") for r in results]
        if measured[0] is not None:
            row["bytes_per_forward_per_rank"] = measured[0]["total"]
            row["bytes_per_forward_all_ranks"] = [m["total"] if m else None for m in measured]
            row["bytes_per_forward_by_op"] = measured[0]["by_op"]
            row["collective_calls_per_forward"] = measured[0]["calls"]
        terms = analytic_bytes_per_forward(spec, config, settings)
        row["analytic_min_bytes_per_forward"] = sum(terms.values()) if spec.parallel else 0.0
        row["analytic_terms"] = terms
        # Every call of every rank is checked: diffusers' CP was seen to return garbage on random calls.
        diffs = [d for r in results for d in r["rows"][spec.name]["forward_diffs"]]
        row["forward_max_abs_diff_vs_stock"] = max(diffs) if diffs else None
        row["forward_calls_checked"] = len(diffs)
        row["forward_calls_above_fp32_bar"] = sum(1 for d in diffs if not d <= FP32_TOLERANCE)
    if spec.per_image:
        row["image_times_s"] = first["image_times"]
        row["image_cpu_times_s"] = first["image_cpu_times"]
        row["per_image_s"] = _median(first["image_times"])
        row["image_spread"] = _spread(first["image_times"])
        row["transformer_calls"] = settings.transformer_calls
        measured = [r["rows"][spec.name].get("image_bytes") for r in results]
        if measured[0] is not None:
            row["bytes_per_image_per_rank"] = measured[0]["total"]
            row["bytes_per_image_by_op"] = measured[0]["by_op"]
        computed_lists = first.get("teacache_computed")
        if computed_lists:
            computed = sum(len(steps) for steps in computed_lists[0].values())
            row["computed_calls"] = computed
            row["computed_steps"] = computed_lists[0]
            row["ideal_speedup"] = settings.transformer_calls / computed
            row["teacache_decisions_identical_across_calls_and_ranks"] = all(
                lists == computed_lists[0]
                for r in results
                for lists in r["rows"][spec.name].get("teacache_computed", [])
            )
    # Peak memory of each rank during the first (untimed) call of each phase; the table shows the image's.
    for phase in ("forward", "image"):
        memories = [r["rows"][spec.name].get(f"{phase}_memory") for r in results]
        if all(memories):
            row[f"{phase}_peak_memory_per_rank_bytes"] = [m["peak_bytes"] for m in memories]
            row[f"{phase}_peak_memory_above_idle_per_rank_bytes"] = [m["above_idle_bytes"] for m in memories]
            row["memory_method"] = memories[0]["method"]
            row["peak_memory_during"] = "one image" if phase == "image" else "one forward"
            row["peak_memory_per_rank_bytes"] = row[f"{phase}_peak_memory_per_rank_bytes"]
            row["peak_memory_above_idle_per_rank_bytes"] = row[f"{phase}_peak_memory_above_idle_per_rank_bytes"]
    return row


def build_report(
    settings: BenchSettings,
    rows: list[RowSpec],
    results: list[dict[str, Any]],
    scaling: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    r"""The JSON-able report of a run: settings, environment, one entry per row, SP scaling."""
    first = results[0]
    config = first["config"]
    report_rows = [_row_report(spec, results, config, settings) for spec in rows]
    by_name = {row["name"]: row for row in report_rows}
    stock = report_rows[0]

    # Ratios, all between rows of this run.
    stock_latents = first["rows"][stock["name"]].get("latents")
    uncached_of = {"teacache": next((r for r in report_rows if r["key"] == "ours"), None),
                   "sp-teacache": next((r for r in report_rows if r["key"] == "ulysses"), None)}
    uncompiled_of = {"compiled": uncached_of["teacache"], "ulysses-compiled": uncached_of["sp-teacache"]}
    for row in report_rows:
        row["forward_speedup_vs_stock"] = _ratio(stock.get("per_forward_s"), row.get("per_forward_s"))
        row["image_speedup_vs_stock"] = _ratio(stock.get("per_image_s"), row.get("per_image_s"))
        # Second estimates for a loaded machine: the ratio of the fastest rounds (load only ever adds time), and of
        # the median CPU seconds of the busiest rank's process (which other processes hardly inflate; it leaves out
        # time spent waiting for other ranks, so it flatters the parallel rows; CPU only: on CUDA it is host time).
        for phase in ("forward", "image"):
            mine, reference = row.get(f"{phase}_times_s"), stock.get(f"{phase}_times_s")
            if mine and reference:
                row[f"{phase}_speedup_vs_stock_fastest"] = min(reference) / min(mine)
            mine, reference = row.get(f"{phase}_cpu_times_s"), stock.get(f"{phase}_cpu_times_s")
            if mine and reference and settings.device == "cpu":
                row[f"{phase}_speedup_vs_stock_cpu_time"] = statistics.median(reference) / statistics.median(mine)
        if row.get("analytic_min_bytes_per_forward") and row.get("bytes_per_forward_per_rank") is not None:
            minimum = row["analytic_min_bytes_per_forward"]
            row["bytes_measured_over_minimum"] = row["bytes_per_forward_per_rank"] / minimum
        uncached = uncached_of.get(row["key"])
        if uncached is not None and row.get("teacache_threshold") is not None:
            row["uncached_row"] = uncached["name"]
            row["image_speedup_vs_uncached"] = _ratio(uncached.get("per_image_s"), row.get("per_image_s"))
            # Where the cached row would be if skipping a call saved all of its time (plotted against stock).
            uncached_speedup = _ratio(stock.get("per_image_s"), uncached.get("per_image_s"))
            if uncached_speedup is not None and row.get("ideal_speedup") is not None:
                row["ideal_image_speedup_vs_stock"] = uncached_speedup * row["ideal_speedup"]
        uncompiled = uncompiled_of.get(row["key"])
        if uncompiled is not None:  # what compile_repeated_blocks buys, measured in this run
            row["uncompiled_row"] = uncompiled["name"]
            for phase in ("forward", "image"):
                row[f"{phase}_speedup_vs_uncompiled"] = _ratio(
                    uncompiled.get(f"per_{phase}_s"), row.get(f"per_{phase}_s")
                )
        latents = first["rows"][row["name"]].get("latents")
        if latents is not None and stock_latents is not None:
            value = psnr(latents, stock_latents)
            row["psnr_vs_stock_db"] = _finite_or_none(value)
            row["identical_to_stock"] = value == math.inf
            row["image_max_abs_diff_vs_stock"] = _max_abs_diff(latents, stock_latents)
        if row["status"] == "n/a":
            for key in ("per_forward_s", "per_image_s", "forward_speedup_vs_stock", "image_speedup_vs_stock"):
                row[key] = None

    # SP scaling: 1 process (ours, no SP) and every parallel run's Ulysses and Ring, each against its run's stock.
    scaling_rows_out: list[dict[str, Any]] = []
    ours = by_name.get("ours, no SP")
    if ours and ours.get("forward_speedup_vs_stock"):
        scaling_rows_out.append(dict(processes=1, algorithm="none", mode="none", per_forward_s=ours["per_forward_s"],
                                     stock_per_forward_s=stock["per_forward_s"],
                                     speedup=ours["forward_speedup_vs_stock"]))
    runs = [(settings.world, report_rows)] + [(s["processes"], s["rows"]) for s in scaling]
    for processes, run_rows in runs:
        run_stock = run_rows[0]
        for row in run_rows:
            if row["key"] in ("ulysses", "ring", "usp") and row.get("per_forward_s") and row["status"] == "ok":
                speedup = _ratio(run_stock.get("per_forward_s"), row["per_forward_s"])
                scaling_rows_out.append(dict(
                    processes=processes, algorithm=row["key"], mode=row["name"].removeprefix("ours "),
                    per_forward_s=row["per_forward_s"],
                    stock_per_forward_s=run_stock.get("per_forward_s"), speedup=speedup,
                    efficiency=speedup / processes if speedup else None,
                ))
    scaling_rows_out.sort(key=lambda r: (r["processes"], r["mode"]))

    height, width = settings.grid
    return dict(
        schema=1,
        command="python -m diffusers_qwen_sp bench",
        wall_s=wall_s,
        environment=dict(
            device=settings.device,
            device_name=first["device_name"],
            processes=settings.world,
            backend="nccl" if settings.device == "cuda" else "gloo",
            threads_per_rank=settings.threads if settings.device == "cpu" else None,
            **software_versions(),
        ),
        settings=_settings_dict(settings),
        model=dict(
            source=settings.model or ("random weights, full-size Qwen-Image config" if settings.full_size
                                      else "random weights, mid-size config"),
            config=config,
            parameters=first["parameters"],
            dtype=settings.dtype,
            weights_broadcast_from_rank0=first["weights_broadcast"],
            build_s=max(r["phase_s"]["model"] for r in results),
        ),
        inputs=dict(
            height=settings.height, width=settings.width, image_tokens=settings.image_tokens,
            grid=[height, width], text_tokens=settings.text_tokens, text_padding=settings.text_padding,
            batch=1, steps=settings.steps, true_cfg_scale=settings.cfg_scale,
            transformer_calls_per_image=settings.transformer_calls,
        ),
        method=(
            "Interleaved rounds (every row once per round, order rotated per round); medians after warm-up; every "
            "ratio between rows of the same run. A row's time is its slowest rank's; single-process rows run as "
            "replicas on every rank at once. Bytes and memory come from the first (untimed) warm-up call. Per image = "
            "one pipeline call from prompt embeddings to latents (true CFG: 2 transformer calls per step); the text "
            "encoder and the VAE decode are not timed. " + PSNR_NOTE
        ),
        phase_s={name: max(r["phase_s"][name] for r in results) for name in first["phase_s"]},
        rows=report_rows,
        scaling=scaling_rows_out,
    )


def _settings_dict(settings: BenchSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["thresholds"] = list(settings.thresholds)
    data["rows"] = list(settings.rows)
    data["phases"] = list(settings.phases)
    return data

"""The report of a `bench-serve` run: one row per configuration with a point per concurrency ([`summarise`]), the three
target ratios computed from those rows ([`target_ratios`]), and the Markdown of it all ([`markdown_report`])."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..markdown import _fmt_x
from ..report import _ratio
from .load import Measurement
from .settings import TARGETS


def summarise(measurements: list[Measurement]) -> dict[str, Any]:
    r"""
    One point (a configuration at one concurrency) from its rounds: images/s = images over the summed wall-clock of
    the rounds; p50 / p95 / mean over every request's latency (`numpy.percentile`, linear interpolation); images per
    batch where the service counted its batches.
    """
    latencies = [value for m in measurements for value in m.latencies_s]
    images = sum(m.images for m in measurements)
    wall = sum(m.wall_s for m in measurements)
    errors = [error for m in measurements for error in m.errors]
    batches = [m.batches for m in measurements]
    cpu = [m.cpu_s for m in measurements]
    client_cpu = [m.client_cpu_s for m in measurements]
    point: dict[str, Any] = dict(
        concurrency=measurements[0].concurrency,
        requests=len(latencies) + len(errors),
        images=images,
        errors=len(errors),
        first_error=errors[0] if errors else None,
        wall_s=wall,
        images_per_s=images / wall if images and wall > 0 else None,
        round_images_per_s=[m.images / m.wall_s if m.images and m.wall_s > 0 else None for m in measurements],
        latency_p50_s=float(np.percentile(latencies, 50)) if latencies else None,
        latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
        latency_mean_s=float(np.mean(latencies)) if latencies else None,
        # Servers: images per pipeline call, from the service's own metrics (the in-process calls run one each).
        images_per_batch=images / sum(batches) if None not in batches and sum(batches) else None,
        cpu_s_per_image=sum(cpu) / images if None not in cpu and images else None,
        # Cores the serving processes kept busy: about 1 per replica when the machine has them to give.
        cores_used=sum(cpu) / wall if None not in cpu and wall > 0 else None,
        client_cpu_s_per_image=sum(client_cpu) / images if None not in client_cpu and images else None,
        latencies_s=latencies,
    )
    return point


def point_at(row: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    r"""The point of `row` at `concurrency`, or `None` (no row, not measured, or the row did not run)."""
    if row is None or row.get("status") != "ok":
        return None
    return next((p for p in row["points"] if p["concurrency"] == concurrency), None)


def _value(row: dict[str, Any] | None, concurrency: int, metric: str) -> float | None:
    point = point_at(row, concurrency)
    return None if point is None else point.get(metric)


def _find(rows: list[dict[str, Any]], **wanted: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in wanted.items())), None)


def _target(name: str, value: float | None, numerator: dict[str, Any], denominator: dict[str, Any], skipped: str,
            cpu_time_value: float | None = None) -> dict[str, Any]:
    target = TARGETS[name]
    result = dict(what=target["what"], bar=target["bar"], op=target["op"], value=value,
                  numerator=numerator, denominator=denominator, cpu_time_value=cpu_time_value)
    if value is None:
        result.update(passed=None, status=f"skipped: {skipped}")
    else:
        passed = value >= target["bar"] if target["op"] == ">=" else value <= target["bar"]
        result.update(passed=passed, status="pass" if passed else "FAIL")
    return result


def _why_missing(*needed: tuple[str, dict[str, Any] | None, int]) -> str:
    """Why a target has no value: the first `(label, row, concurrency)` without a measured point."""
    for label, row, concurrency in needed:
        if row is None:
            return f"no {label} row in this run"
        if row.get("status") != "ok":
            return f"{label}: {row['status']}: {row.get('reason')}"
        if point_at(row, concurrency) is None:
            return f"{label} not measured at concurrency {concurrency}"
    return "no value"


def target_ratios(rows: list[dict[str, Any]], top: int) -> dict[str, dict[str, Any]]:
    r"""
    The three targets, each the quotient of numbers of `rows` (a consumer can recompute it from the JSON), with a
    second estimate from CPU seconds per image (`cpu_time_value`, steady on a loaded machine; for dp a projection:
    2 x dp 1's CPU seconds per image / dp 2's, what two replicas would give with a free core each):

    - `batching_speedup`: images/s of batching on over off, one replica, at concurrency `top`;
    - `server_overhead`: p50 latency of the server at concurrency 1 (batching on, one replica: it also waits for
      batch-mates; batching off when that is all the run has) over the in-process pipeline call's p50, minus 1;
    - `dp_speedup`: images/s of two replicas over one at concurrency `top` (batching on when both ran, else off).
    """
    rate = "images_per_s"
    on, off = _find(rows, kind="server", dp=1, batching=True), _find(rows, kind="server", dp=1, batching=False)
    batching = _target(
        "batching_speedup", _ratio(_value(on, top, rate), _value(off, top, rate)),
        dict(row=on and on["name"], concurrency=top, metric=rate),
        dict(row=off and off["name"], concurrency=top, metric=rate),
        _why_missing(("batching on, dp 1", on, top), ("batching off, dp 1", off, top)),
        _ratio(_value(off, top, "cpu_s_per_image"), _value(on, top, "cpu_s_per_image")),
    )
    served = on if point_at(on, 1) is not None else off
    in_process = _find(rows, kind="in-process")
    ratio = _ratio(_value(served, 1, "latency_p50_s"), _value(in_process, 1, "latency_p50_s"))
    cpu_ratio = _ratio(_value(served, 1, "cpu_s_per_image"), _value(in_process, 1, "cpu_s_per_image"))
    overhead = _target(
        "server_overhead", None if ratio is None else ratio - 1,
        dict(row=served and served["name"], concurrency=1, metric="latency_p50_s"),
        dict(row=in_process and in_process["name"], concurrency=1, metric="latency_p50_s"),
        _why_missing(("the in-process call", in_process, 1), ("a one-replica server", served, 1)),
        None if cpu_ratio is None else cpu_ratio - 1,
    )
    two_on = _find(rows, kind="server", dp=2, batching=True)
    batching_mode = point_at(two_on, top) is not None or _find(rows, kind="server", dp=2, batching=False) is None
    one = _find(rows, kind="server", dp=1, batching=batching_mode)
    two = _find(rows, kind="server", dp=2, batching=batching_mode)
    cpu_ratio = _ratio(_value(one, top, "cpu_s_per_image"), _value(two, top, "cpu_s_per_image"))
    dp = _target(
        "dp_speedup", _ratio(_value(two, top, rate), _value(one, top, rate)),
        dict(row=two and two["name"], concurrency=top, metric=rate),
        dict(row=one and one["name"], concurrency=top, metric=rate),
        _why_missing(("dp 2", two, top), ("dp 1", one, top)),
        None if cpu_ratio is None else 2 * cpu_ratio,  # a projection: each replica given a core of its own
    )
    return {"batching_speedup": batching, "server_overhead": overhead, "dp_speedup": dp}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_target(target: dict[str, Any], value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.1%}" if target["op"] == "<=" else _fmt_x(value)


def _bar(target: dict[str, Any]) -> str:
    return f"{target['op']} {target['bar']:+.0%}" if target["op"] == "<=" else f"{target['op']} {target['bar']:g}x"


def _load_note(report: dict[str, Any]) -> str:
    loads, cores = report["load_average_1min"], report["environment"]["cpu_count"] or 1
    note = (f"Load average (1 min) over the run: {min(loads):.1f} to {max(loads):.1f} on {cores} cores (this run's "
            "own processes included).")
    if max(loads) > cores + 1:
        note += (" Other processes competed for the cores: wall-clock ratios are noisy; CPU seconds per image are "
                 "the steadier estimate, and dp 2 cannot get the second core it needs.")
    return note


def markdown_report(report: dict[str, Any]) -> str:
    r"""The table of a run (one line per configuration and concurrency), its targets and how it was measured."""
    env, settings, rows = report["environment"], report["settings"], report["rows"]
    generate = _find(rows, kind="generate")
    per_process = _value(generate, 1, "images_per_s")
    where = (f"{env['device_name']}" if env["device"] == "cuda" else
             f"{env['cpu_count']}-core CPU ({env['device_name']})")
    lines = [
        f"{report['model']['description']}: {report['inputs']['width']}x{report['inputs']['height']} px, "
        f"{report['inputs']['steps']} steps, true CFG {report['inputs']['true_cfg_scale']:g}, one image per request; "
        f"{where}, {report['threads_per_process']} intra-op thread(s) per process; torch {env['torch']}, diffusers "
        f"{env['diffusers']}. {settings['rounds']} interleaved round(s); {report['date']}; the run took "
        f"{report['wall_s']:.0f} s.",
        "",
        _load_note(report),
        "",
        "| configuration | processes | concurrency | requests | images/s | vs one `generate` per image "
        "| p50 latency (s) | p95 latency (s) | images per batch | CPU s per image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            status = f"{row['status']}: {row['reason']}"
            lines.append(f"| {row['name']} | {row['processes']} | — | — | {status} | | | | | |")
            continue
        for point in row["points"]:
            speedup = _ratio(point["images_per_s"], per_process)
            errors = f" ({point['errors']} failed)" if point["errors"] else ""
            lines.append(
                f"| {row['name']} | {row['processes']} | {point['concurrency']} | {point['requests']}{errors} "
                f"| {_fmt(point['images_per_s'], 2)} | {_fmt_x(speedup)} | {_fmt(point['latency_p50_s'])} "
                f"| {_fmt(point['latency_p95_s'])} | {_fmt(point.get('images_per_batch'), 1)} "
                f"| {_fmt(point.get('cpu_s_per_image'))} |"
            )
    lines += ["", "| target | measured | bar | result | from CPU seconds per image |", "|---|---|---|---|---|"]
    labels = {
        "batching_speedup": f"batching on / off, images/s at concurrency {report['top_concurrency']} (dp 1)",
        "server_overhead": "server p50 latency at concurrency 1 over the in-process pipeline call",
        "dp_speedup": f"dp 2 / dp 1, images/s at concurrency {report['top_concurrency']}",
    }
    for name, target in report["targets"].items():
        lines.append(f"| {labels[name]} | {_fmt_target(target, target['value'])} | {_bar(target)} "
                     f"| {target['status']} | {_fmt_target(target, target['cpu_time_value'])} |")
    lines.append("\nCPU-seconds estimates: batching, off / on; overhead, server / in process - 1; dp, 2 x dp 1 / dp 2 "
                 "(a projection: what two replicas give when each has a free core).")
    top = report["top_concurrency"]
    for batching in (True, False):  # replica scaling in both modes, whichever the target reads
        one = _find(rows, kind="server", dp=1, batching=batching)
        two = _find(rows, kind="server", dp=2, batching=batching)
        ratio = _ratio(_value(two, top, "images_per_s"), _value(one, top, "images_per_s"))
        if ratio is not None:
            cores = (_value(two, top, "cores_used"), _value(one, top, "cores_used"))
            busy = "" if None in cores else f" (their processes kept {cores[0]:.1f} and {cores[1]:.1f} cores busy)"
            lines.append(f"\ndp 2 / dp 1 {'with' if batching else 'without'} batching at concurrency {top}: "
                         f"{ratio:.2f}x{busy}.")
    nobatch, in_process = _find(rows, kind="server", dp=1, batching=False), _find(rows, kind="in-process")
    ratio = _ratio(_value(nobatch, 1, "latency_p50_s"), _value(in_process, 1, "latency_p50_s"))
    if ratio is not None and report["targets"]["server_overhead"]["numerator"]["row"] != nobatch["name"]:
        lines.append(f"\nServer overhead at concurrency 1 without batching (no wait for batch-mates): "
                     f"{ratio - 1:+.1%}.")
    lines += ["", report["method"]]
    return "\n".join(lines) + "\n"


__all__ = ["markdown_report", "point_at", "summarise", "target_ratios"]

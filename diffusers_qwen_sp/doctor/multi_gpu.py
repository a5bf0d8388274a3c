"""Section `multi_gpu`: Ulysses, Ring and Ulysses x Ring over NCCL, one process per GPU (>= 2 GPUs; skipped otherwise).

For each world size (every GPU, then 2), one spawn: each rank materialises the same random-weight transformer on its
GPU and runs, in interleaved rounds, the single-GPU stock forward (the reference, as a replica on every rank, so it
sees the same contention) and our SP modes at that size (`Ulysses P`, `Ring P`, `Ulysses P/2 x Ring 2` from 4
processes), batch 1 at the first image size with a padded text mask. Reported per mode: the slowest rank's median
time and the speed-up over one GPU, the bytes one rank sends per forward (`count_communication`, in the untimed
warm-up round) against the analytic minimum (`analytic_bytes_per_forward`), and parity with the single-GPU output on
every call: the transformer output, |diff| divided by the reference's range (the peers' bar on [0, 1] images read at
transformer level, decode-free). With `DoctorSettings.cpu_world` the same code runs on gloo CPU processes (tests).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist

from ..bench import RowSpec, analytic_bytes_per_forward, forward_inputs, materialize_random_transformer, rotated
from ..distributed import count_communication, run_distributed
from ..hooks import SequenceParallelConfig, apply_sequence_parallel
from ..models import QwenImageSPTransformer2DModel
from .context import PARITY_BARS, DoctorContext, describe, median, range_scaled_diff, within_bar
from .settings import DoctorSettings


# Largest accepted (bytes sent per forward) / (analytic minimum): only padding of an uneven split may add to it.
BYTES_BAR = 1.05
REFERENCE = "1 device"


def plan_modes(world: int, heads: int) -> list[tuple[str, int, int, str]]:
    r"""`(name, ulysses, ring, why not)` of the SP modes measured on `world` processes; `why not` is empty when the
    mode can run."""
    modes = [(f"Ulysses {world}", world, 1), (f"Ring {world}", 1, world)]
    if world >= 4 and world % 2 == 0:
        modes.append((f"Ulysses {world // 2} x Ring 2", world // 2, 2))
    planned = []
    for name, ulysses, ring in modes:
        reason = f"Ulysses degree {ulysses} does not divide the {heads} heads" if heads % ulysses else ""
        planned.append((name, ulysses, ring, reason))
    return planned


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # (n,) per rank -> (n,) the largest over ranks
    return tensor.tolist()


def _all_ranks_call(model: torch.nn.Module, inputs: dict[str, Any], device: torch.device, count: bool) -> dict:
    """One forward on every rank at once: the output, the slowest rank's seconds, this rank's bytes (when counted)
    and an error that every rank agrees on (so that all leave a failing mode alike)."""
    dist.barrier()
    start, output, error, stats = time.perf_counter(), None, "", None
    try:
        with torch.no_grad(), (count_communication() if count else contextlib.nullcontext()) as stats:
            output = model(**inputs)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - reported for this mode; the others still run
        error = describe(exc)
    elapsed, failed = _max_over_ranks([time.perf_counter() - start, 1.0 if error else 0.0], device)
    return {"output": output, "seconds": elapsed, "stats": stats,
            "error": error or ("failed on another rank" if failed else "")}


def _multi_gpu_worker(rank: int, world: int, settings: DoctorSettings) -> dict[str, Any]:
    if settings.device == "cuda":
        torch.cuda.set_device(rank)  # before any collective: NCCL binds its communicator to the current device
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dtype = settings.torch_dtype
    config = settings.transformer_config()
    start = time.perf_counter()
    stock = materialize_random_transformer(config, device, dtype, settings.seed)  # seeded: the same on every rank
    build_s = time.perf_counter() - start
    height, width = settings.sizes[0]
    inputs = forward_inputs(config, settings.bench_settings(height, width), device, dtype)
    models: dict[str, torch.nn.Module] = {REFERENCE: stock}
    modes: dict[str, dict[str, Any]] = {REFERENCE: {"times": []}}
    for name, ulysses, ring, reason in plan_modes(world, config["num_attention_heads"]):
        modes[name] = {"ulysses": ulysses, "ring": ring, "times": []}
        if reason:
            modes[name]["unavailable"] = reason
            continue
        model = QwenImageSPTransformer2DModel.from_transformer(stock)  # the same weights, its own hooks
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        models[name] = model
    reference = None
    for round_index in range(settings.warmup + settings.multi_gpu_repeats):
        # Round 0 runs the reference first (no rotation yet): every SP output is compared with it.
        for name in rotated(list(models), round_index):
            entry = modes[name]
            if entry.get("error") or entry.get("unavailable"):
                continue
            counted = round_index == 0 and name != REFERENCE  # dispatch-mode counting is slow: untimed round only
            result = _all_ranks_call(models[name], inputs, device, counted)
            if result["error"]:
                entry["error"] = result["error"]
                continue
            if name == REFERENCE and reference is None:
                reference = result["output"].detach().float()
            elif reference is None:  # the reference failed: nothing to compare with
                entry["error"] = "no single-device reference output (it failed)"
                continue
            elif name != REFERENCE:
                diff = range_scaled_diff(result["output"], reference)
                worst = entry.get("parity", {"mean": 0.0, "max": 0.0})
                entry["parity"] = {key: max(worst[key], diff[key]) for key in diff}
            if counted:
                stats = result["stats"]
                entry["bytes_sent"] = stats.bytes_sent
                entry["bytes_by_op"] = dict(stats.bytes_sent_by_op)
            if round_index >= settings.warmup:
                entry["times"].append(result["seconds"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"rank": rank, "device": name, "build_s": build_s, "modes": modes}


def _world_report(world: int, results: list[dict[str, Any]], settings: DoctorSettings) -> dict[str, Any]:
    config = settings.transformer_config()
    height, width = settings.sizes[0]
    bench = settings.bench_settings(height, width)
    reference_s = median(results[0]["modes"][REFERENCE]["times"])
    rows = [{"mode": REFERENCE, "processes": 1, "time_s": reference_s, "speedup": 1.0 if reference_s else None}]
    checks: list[bool] = []
    for name, entry in results[0]["modes"].items():
        if name == REFERENCE:
            continue
        errors = sorted({r["modes"][name].get("error", "") for r in results} - {""})
        row: dict[str, Any] = {"mode": name, "processes": world, "ulysses": entry["ulysses"], "ring": entry["ring"]}
        if entry.get("unavailable"):
            rows.append({**row, "skipped": entry["unavailable"]})
            continue
        if errors:
            rows.append({**row, "error": "; ".join(errors)})
            checks.append(False)
            continue
        time_s = median(entry["times"])
        sent = max(r["modes"][name]["bytes_sent"] for r in results)  # the busiest rank
        spec = RowSpec(name, name, "ours", ulysses=entry["ulysses"], ring=entry["ring"])
        minimum = sum(analytic_bytes_per_forward(spec, config, bench).values())
        parity = {key: max(r["modes"][name]["parity"][key] for r in results) for key in ("mean", "max")}
        row.update(
            time_s=time_s,
            speedup=reference_s / time_s if reference_s and time_s else None,
            bytes_sent=sent,
            bytes_by_op=entry["bytes_by_op"],
            bytes_minimum=minimum,
            bytes_ratio=sent / minimum if minimum else None,
            parity=parity,
            parity_ok=within_bar(parity, settings.dtype),
        )
        row["scaling_efficiency"] = row["speedup"] / world if row["speedup"] else None
        checks += [row["parity_ok"], row["bytes_ratio"] is not None and row["bytes_ratio"] <= BYTES_BAR]
        rows.append(row)
    return {"processes": world, "rows": rows, "ok": bool(checks) and all(checks),
            "build_s": max(r["build_s"] for r in results), "device": results[0]["device"]}


def check_multi_gpu(context: DoctorContext) -> dict[str, Any]:
    r"""The `multi_gpu` section; see the module docstring."""
    settings = context.settings
    if settings.device == "cuda":
        available, backend = torch.cuda.device_count(), "nccl"
        if available < 2:
            return {"skipped": True, "verdict": "skipped",
                    "reason": f"needs >= 2 GPUs (one NCCL process each); this machine has {available}"}
    elif settings.cpu_world:
        available, backend = settings.cpu_world, "gloo"
    else:
        return {"skipped": True, "verdict": "skipped",
                "reason": "needs >= 2 GPUs (one NCCL process each); this is a CPU run"}
    context.release_model()  # rank 0 shares GPU 0 with this process
    worlds = settings.multi_gpu_worlds or tuple(dict.fromkeys((available, 2)))
    reports: list[dict[str, Any]] = []
    for world in worlds:
        if world > available:
            reports.append({"processes": world, "skipped": f"only {available} devices"})
            continue
        if context.budget.spent():
            reports.append({"processes": world, "skipped": context.budget.reason})
            continue
        context.progress(f"doctor: multi-GPU run on {world} {backend} processes ...")
        try:
            results = run_distributed(_multi_gpu_worker, world, settings, backend=backend,
                                      timeout=max(context.budget.remaining(), 30.0))
        except Exception as error:  # noqa: BLE001 - a dead rank or the deadline: this world fails, the report stays
            reports.append({"processes": world, "error": describe(error), "ok": False})
            continue
        reports.append(_world_report(world, results, settings))
    ran = [report for report in reports if "skipped" not in report]
    return {
        "verdict": "pass" if ran and all(report["ok"] for report in ran) else "fail",
        "backend": backend,
        "devices": available,
        "height": settings.sizes[0][0],
        "width": settings.sizes[0][1],
        "compared": "the transformer output of one forward against the single-GPU stock output on the same rank, "
                    "|diff| divided by the reference's range, worst over every call and rank",
        "bars": {"parity": PARITY_BARS[settings.dtype], "bytes_ratio": BYTES_BAR},
        "worlds": reports,
    }

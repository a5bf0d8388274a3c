"""Section `transformer`: stock diffusers `QwenImageTransformer2DModel` against ours
(`QwenImageSPTransformer2DModel.from_transformer`, the same weights), eager and with `compile_repeated_blocks()`.

Per image size, batch 1 with a padded text mask: median time per forward of each (interleaved rounds after warm-up,
the order rotated per round), the overhead ratio ours / stock, the peak memory of one forward, and the difference of
our output from the stock one. Compiled: fresh module trees sharing the same weights are compiled (the eager ones stay
eager), the first call at each size is timed apart (compile_s = first call - steady-state median), then the
steady state is measured as eager was, and the compiled outputs are compared with the eager stock ones. Our blocks are
diffusers' own `QwenImageTransformerBlock`s, so dynamo reuses the graphs it compiled for the stock model: our first
calls show (next to) no compile time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel

from ..bench import PeakMemory, forward_inputs, rotated
from ..bench.worker import shared_stock_copy
from ..models import QwenImageSPTransformer2DModel
from .context import DoctorContext, PARITY_BARS, describe, median, range_scaled_diff, time_call, within_bar


MODELS: tuple[str, ...] = ("stock", "ours")


def _size_key(height: int, width: int) -> str:
    return f"{height}x{width}"


def _interleaved(
    models: dict[str, torch.nn.Module],
    inputs: dict[str, dict[str, Any]],
    warmup: int,
    repeats: int,
    context: DoctorContext,
    on_output: Callable[[str, str, torch.Tensor], None] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """size -> model -> {"times", "memory"}: rounds of one forward per model, the order rotated per round; the first
    round measures peak memory; `on_output(size, name, output)` sees every output."""
    device = context.device
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for size, kwargs in inputs.items():
        per_model = results[size] = {name: {"times": []} for name in models}
        for round_index in range(warmup + repeats):
            if context.budget.spent():
                for entry in per_model.values():
                    entry.setdefault("skipped", context.budget.reason)
                break
            for name in rotated(list(models), round_index):
                memory = PeakMemory(device) if round_index == 0 else None
                if memory is not None:
                    with memory:
                        output, elapsed = time_call(lambda: models[name](**kwargs)[0], device)
                    per_model[name]["memory"] = memory.summary()
                else:
                    output, elapsed = time_call(lambda: models[name](**kwargs)[0], device)
                if on_output is not None:
                    on_output(size, name, output)
                if round_index >= warmup:
                    per_model[name]["times"].append(elapsed)
                del output
    return results


def _compiled(
    stock: QwenImageTransformer2DModel,
    inputs: dict[str, dict[str, Any]],
    eager_outputs: dict[str, torch.Tensor],
    context: DoctorContext,
) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    settings, device = context.settings, context.device
    torch._dynamo.reset()
    counters.clear()
    models = {"stock": shared_stock_copy(stock), "ours": QwenImageSPTransformer2DModel.from_transformer(stock)}
    for model in models.values():
        model.compile_repeated_blocks(fullgraph=True, backend=settings.compile_backend)
    first_call: dict[str, dict[str, float]] = {size: {} for size in inputs}
    diffs: dict[str, dict[str, dict[str, float]]] = {size: {} for size in inputs}
    for size, kwargs in inputs.items():
        for name in MODELS:  # stock first: it pays the compilation
            if context.budget.spent():
                return {"skipped": True, "reason": context.budget.reason}
            context.progress(f"doctor: compiling ({settings.compile_backend}) {name} at {size} ...")
            output, first_call[size][name] = time_call(lambda: models[name](**kwargs)[0], device)
            diffs[size][name] = range_scaled_diff(output, eager_outputs[size])
            del output

    def compare(size: str, name: str, output: torch.Tensor) -> None:
        diff = range_scaled_diff(output, eager_outputs[size])
        worst = diffs[size][name]
        diffs[size][name] = {key: max(worst[key], diff[key]) for key in diff}

    steady = _interleaved(models, inputs, 0, settings.forward_repeats, context, compare)
    sizes = {}
    for size in inputs:
        entry: dict[str, Any] = {}
        for name in MODELS:
            time_s = median(steady[size][name]["times"])
            entry[name] = {
                "time_s": time_s,
                "first_call_s": first_call[size][name],
                "compile_s": None if time_s is None else max(0.0, first_call[size][name] - time_s),
                "memory": steady[size][name].get("memory"),
                "vs_eager_stock": diffs[size][name],
            }
        stock_s, ours_s = entry["stock"]["time_s"], entry["ours"]["time_s"]
        entry["overhead_ratio"] = ours_s / stock_s if stock_s and ours_s else None
        sizes[size] = entry
    return {
        "backend": settings.compile_backend,
        "fullgraph": True,
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "sizes": sizes,
    }


def check_transformer(context: DoctorContext) -> dict[str, Any]:
    r"""The `transformer` section; see the module docstring."""
    settings, device = context.settings, context.device
    dtype = settings.torch_dtype
    stock = context.stock_transformer()
    ours = QwenImageSPTransformer2DModel.from_transformer(stock)
    config = dict(stock.config)
    inputs = {
        _size_key(h, w): forward_inputs(config, settings.bench_settings(h, w), device, dtype) for h, w in settings.sizes
    }
    eager_outputs: dict[str, torch.Tensor] = {}
    ours_diffs: dict[str, dict[str, float]] = {}

    def keep(size: str, name: str, output: torch.Tensor) -> None:
        if name == "stock" and size not in eager_outputs:
            eager_outputs[size] = output.detach().clone()
        elif name == "ours" and size in eager_outputs:
            diff = range_scaled_diff(output, eager_outputs[size])
            worst = ours_diffs.get(size, {"mean": 0.0, "max": 0.0})
            ours_diffs[size] = {key: max(worst[key], diff[key]) for key in diff}

    context.progress(f"doctor: timing stock vs ours (eager) at {', '.join(inputs)} ...")
    # Rotation puts stock first in round 0, so every later output of ours is compared with the stock one.
    eager = _interleaved({"stock": stock, "ours": ours}, inputs, settings.warmup, settings.forward_repeats, context,
                         keep)
    sizes: dict[str, Any] = {}
    checks: list[bool] = []
    for (height, width), size in zip(settings.sizes, inputs):
        entry: dict[str, Any] = {
            "height": height, "width": width, "image_tokens": (height // 16) * (width // 16),
            "text_tokens": settings.text_tokens, "text_padding": settings.text_padding,
        }
        for name in MODELS:
            measured = eager[size][name]
            entry[name] = {"time_s": median(measured["times"]), "times_s": measured["times"],
                           "memory": measured.get("memory")}
            if "skipped" in measured:
                entry[name]["skipped"] = measured["skipped"]
        stock_s, ours_s = entry["stock"]["time_s"], entry["ours"]["time_s"]
        entry["overhead_ratio"] = ours_s / stock_s if stock_s and ours_s else None
        entry["ours_vs_stock"] = ours_diffs.get(size)
        if entry["ours_vs_stock"] is not None:
            checks.append(within_bar(entry["ours_vs_stock"], settings.dtype))
        if settings.overhead_bar is not None and entry["overhead_ratio"] is not None:
            checks.append(entry["overhead_ratio"] <= settings.overhead_bar)
        sizes[size] = entry

    compiled: dict[str, Any]
    if context.budget.spent():
        compiled = {"skipped": True, "reason": context.budget.reason}
    else:
        try:
            compiled = _compiled(stock, inputs, eager_outputs, context)
        except Exception as error:  # noqa: BLE001 - reported as this part's failure; the other sections still run
            compiled = {"error": describe(error)}
            checks.append(False)
    for entry in compiled.get("sizes", {}).values():
        for name in MODELS:
            checks.append(within_bar(entry[name]["vs_eager_stock"], settings.dtype))
    return {
        "verdict": "pass" if checks and all(checks) else "fail",
        "model": context.model_info,
        "bars": {"ours_vs_stock": PARITY_BARS[settings.dtype], "overhead_ratio": settings.overhead_bar,
                 "compiled_vs_eager": PARITY_BARS[settings.dtype]},
        "compared": "the transformer output (one forward), |diff| divided by the stock output's range",
        "warmup": settings.warmup,
        "repeats": settings.forward_repeats,
        "eager": sizes,
        "compiled": compiled,
    }

"""What the sections of one doctor run share: the device, the time budget, the progress callback, the random-weight
transformer (built once, on first use), and single-process timing."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bench.instrumentation import describe, synchronize  # noqa: F401 - describe: for the sections
from .settings import DoctorSettings


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    r"""`(fn(), seconds)`: the wall-clock time of one call under `no_grad`, the device's queue drained before and
    after."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = fn()
    synchronize(device)
    return output, time.perf_counter() - start


def median(values: list[float]) -> float | None:
    r"""The median of `values`, `None` when there are none."""
    return statistics.median(values) if values else None


def free_memory(device: torch.device) -> None:
    r"""Collect garbage and, on CUDA, return cached blocks, so that the next section starts from a clean heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    r"""
    The time of the whole run: `seconds` from construction. Sections ask [`Budget.spent`] before each part that can
    be left out, and report the part as skipped with [`Budget.reason`] once the time is spent; nothing is interrupted.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.remaining() <= 0

    @property
    def reason(self) -> str:
        return f"time budget spent ({self.seconds:g} s, --timeout)"

    def __repr__(self) -> str:
        return f"Budget(seconds={self.seconds:g}, elapsed={self.elapsed():.1f})"


@dataclass
class DoctorContext:
    r"""
    Shared by the sections of one run.

    Attributes:
        settings ([`DoctorSettings`]): the run's settings.
        device (`torch.device`): `cuda:0` or `cpu`.
        budget ([`Budget`]): the run's time.
        progress (`Callable[[str], None]`): receives a line per step.
        model_info (`dict`): filled when the transformer is built: parameters, build seconds, config.
    """

    settings: DoctorSettings
    device: torch.device
    budget: Budget
    progress: Callable[[str], None]
    model_info: dict[str, Any] = field(default_factory=dict)
    _stock: torch.nn.Module | None = field(default=None, repr=False)

    def stock_transformer(self) -> torch.nn.Module:
        r"""The stock diffusers `QwenImageTransformer2DModel` with random weights on the device, built on first use
        (`materialize_random_transformer`: never in fp32 or on the host, nothing downloaded)."""
        if self._stock is None:
            from ..bench import materialize_random_transformer

            settings = self.settings
            config = settings.transformer_config()
            self.progress(
                f"doctor: building a random {config['num_layers']}-layer, {config['num_attention_heads']} x "
                f"{config['attention_head_dim']} Qwen-Image transformer ({settings.dtype}) on {self.device} ..."
            )
            start = time.perf_counter()
            self._stock = materialize_random_transformer(config, self.device, settings.torch_dtype, settings.seed)
            synchronize(self.device)
            self.model_info = {
                "parameters": sum(p.numel() for p in self._stock.parameters()),
                "build_s": time.perf_counter() - start,
                "dtype": settings.dtype,
                "config": {key: value for key, value in config.items() if not key.startswith("_")},
            }
        return self._stock

    def release_model(self) -> None:
        r"""Drop the transformer (the multi-GPU section's rank 0 needs the whole of GPU 0)."""
        self._stock = None
        free_memory(self.device)


# Parity bars on outputs scaled to [0, 1] by the reference's range (`range_scaled_diff`): the peers' bar for SP in
# half precision (mean |diff| <= 2e-2, max <= 2e-1 on [0, 1] images), and ours in float32.
PARITY_BARS: dict[str, dict[str, float]] = {
    "float32": {"mean": 1e-5, "max": 1e-4},
    "bfloat16": {"mean": 2e-2, "max": 2e-1},
    "float16": {"mean": 2e-2, "max": 2e-1},
}


def range_scaled_diff(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    r"""`{"mean", "max"}` of `|output - reference| / (max(reference) - min(reference))`: the difference as if both
    were mapped to [0, 1] by the reference's range (how the peers' image bar reads at transformer level). Non-finite
    differences count as `inf`."""
    reference = reference.detach().float()
    scale = (reference.max() - reference.min()).item() or 1.0
    diff = (output.detach().float().to(reference.device) - reference).abs() / scale
    mean, largest = diff.mean().item(), diff.max().item()
    return {"mean": mean if math.isfinite(mean) else math.inf, "max": largest if math.isfinite(largest) else math.inf}


def within_bar(diff: dict[str, float], dtype: str) -> bool:
    r"""Whether a `{"mean", "max"}` difference meets the parity bar of `dtype` ([`PARITY_BARS`])."""
    bar = PARITY_BARS[dtype]
    return diff["mean"] <= bar["mean"] and diff["max"] <= bar["max"]

"""The settings of one doctor run ([`DoctorSettings`]), its two presets (the GPU check and `--small`, its CPU proof),
the section names, and where the results go."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch


# The sections, in the order they run. `multi_gpu` runs last: it frees the single-process model first, so that its
# rank 0 has the whole of GPU 0.
SECTIONS: tuple[str, ...] = ("environment", "attention", "transformer", "teacache", "multi_gpu")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# Where the results go unless `output_dir` says otherwise: `<this>/<device slug>/`, relative to the working directory.
RESULTS_ROOT = Path("benchmarks") / "results"
# Pixels per image token: the Qwen-Image VAE downsamples by 8 and the transformer patches 2x2.
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class DoctorSettings:
    r"""
    Everything one doctor run needs; picklable (the multi-GPU section sends it to its ranks). Build it with
    [`DoctorSettings.from_preset`] rather than field by field.

    Args:
        preset (`str`): `"gpu"` (the full check, on CUDA) or `"small"` (the same code on a tiny model on the CPU).
        device (`str`): `"cuda"` or `"cpu"`.
        sections (`tuple[str, ...]`): a subset of [`SECTIONS`]; the others are reported as not selected.
        output_dir (`str`, *optional*): defaults to `benchmarks/results/<device slug>/`.
        timeout (`float`): seconds for the whole run. A part that has not started when they are spent is reported as
            skipped (a running CUDA call cannot be interrupted); spawned multi-GPU runs are killed at the deadline.
        threads (`int`, *optional*): intra-op CPU threads during the run (restored afterwards); `None` leaves them.
        full_size (`bool`): the real Qwen-Image config (60 layers, 24 heads x 128), else `layers x heads x head_dim`.
        dtype (`str`): the transformer's dtype.
        sizes (`tuple[tuple[int, int], ...]`): (height, width) in pixels of the transformer section, multiples of 16.
        text_tokens, text_padding (`int`): text length, of which the last `text_padding` tokens are masked.
        warmup, forward_repeats (`int`): untimed and timed rounds per forward measurement (medians are reported).
        compile_backend (`str`): the `torch.compile` backend of `compile_repeated_blocks`.
        overhead_bar (`float`, *optional*): largest accepted (ours / stock) forward time; `None`: reported only.
        attention_dtypes (`tuple[str, ...]`): dtypes of the attention check.
        attention_shapes (`tuple[tuple[int, int], ...]`): (query length, key length) pairs.
        attention_batch, attention_heads, attention_head_dim, attention_repeats (`int`): the attention problem.
        teacache_threshold, teacache_steps, teacache_repeats, cfg_scale: the TeaCache run (at `sizes[0]`).
        teacache_efficiency_bar (`float`, *optional*): smallest accepted (measured speed-up / ideal speed-up).
        multi_gpu_worlds (`tuple[int, ...]`, *optional*): process counts to spawn; `None`: every GPU, then 2.
        multi_gpu_repeats (`int`): timed rounds per mode in the multi-GPU section.
        cpu_world (`int`): with `device="cpu"`, run the multi-GPU section on this many gloo processes instead of
            skipping it (proves the section's code on CPU; tests). 0 skips.
        seed (`int`): weights and inputs.
    """

    preset: str = "small"
    device: str = "cpu"
    sections: tuple[str, ...] = SECTIONS
    output_dir: str | None = None
    timeout: float = 120.0
    threads: int | None = 1
    full_size: bool = False
    layers: int = 2
    heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"
    sizes: tuple[tuple[int, int], ...] = ((128, 128), (176, 176))
    text_tokens: int = 16
    text_padding: int = 4
    warmup: int = 1
    forward_repeats: int = 3
    compile_backend: str = "aot_eager"
    overhead_bar: float | None = None
    attention_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    attention_shapes: tuple[tuple[int, int], ...] = ((1027, 1027), (37, 61))
    attention_batch: int = 2
    attention_heads: int = 4
    attention_head_dim: int = 32
    attention_repeats: int = 3
    teacache_threshold: float = 0.2
    teacache_steps: int = 10
    teacache_repeats: int = 2
    teacache_efficiency_bar: float | None = None
    cfg_scale: float = 4.0
    multi_gpu_worlds: tuple[int, ...] | None = None
    multi_gpu_repeats: int = 3
    cpu_world: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")
        unknown = [name for name in self.sections if name not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {list(SECTIONS)}, got {list(self.sections)}.")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}.")
        for name in ("layers", "heads", "head_dim", "text_tokens", "warmup", "forward_repeats", "attention_batch",
                     "attention_heads", "attention_head_dim", "attention_repeats", "teacache_repeats",
                     "multi_gpu_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}.")
        if not 0 <= self.text_padding < self.text_tokens:
            raise ValueError(f"text_padding must be in [0, text_tokens={self.text_tokens}), got {self.text_padding}.")
        for dtype in (self.dtype, *self.attention_dtypes):
            if dtype not in DTYPES:
                raise ValueError(f"dtypes must be among {list(DTYPES)}, got {dtype!r}.")
        if not self.sizes or not self.attention_shapes or not self.attention_dtypes:
            raise ValueError("sizes, attention_shapes and attention_dtypes must not be empty.")
        for height, width in self.sizes:
            if min(height, width) < PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
                raise ValueError(
                    f"sizes must be (height, width) in positive multiples of 16 px, got {(height, width)}."
                )
        for seq_q, seq_k in self.attention_shapes:
            if seq_q < 1 or seq_k < 1:
                raise ValueError(f"attention_shapes must be positive (Sq, Sk), got {(seq_q, seq_k)}.")
        if self.teacache_steps < 2:
            raise ValueError(f"teacache_steps must be >= 2 (the first and last are always computed), got "
                             f"{self.teacache_steps}.")
        if not self.cfg_scale > 1:
            raise ValueError(f"cfg_scale must be > 1 (the TeaCache run uses true CFG), got {self.cfg_scale}.")
        if self.multi_gpu_worlds is not None and any(world < 2 for world in self.multi_gpu_worlds):
            raise ValueError(f"multi_gpu_worlds must be process counts >= 2, got {list(self.multi_gpu_worlds)}.")
        if not isinstance(self.cpu_world, int) or self.cpu_world < 0 or self.cpu_world == 1:
            raise ValueError(f"cpu_world must be 0 (skip) or >= 2, got {self.cpu_world!r}.")

    @classmethod
    def from_preset(cls, small: bool = False, **overrides: Any) -> DoctorSettings:
        r"""
        The settings of the GPU check (`small=False`: CUDA is required) or of `--small` (the CPU proof), with
        `overrides` (field names; `None` values keep the preset's).

        Raises:
            `ValueError`: the GPU check without CUDA, or an invalid value.
        """
        name = "small" if small else "gpu"
        if name == "gpu" and not torch.cuda.is_available():
            raise ValueError(
                "The full doctor checks a GPU, and torch.cuda.is_available() is False here. Run `python -m "
                "diffusers_qwen_sp doctor --small` to prove the check on the CPU."
            )
        values = dict(PRESETS[name])
        known = {item.name for item in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"Unknown doctor setting {key!r}; known: {sorted(known)}.")
            if value is not None:
                values[key] = value
        return cls(preset=name, **values)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def transformer_config(self) -> dict[str, Any]:
        r"""The config of the transformer the sections build: Qwen-Image's own, or the tiny one."""
        from ..bench import BenchSettings, mid_size_config, transformer_config

        if self.full_size:
            return transformer_config(BenchSettings(full_size=True))
        return mid_size_config(self.layers, self.heads, self.head_dim)

    def bench_settings(self, height: int, width: int, steps: int = 2) -> Any:
        r"""The `BenchSettings` that the bench's input builders (`forward_inputs`, `pipeline_inputs`) and its analytic
        byte counts read: image size, text length and padding, steps, CFG scale, dtype, seed."""
        from ..bench import BenchSettings

        return BenchSettings(
            device=self.device, height=height, width=width, text_tokens=self.text_tokens,
            text_padding=self.text_padding, steps=steps, cfg_scale=self.cfg_scale, dtype=self.dtype, seed=self.seed,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # One H100/H200-class GPU, under 8 minutes (see the package docstring for where the time goes).
    "gpu": dict(
        device="cuda", timeout=480.0, threads=None, full_size=True, dtype="bfloat16",
        sizes=((1024, 1024), (1328, 1328)), text_tokens=128, text_padding=32, warmup=1, forward_repeats=3,
        compile_backend="inductor", overhead_bar=1.10, attention_dtypes=("bfloat16", "float16"),
        attention_heads=24, attention_head_dim=128, attention_repeats=5, teacache_steps=50, teacache_repeats=1,
        teacache_efficiency_bar=0.85, multi_gpu_repeats=3,
    ),
    # The same code on a tiny model on 2 busy CPU cores, under 2 minutes.
    "small": dict(device="cpu"),
}


def device_slug(settings: DoctorSettings) -> str:
    r"""The results folder name of this machine: the GPU's name (`"NVIDIA H200"` -> `"nvidia-h200"`), `"cpu"`;
    `-small` appended for the small preset."""
    if settings.device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
    return f"{slug}-small" if settings.preset == "small" else slug


def output_dir(settings: DoctorSettings) -> Path:
    r"""Where the run writes `doctor.json` and `doctor.md`."""
    if settings.output_dir:
        return Path(settings.output_dir)
    return RESULTS_ROOT / device_slug(settings)

"""The settings of one bench run: [`BenchSettings`], the presets, and the options of `python -m diffusers_qwen_sp
bench` that resolve into them ([`add_bench_arguments`], [`settings_from_args`])."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

import torch


# Pixels per image token: the Qwen-Image VAE downsamples by 8 and the transformer patches 2x2.
PIXELS_PER_TOKEN = 16
# Row kinds, selectable with --rows.
ROW_KEYS: tuple[str, ...] = (
    "stock", "ours", "ulysses", "ring", "usp", "diffusers-cp", "cfg-parallel", "teacache", "sp-teacache", "compiled",
    "ulysses-compiled",
)
# The rows of a run without --rows: all but the compiled ones on CPU, where inductor's first compile takes minutes.
DEFAULT_ROWS: tuple[str, ...] = tuple(key for key in ROW_KEYS if not key.endswith("compiled"))
PHASES: tuple[str, ...] = ("forward", "image")


@dataclass(frozen=True)
class BenchSettings:
    r"""
    Everything one bench run needs; picklable, so it travels to the spawned ranks.

    `device` is `"cpu"` or `"cuda"`; `world` the number of processes (gloo on CPU, one per GPU with NCCL). The model
    is `model` (a checkpoint folder or Hub id), else the real Qwen-Image config when `full_size`, else a mid-size
    config of `layers` blocks of `heads x head_dim`. Images are `height x width` pixels (multiples of 16, one image
    token per 16x16 pixels), with `text_tokens` text tokens of which the last `text_padding` are masked.
    """

    device: str = "cpu"
    world: int = 2
    model: str | None = None
    full_size: bool = False
    layers: int = 4
    heads: int = 8
    head_dim: int = 64
    height: int = 256
    width: int = 512
    text_tokens: int = 64
    text_padding: int = 16
    steps: int = 8
    cfg_scale: float = 4.0
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.4)
    forward_repeats: int = 9
    image_repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"
    threads: int = 1
    seed: int = 0
    timeout: float = 1200.0
    rows: tuple[str, ...] = DEFAULT_ROWS
    phases: tuple[str, ...] = PHASES
    scaling: bool = True
    preset: str = "cpu"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")
        for name in ("world", "layers", "heads", "head_dim", "steps", "forward_repeats", "image_repeats", "warmup",
                     "threads", "text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (TeaCache always computes the first and the last), got {self.steps}.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
                lower = max(PIXELS_PER_TOKEN, value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN)
                raise ValueError(
                    f"{name}={value} is not a positive multiple of {PIXELS_PER_TOKEN} (8x VAE x 2x2 patches); use "
                    f"{lower} or {lower + PIXELS_PER_TOKEN}."
                )
        if not 0 <= self.text_padding < self.text_tokens:
            raise ValueError(
                f"text_padding must be in [0, text_tokens={self.text_tokens}), got {self.text_padding}."
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 (three even RoPE axes), got {self.head_dim}.")
        if any(not math.isfinite(t) or t < 0 for t in self.thresholds) or len(set(self.thresholds)) != len(
            self.thresholds
        ):
            raise ValueError(f"TeaCache thresholds must be distinct finite numbers >= 0, got {list(self.thresholds)}.")
        unknown = sorted(set(self.rows) - set(ROW_KEYS))
        if unknown or "stock" not in self.rows:
            raise ValueError(
                f"rows must be a subset of {list(ROW_KEYS)} that includes 'stock' (the reference of every ratio), got "
                f"{list(self.rows)}."
            )
        if not self.phases or set(self.phases) - set(PHASES):
            raise ValueError(f"phases must be a non-empty subset of {list(PHASES)}, got {list(self.phases)}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        if not self.cfg_scale > 1:
            raise ValueError(f"cfg_scale must be > 1 (the rows run true CFG), got {self.cfg_scale}.")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive (seconds), got {self.timeout}.")

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) in image tokens."""
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def transformer_calls(self) -> int:
        """Transformer calls per image: one per step and CFG branch."""
        return 2 * self.steps

    @property
    def combined_threshold(self) -> float | None:
        """The TeaCache threshold of the "SP + TeaCache" row: 0.2 when measured, else the middle one."""
        if not self.thresholds:
            return None
        return 0.2 if 0.2 in self.thresholds else sorted(self.thresholds)[len(self.thresholds) // 2]


# Defaults per preset; command-line values override them.
PRESETS: dict[str, dict[str, Any]] = {
    # About 1 min 45 s on 2 idle CPU cores (3 min when other jobs keep them busy).
    "cpu": dict(layers=4, heads=8, head_dim=64, height=256, width=512, text_tokens=64, text_padding=16, steps=8,
                forward_repeats=9, image_repeats=3, warmup=1, dtype="float32", timeout=1200.0),
    # The test's configuration: seconds.
    "quick": dict(layers=2, heads=4, head_dim=16, height=128, width=128, text_tokens=16, text_padding=4, steps=4,
                  forward_repeats=2, image_repeats=1, warmup=1, timeout=300.0),
    # Full-size Qwen-Image at 1024x1024 in bf16 (one batch-1 prompt: no text padding).
    "cuda": dict(full_size=True, height=1024, width=1024, text_tokens=128, text_padding=0, steps=20,
                 forward_repeats=5, image_repeats=2, warmup=1, dtype="bfloat16", timeout=3600.0, rows=ROW_KEYS),
}


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    r"""Add the options of `python -m diffusers_qwen_sp bench` to `parser` (see [`run_bench`])."""
    parser.add_argument("--output-dir", default="bench-results",
                        help="folder for bench.json, bench.md and bench.png (default: bench-results/)")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (tests)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default: cuda when available (one NCCL process per GPU), else cpu (gloo)")
    parser.add_argument("--world", type=_positive_int, default=None,
                        help="processes to spawn (default: 2 on CPU, every GPU on CUDA)")
    parser.add_argument("--model", default=None,
                        help="local Qwen-Image checkpoint (pipeline or transformer folder); default: random weights")
    parser.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=None,
                        help="random weights in the real Qwen-Image config (60 layers, 24 heads x 128); the CUDA "
                        "default (--no-full-size, or --layers/--heads/--head-dim, for the mid-size model there)")
    model = parser.add_argument_group("mid-size random model (CPU default: 4 layers, 8 heads x 64)")
    model.add_argument("--layers", type=_positive_int, default=None)
    model.add_argument("--heads", type=_positive_int, default=None)
    model.add_argument("--head-dim", type=_positive_int, default=None)
    work = parser.add_argument_group("workload")
    work.add_argument("--height", type=_positive_int, default=None,
                      help="pixels, multiple of 16 (CPU: 256, CUDA: 1024)")
    work.add_argument("--width", type=_positive_int, default=None, help="pixels, multiple of 16 (CPU: 512, CUDA: 1024)")
    work.add_argument("--text-tokens", type=_positive_int, default=None, help="text sequence length (CPU: 64)")
    work.add_argument("--text-padding", type=int, default=None, help="masked text tokens at the end (CPU: 16)")
    work.add_argument("--steps", type=_positive_int, default=None, help="denoising steps per image (CPU: 8, CUDA: 20)")
    work.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale (default: 4.0)")
    work.add_argument("--thresholds", type=float, nargs="+", default=None,
                      help="TeaCache thresholds (default: 0.1 0.2 0.4)")
    work.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="default: float32 on CPU, bfloat16 on CUDA")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--forward-repeats", type=_positive_int, default=None, help="timed rounds of forwards")
    timing.add_argument("--image-repeats", type=_positive_int, default=None, help="timed rounds of images")
    timing.add_argument("--warmup", type=_positive_int, default=None, help="untimed rounds first (default: 1)")
    timing.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads per CPU rank (default 1)")
    timing.add_argument("--seed", type=int, default=None)
    timing.add_argument("--timeout", type=float, default=None, help="seconds for each spawned run")
    parser.add_argument("--rows", type=_csv, default=None,
                        help=f"comma-separated subset of {','.join(ROW_KEYS)} (stock is always measured; default: "
                        "all but the compiled rows on CPU, all on CUDA)")
    parser.add_argument("--phases", type=_csv, default=None, help="forward,image (default: both)")
    parser.add_argument("--no-scaling", action="store_true", help="CUDA: skip the extra runs at fewer GPUs")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    r"""Resolve the preset (quick, cpu or cuda) and the explicit options into [`BenchSettings`]."""
    device = getattr(args, "device", "auto") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False.")
    preset = "quick" if getattr(args, "quick", False) else device
    values: dict[str, Any] = dict(PRESETS[preset])
    values["preset"] = preset
    values["device"] = device
    for item in fields(BenchSettings):
        name = item.name
        given = getattr(args, name, None)
        if given is not None and name not in ("device", "preset"):
            values[name] = tuple(given) if isinstance(given, list) else given
    if getattr(args, "dtype", "auto") in (None, "auto"):
        values["dtype"] = "bfloat16" if device == "cuda" else "float32"
    if getattr(args, "world", None) is None:
        values["world"] = torch.cuda.device_count() if device == "cuda" else 2
    if getattr(args, "no_scaling", False):
        values["scaling"] = False
    explicit_full_size = getattr(args, "full_size", None)
    if explicit_full_size is None and any(getattr(args, name, None) for name in ("layers", "heads", "head_dim")):
        values["full_size"] = False  # asking for a model shape means the mid-size model
    if preset == "quick" and explicit_full_size is None:
        values["full_size"] = False
    if values.get("model") is not None:
        values["full_size"] = False
    return BenchSettings(**values)

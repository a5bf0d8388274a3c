"""`python -m diffusers_qwen_sp bench`: measure this machine and write JSON, a Markdown table and a PNG plot.

One run measures, on a random-weight Qwen-Image transformer (or a checkpoint with `--model`):

- **per forward**: the stock diffusers forward in one process (the reference of every ratio), ours without sequence
  parallelism, our Ulysses, Ring (and Ulysses x Ring with 4+ processes), diffusers' own context parallelism
  (`enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`) where it runs;
- **per image**: the same rows driving a whole denoising loop (`QwenImagePipeline` / `QwenImageSPPipeline` called
  with prompt embeddings, true CFG, `output_type="latent"`: the text encoder and the VAE decode, the same for every
  row, are not timed), plus CFG parallel, TeaCache at several thresholds and TeaCache under Ulysses;
- **peak memory per rank** (CUDA: `torch.cuda.max_memory_allocated`; CPU: the resident-set high-water mark, reset
  before each measured call through `/proc/self/clear_refs`), **bytes each rank sends per forward** (our collectives
  through `count_communication`, diffusers' through wrappers) against the analytic minimum of each algorithm, and the
  **drift** of every row from the stock one (max |diff| of the forward, PSNR of the final latents).

Every ratio is taken between rows measured in the same run, interleaved (each round runs every row once, in an order
rotated per round) and as medians after warm-up, so the ratios hold on a noisy machine. Single-process rows run on
every rank at once (each rank its own replica), so they see the same contention as the parallel rows; a row's time is
its slowest rank's.

On CPU the bench spawns `--world` gloo processes (default 2, one intra-op thread each: "one core per rank" stands in
for "one GPU per rank") and uses a mid-size model. On CUDA it spawns one NCCL process per GPU, uses the full-size
Qwen-Image transformer (60 layers, 24 heads x 128) materialised from the meta device with random bf16 weights on each
GPU (nothing is downloaded), or `--model PATH`, and adds SP scaling over 1, 2, 4, 8 GPUs as available.

The weights are random unless `--model` is given: PSNR then measures how far a cached trajectory drifts from the
uncached one on this model, not image quality.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import (
    ContextParallelConfig,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.utils import logging

from .distributed import count_communication
from .hooks import SequenceParallelConfig, TeaCacheConfig, teacache_stats
from .models import QwenImageSPTransformer2DModel
from .pipelines import QwenImageSPPipeline
from .testing.multiprocess import run_distributed
from .testing.tiny import tiny_scheduler_config


logger = logging.get_logger(__name__)

__all__ = [
    "ROW_KEYS",
    "BenchSettings",
    "RowSpec",
    "add_bench_arguments",
    "analytic_bytes_per_forward",
    "count_diffusers_cp",
    "cpu_accelerator_count",
    "materialize_random_transformer",
    "plan_rows",
    "psnr",
    "rope_axes",
    "rotated",
    "run_bench",
    "settings_from_args",
    "step_ranges",
]

# Pixels per image token: the Qwen-Image VAE downsamples by 8 and the transformer patches 2x2.
PIXELS_PER_TOKEN = 16
# Row kinds, selectable with --rows.
ROW_KEYS: tuple[str, ...] = (
    "stock", "ours", "ulysses", "ring", "usp", "diffusers-cp", "cfg-parallel", "teacache", "sp-teacache"
)
PHASES: tuple[str, ...] = ("forward", "image")
# Rounds of a row spreading more than this fraction of their median get the row named as noisy.
NOISY_SPREAD = 0.2
# Parity bar of the fp32 test suite: a forward that differs more than this from the stock one is flagged.
FP32_TOLERANCE = 1e-4
PSNR_NOTE = (
    "PSNR compares the final latents of a row with the stock row's (peak = the stock latents' range). With random "
    "weights it measures how far a cached trajectory drifts from the uncached one on this model; it is no judgement "
    "of image quality."
)


# ---------------------------------------------------------------------------------------------------------------------
# Settings and the plan of rows
# ---------------------------------------------------------------------------------------------------------------------


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
    rows: tuple[str, ...] = ROW_KEYS
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


@dataclass(frozen=True)
class RowSpec:
    r"""One row of the bench: which transformer, parallelism and cache; `unavailable` says why it cannot run here."""

    key: str
    name: str
    kind: str  # "stock", "ours" or "diffusers_cp"
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    teacache: float | None = None
    per_forward: bool = True
    per_image: bool = True
    unavailable: str = ""

    @property
    def processes(self) -> int:
        """Processes that work on one image (1: a single-process row, run as a replica on every rank)."""
        return self.ulysses * self.ring * self.cfg

    @property
    def parallel(self) -> bool:
        return self.processes > 1


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    r"""RoPE axes (frame, height, width) for `head_dim`, in Qwen-Image's proportions ((16, 56, 56) for 128): they sum
    to `head_dim` and are even (complex pairs)."""
    frame_axis = max(2, head_dim // 8 // 2 * 2)
    side_axis = (head_dim - frame_axis) // 4 * 2
    return frame_axis, side_axis, head_dim - frame_axis - side_axis


def mid_size_config(layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    r"""A Qwen-Image transformer config of `layers` blocks of `heads x head_dim`, with the real model's channels."""
    return dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=heads * head_dim,
        guidance_embeds=False,
        axes_dims_rope=rope_axes(head_dim),
    )


def _model_location(model: str) -> tuple[str, str | None]:
    """(path, subfolder): a pipeline's transformer lives in `transformer/` (a local folder holding `config.json`
    itself is a transformer folder; a Hub id is taken for a pipeline repo such as Qwen/Qwen-Image)."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return model, None
    return model, "transformer"


def transformer_config(settings: BenchSettings) -> dict[str, Any]:
    r"""The config of the transformer the bench runs (read from `settings.model` when given)."""
    if settings.model is not None:
        path, subfolder = _model_location(settings.model)
        config = dict(QwenImageTransformer2DModel.load_config(path, subfolder=subfolder))
        return {key: value for key, value in config.items() if not key.startswith("_")}
    if settings.full_size:
        return _full_size_config()
    return mid_size_config(settings.layers, settings.heads, settings.head_dim)


def _full_size_config() -> dict[str, Any]:
    # The stock defaults are the real Qwen-Image config; read them off the signature without building the model.
    import inspect

    parameters = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self" and p.default is not p.empty}


def plan_rows(settings: BenchSettings, heads: int) -> list[RowSpec]:
    r"""
    The rows of one run over `settings.world` processes, stock first. Rows that cannot run here carry the reason in
    `unavailable`; rows of a phase that is off are left out.
    """
    world = settings.world
    rows: list[RowSpec] = []
    want = set(settings.rows)
    image = "image" in settings.phases
    forward = "forward" in settings.phases

    def needs_world(ulysses: int = 1, ring: int = 1, cfg: int = 1) -> str:
        if world < 2:
            return f"needs >= 2 processes, the run has {world}"
        if ulysses > 1 and heads % ulysses:
            return f"Ulysses degree {ulysses} does not divide the {heads} attention heads"
        if ulysses * ring * cfg != world:
            return f"needs {ulysses * ring * cfg} processes, the run has {world}"
        return ""

    rows.append(RowSpec("stock", "stock diffusers", "stock", per_image=image, per_forward=forward))
    if "ours" in want:
        rows.append(RowSpec("ours", "ours, no SP", "ours", per_image=image, per_forward=forward))
    if "ulysses" in want:
        rows.append(RowSpec("ulysses", f"ours Ulysses {world}", "ours", ulysses=world, per_image=image,
                            per_forward=forward, unavailable=needs_world(ulysses=world)))
    if "ring" in want:
        rows.append(RowSpec("ring", f"ours Ring {world}", "ours", ring=world, per_image=image, per_forward=forward,
                            unavailable=needs_world(ring=world)))
    if "usp" in want and world >= 4 and world % 2 == 0:
        ulysses = world // 2
        rows.append(RowSpec("usp", f"ours Ulysses {ulysses} x Ring 2", "ours", ulysses=ulysses, ring=2,
                            per_image=image, per_forward=forward, unavailable=needs_world(ulysses=ulysses, ring=2)))
    if "diffusers-cp" in want:
        rows.append(RowSpec("diffusers-cp", f"diffusers CP Ulysses {world}", "diffusers_cp", ulysses=world,
                            per_image=image, per_forward=forward, unavailable=needs_world(ulysses=world)))
    if image and "cfg-parallel" in want:
        sp = max(1, world // 2)
        name = "ours CFG parallel 2" + (f" x Ulysses {sp}" if sp > 1 else "")
        reason = (needs_world(ulysses=sp, cfg=2) if world < 2 or world % 2 == 0
                  else f"needs an even number of processes, got {world}")
        rows.append(RowSpec("cfg-parallel", name, "ours", ulysses=sp, cfg=2, per_forward=False, unavailable=reason))
    if image and "teacache" in want:
        for threshold in settings.thresholds:
            rows.append(RowSpec("teacache", f"ours + TeaCache {threshold:g}", "ours", teacache=threshold,
                                per_forward=False))
    if image and "sp-teacache" in want and settings.combined_threshold is not None:
        threshold = settings.combined_threshold
        rows.append(RowSpec("sp-teacache", f"ours Ulysses {world} + TeaCache {threshold:g}", "ours", ulysses=world,
                            teacache=threshold, per_forward=False, unavailable=needs_world(ulysses=world)))
    return [row for row in rows if row.per_forward or row.per_image]


def scaling_rows(processes: int, heads: int) -> list[RowSpec]:
    r"""The rows of an SP-scaling run over `processes` processes: stock (the reference) and ours Ulysses and Ring."""
    ulysses_reason = ""
    if heads % processes:
        ulysses_reason = f"Ulysses degree {processes} does not divide the {heads} attention heads"
    return [
        RowSpec("stock", "stock diffusers", "stock", per_image=False),
        RowSpec("ulysses", f"ours Ulysses {processes}", "ours", ulysses=processes, per_image=False,
                unavailable=ulysses_reason),
        RowSpec("ring", f"ours Ring {processes}", "ours", ring=processes, per_image=False),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Analytic minimum of the bytes one rank sends per forward
# ---------------------------------------------------------------------------------------------------------------------


def analytic_bytes_per_forward(
    row: RowSpec, config: dict[str, Any], settings: BenchSettings, batch: int = 1
) -> dict[str, float]:
    r"""
    Per-term minimum bytes one rank sends in one forward of `row` (exact `S / P`, no padding), by the counting
    convention of `count_communication`: a rank's own chunk of an all-to-all is not counted; an all-gather of an
    `n`-byte chunk sends `n` to each of the `P - 1` others. Empty for single-process rows.

    With `B` batch, `S` image and `T` text tokens, `H x D` heads, `L` layers, `P = U * R` processes, `e` bytes per
    element and `row = B * H * D * e`:

    - proj_out gather (every SP row): `B * (S/P) * C * e * (P - 1)` with `C = patch^2 * out_channels`;
    - ours, per layer: Q, K, V all-to-all `3 * (S/P) * row * (U-1)/U`, image output all-to-all back
      `(S/P) * row * (U-1)/U`, text output of our `H/U` heads to the other Ulysses ranks `T * row/U * (U-1)`, K and V
      image blocks passed `R - 1` times around the ring `(R-1) * 2 * (S/R) * row/U` (text is replicated: no text
      traffic in the ring);
    - diffusers CP Ulysses, per layer: Q, K, V, out all-to-alls of the joint `[text, image]` chunk
      `4 * ((S+T)/P) * row * (P-1)/P`, plus the all-gather of the joint boolean mask chunk `B * ((S+T)/P) * (P-1)`
      when the text is padded.
    """
    if not row.parallel or row.kind == "stock":
        return {}
    S, T, B = settings.image_tokens, settings.text_tokens, batch
    H, D, L = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    e = settings.torch_dtype.itemsize
    C = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    U, R = row.ulysses, row.ring
    P = U * R
    line = B * H * D * e
    if row.cfg > 1:
        return {}  # per image only: the exchange of predictions, not a per-forward quantity
    terms: dict[str, float] = {"proj_out gather": B * (S / P) * C * e * (P - 1)}
    if row.kind == "diffusers_cp":
        terms["q,k,v,out all-to-all (joint)"] = L * 4 * ((S + T) / P) * line * (P - 1) / P
        if settings.text_padding:
            terms["joint mask all-gather"] = L * B * ((S + T) / P) * 1 * (P - 1)
        return terms
    if U > 1:
        terms["q,k,v all-to-all"] = L * 3 * (S / P) * line * (U - 1) / U
        terms["out all-to-all (image)"] = L * (S / P) * line * (U - 1) / U
        terms["text heads gather"] = L * T * (line / U) * (U - 1)
    if R > 1:
        terms["K/V ring passes"] = L * (R - 1) * 2 * (S / R) * line / U
    return terms


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' context parallelism on CPU, and counting its bytes (patches live only inside the bench's processes)
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_accelerator_count() -> Iterator[None]:
    r"""
    Make `torch.accelerator.device_count()` at least 1 inside the block.

    diffusers' `ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is
    `rank % 0` without an accelerator (ZeroDivisionError). With 1, the device becomes `cpu:0` and the device mesh is
    built on gloo; nothing else of diffusers' context parallelism changes. A no-op where an accelerator exists.
    """
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, original())
    try:
        yield
    finally:
        torch.accelerator.device_count = original


@dataclass
class ByteCounter:
    bytes_sent: int = 0
    calls: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.calls += 1


@contextlib.contextmanager
def _patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """Replace `owner.name` by `make(owner.name)` inside the block; restore the raw attribute (e.g. a classmethod)."""
    raw = vars(owner)[name]
    setattr(owner, name, make(getattr(owner, name)))
    try:
        yield
    finally:
        setattr(owner, name, raw)


@contextlib.contextmanager
def count_diffusers_cp(world: int) -> Iterator[dict[str, ByteCounter]]:
    r"""
    Count the bytes diffusers' context parallelism sends on this rank inside the block: its all-to-all
    (`attention_dispatch._all_to_all_single`), its attention-mask all-gather (`torch.distributed.all_gather`) and its
    output gather (`EquipartitionSharder.unshard`), with the convention of `count_communication`. For untimed calls
    only.
    """
    from diffusers.hooks import context_parallel
    from diffusers.models import attention_dispatch

    counters = {name: ByteCounter() for name in ("all_to_all", "mask all_gather", "proj_out gather")}

    def make_all_to_all(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(x: torch.Tensor, group: Any) -> torch.Tensor:
            counters["all_to_all"].add(x.numel() * x.element_size() * (world - 1) // world)
            return original(x, group)

        return wrapped

    def make_all_gather(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counters["mask all_gather"].add(tensor.numel() * tensor.element_size() * (world - 1))
            return original(tensor_list, tensor, *args, **kwargs)

        return wrapped

    def make_unshard(original: Any) -> Any:
        def wrapped(cls: type, tensor: torch.Tensor, dim: int, mesh: Any) -> torch.Tensor:
            counters["proj_out gather"].add(tensor.numel() * tensor.element_size() * (world - 1))
            return original(tensor, dim, mesh)  # `original` is already bound to the class

        return classmethod(wrapped)

    with (
        _patched(attention_dispatch, "_all_to_all_single", make_all_to_all),
        _patched(dist, "all_gather", make_all_gather),
        _patched(context_parallel.EquipartitionSharder, "unshard", make_unshard),
    ):
        yield counters


@contextlib.contextmanager
def _count_bytes(kind: str, world: int) -> Iterator[dict[str, Any]]:
    """Bytes this rank sends inside the block, as `{"total", "by_op", "calls"}` (filled when the block exits)."""
    summary: dict[str, Any] = {}
    if kind == "diffusers_cp":
        with count_diffusers_cp(world) as counters:
            yield summary
        summary["by_op"] = {op: c.bytes_sent for op, c in counters.items() if c.calls}
        summary["calls"] = {op: c.calls for op, c in counters.items() if c.calls}
    else:
        with count_communication() as stats:  # every collective of ours: attention, SP gather, CFG, TeaCache
            yield summary
        summary["by_op"] = dict(stats.bytes_sent_by_op)
        summary["calls"] = dict(stats.calls)
    summary["total"] = sum(summary["by_op"].values())


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    # Hand freed heap pages back to the OS, so the idle RSS before a measured call is the live data, not what an
    # earlier row freed.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    r"""
    Peak memory of this rank during a block of calls, with what was in use just before ("idle").

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. CPU on Linux: the resident-set high-water
    mark `VmHWM`, reset to the current RSS by writing 5 to `/proc/self/clear_refs`. Elsewhere: `ru_maxrss`, the
    high-water mark of the whole process so far (no "above idle").
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.idle = 0
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.idle = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _malloc_trim()
        rss = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            reset = rss is not None
        except OSError:
            reset = False
        if reset:
            self.idle = rss * 1024
            self.method = "VmHWM (RSS high-water mark, reset per call)"
        else:
            self.idle = 0
            self.method = "ru_maxrss (process high-water mark)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def summary(self) -> dict[str, Any]:
        above = self.peak - self.idle if self.idle else None
        return {"peak_bytes": int(self.peak), "idle_bytes": int(self.idle), "above_idle_bytes": above,
                "method": self.method}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _rebuild_rope(model: QwenImageTransformer2DModel, like: torch.nn.Module) -> None:
    # The rotary tables are plain tensors (not buffers) built by the constructor on the CPU: a meta-built model has
    # meta ones. Rebuild them like the stock constructor does (see QwenImageSPTransformer2DModel.from_transformer).
    model.pos_embed = type(like)(theta=like.theta, axes_dim=list(like.axes_dim), scale_rope=like.scale_rope)


def materialize_random_transformer(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> QwenImageTransformer2DModel:
    r"""
    A stock `QwenImageTransformer2DModel` with random weights built directly on `device` in `dtype`.

    The model is built on the meta device (no memory), cast there, given uninitialised storage on `device`
    (`to_empty`) and initialised like the stock constructor would: `reset_parameters` of every module that has one
    (Linear: Kaiming-uniform), RMSNorm weights to one. The full-size model (20 B parameters) thus never exists in fp32
    or on the CPU. Seeded: the same on every rank of one device type.
    """
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                continue
            for name, parameter in own.items():
                if parameter.ndim == 1:  # norm scales and biases
                    parameter.fill_(1.0 if name == "weight" else 0.0)
                else:
                    parameter.normal_(0.0, 0.02)
    _rebuild_rope(model, model.pos_embed)
    return model.eval()


def _load_transformer(model: str, device: torch.device, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    path, subfolder = _model_location(model)
    kwargs: dict[str, Any] = dict(subfolder=subfolder, dtype=dtype)
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight to this rank's GPU: no full copy in host memory per rank
    transformer = QwenImageTransformer2DModel.from_pretrained(path, **kwargs)
    return transformer.to(device).eval()


def _shared_stock_copy(stock: QwenImageTransformer2DModel) -> QwenImageTransformer2DModel:
    """A second stock instance whose parameters are the same tensors (no copy), for diffusers' CP to change."""
    with torch.device("meta"):
        copy = QwenImageTransformer2DModel.from_config(stock.config)
    copy.load_state_dict(stock.state_dict(), strict=True, assign=True)
    _rebuild_rope(copy, stock.pos_embed)
    return copy.eval()


def _fingerprint(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().float().sum(dtype=torch.float64).item() for p in model.parameters()))


def _make_identical(model: torch.nn.Module, world: int) -> bool:
    """Broadcast rank 0's weights when the ranks' weights differ (sharded results mixing different models). Returns
    whether it had to."""
    if world == 1:
        return False
    prints: list[Any] = [None] * world
    dist.all_gather_object(prints, _fingerprint(model))
    if len(set(prints)) == 1:
        return False
    with torch.no_grad():
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)
    return True


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**tiny_scheduler_config())  # the real Qwen-Image scheduler config


@dataclass
class _Runner:
    """A row's live objects on one rank."""

    spec: RowSpec
    transformer: torch.nn.Module | None = None
    pipe: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def build(self, stock: QwenImageTransformer2DModel, settings: BenchSettings) -> None:
        spec = self.spec
        components = dict(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None)
        if spec.kind == "stock":
            self.transformer = stock
            self.pipe = QwenImagePipeline(transformer=stock, **components)
        elif spec.kind == "diffusers_cp":
            self.transformer = _shared_stock_copy(stock)
            with cpu_accelerator_count():
                self.transformer.enable_parallelism(
                    config=ContextParallelConfig(ulysses_degree=spec.ulysses, ring_degree=spec.ring)
                )
            self.pipe = QwenImagePipeline(transformer=self.transformer, **components)
        else:
            # Each row its own staged transformer, sharing the stock weights: no hooks are applied or removed
            # between timed calls.
            self.pipe = QwenImageSPPipeline(
                transformer=QwenImageSPTransformer2DModel.from_transformer(stock), **components
            )
            if spec.parallel:
                self.pipe.enable_sequence_parallel(
                    SequenceParallelConfig(
                        ulysses_degree=spec.ulysses, ring_degree=spec.ring, cfg_degree=spec.cfg,
                        timeout=settings.timeout,
                    )
                )
            if spec.teacache is not None:
                self.pipe.enable_teacache(TeaCacheConfig(threshold=spec.teacache))
            self.transformer = self.pipe.transformer
        self.pipe.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _text_mask(settings: BenchSettings, device: torch.device) -> torch.Tensor:
    mask = torch.ones(1, settings.text_tokens, dtype=torch.long, device=device)
    if settings.text_padding:
        mask[:, settings.text_tokens - settings.text_padding :] = 0  # a prompt shorter than the padded length
    return mask


def forward_inputs(
    config: dict[str, Any], settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    r"""Inputs of one transformer forward (batch 1), as the pipeline's conditional call passes them."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    height, width = settings.grid
    mask = _text_mask(settings, device) if settings.text_padding else None  # the pipeline turns all-ones into None
    return dict(
        hidden_states=torch.randn(1, settings.image_tokens, config["in_channels"], generator=generator).to(
            device, dtype
        ),
        encoder_hidden_states=torch.randn(
            1, settings.text_tokens, config["joint_attention_dim"], generator=generator
        ).to(device, dtype),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((1,), 0.7, device=device, dtype=dtype),
        img_shapes=[[(1, height, width)]],
        return_dict=False,
    )


def pipeline_inputs(
    config: dict[str, Any], settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    r"""Keyword arguments of one pipeline call from random prompt embeddings (both CFG branches), without the
    generator."""
    generator = torch.Generator().manual_seed(settings.seed + 2)
    shape = (1, settings.text_tokens, config["joint_attention_dim"])
    # Real text-encoder states are far from unit-normal; unit-normal ones are what a random model gets.
    return dict(
        prompt_embeds=torch.randn(shape, generator=generator).to(device, dtype),
        prompt_embeds_mask=_text_mask(settings, device),
        negative_prompt_embeds=torch.randn(shape, generator=generator).to(device, dtype),
        negative_prompt_embeds_mask=_text_mask(settings, device),
        true_cfg_scale=settings.cfg_scale,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_max(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # (n,) per rank -> (n,) the largest over ranks
    return tensor.tolist()


def _agree(error: str) -> str:
    """Every rank learns whether any rank failed, so all skip the same rows (or the collectives would diverge)."""
    failed = _all_reduce_max([1.0 if error else 0.0])[0]
    return error or ("failed on another rank" if failed else "")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().rstrip(":")
    return text.splitlines()[0][:300] if text else type(error).__name__


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float, str]:
    """One call of `fn` on every rank at once: (output, the slowest rank's wall-clock seconds, the largest CPU seconds
    of a rank's process, error or "")."""
    dist.barrier()  # start together; outside the timed window
    start, cpu_start = time.perf_counter(), time.process_time()
    output, error = None, ""
    try:
        with torch.no_grad():
            output = fn()
        _synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported as n/a, not fatal
        error = _describe(exc)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    slowest, cpu, failed = _all_reduce_max([elapsed, cpu, 1.0 if error else 0.0])
    if failed and not error:
        error = "failed on another rank"
    return output, slowest, cpu, error


def rotated(items: list[Any], round_index: int) -> list[Any]:
    r"""`items` in the order of round `round_index` of an interleaved benchmark: every round runs every item once,
    the order rotated by one per round, so drifts of the machine's speed hit all items alike."""
    if not items:
        return []
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def _max_abs_diff(output: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (output.float() - reference.float()).abs().max().item()
    return diff if math.isfinite(diff) else math.inf  # NaN/inf garbage counts as the worst


def _bench_worker(rank: int, world: int, settings: BenchSettings, rows: tuple[RowSpec, ...]) -> dict[str, Any]:
    if settings.device == "cuda":
        torch.cuda.set_device(rank)  # before any collective: NCCL binds the communicator to the current device
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(settings.threads)
    logging.set_verbosity_error()  # enable_parallelism warns "experimental" on every rank
    # diffusers' CP output gather calls a deprecated functional collective on every forward.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    dtype = settings.torch_dtype

    start = time.perf_counter()
    if settings.model is not None:
        stock = _load_transformer(settings.model, device, dtype)
    else:
        stock = materialize_random_transformer(transformer_config(settings), device, dtype, settings.seed)
    broadcast = _make_identical(stock, world)
    config = dict(stock.config)
    phase_s = {"model": time.perf_counter() - start}
    start = time.perf_counter()

    runners = [_Runner(spec) for spec in rows]
    for runner in runners:
        error = runner.spec.unavailable
        if not error:
            try:
                runner.build(stock, settings)
            except Exception as exc:  # noqa: BLE001 - e.g. diffusers CP refusing this setup: reported as n/a
                error = _describe(exc)
            error = _agree(error)
        runner.error = error

    per_row: dict[str, dict[str, Any]] = {
        r.spec.name: {"forward_times": [], "forward_cpu_times": [], "image_times": [], "image_cpu_times": [],
                      "forward_diffs": []}
        for r in runners
    }
    phase_s["rows"] = time.perf_counter() - start
    start = time.perf_counter()

    # ---------------------------------------------------------------- per forward
    forward_rows = [r for r in runners if r.spec.per_forward and r.ok]
    if forward_rows:
        inputs = forward_inputs(config, settings, device, dtype)
        reference: torch.Tensor | None = None
        for round_index in range(settings.warmup + settings.forward_repeats):
            for runner in rotated(forward_rows, round_index):
                if not runner.ok:
                    continue
                entry = per_row[runner.spec.name]
                measure = round_index == 0  # the first warm-up round counts bytes and memory, untimed
                with contextlib.ExitStack() as stack:
                    memory = stack.enter_context(PeakMemory(device)) if measure else None
                    counted = stack.enter_context(_count_bytes(runner.spec.kind, world)) if measure else None
                    output, elapsed, cpu, error = _timed_call(
                        lambda runner=runner: runner.transformer(**inputs)[0], device
                    )
                if error:
                    runner.error = error
                    continue
                if measure:
                    entry["forward_bytes"] = counted
                    entry["forward_memory"] = memory.summary()
                if runner.spec.key == "stock" and reference is None:  # stock runs first in round 0
                    reference = output.detach().float().clone()
                if reference is not None:
                    entry["forward_diffs"].append(_max_abs_diff(output, reference))
                if round_index >= settings.warmup:
                    entry["forward_times"].append(elapsed)
                    entry["forward_cpu_times"].append(cpu)

    phase_s["forward"] = time.perf_counter() - start
    start = time.perf_counter()

    # ---------------------------------------------------------------- per image
    image_rows = [r for r in runners if r.spec.per_image and r.ok]
    if image_rows:
        call_kwargs = pipeline_inputs(config, settings, device, dtype)
        for round_index in range(settings.warmup + settings.image_repeats):
            for runner in rotated(image_rows, round_index):
                if not runner.ok:
                    continue
                entry = per_row[runner.spec.name]
                measure = round_index == 0

                def call(runner: _Runner = runner) -> torch.Tensor:
                    generator = torch.Generator("cpu").manual_seed(settings.seed)
                    return runner.pipe(**call_kwargs, generator=generator)[0]

                with contextlib.ExitStack() as stack:
                    memory = stack.enter_context(PeakMemory(device)) if measure else None
                    counted = stack.enter_context(_count_bytes(runner.spec.kind, world)) if measure else None
                    output, elapsed, cpu, error = _timed_call(call, device)
                if error:
                    runner.error = error
                    continue
                if runner.spec.teacache is not None:
                    stats = teacache_stats(runner.transformer)
                    computed = {branch: list(s["computed"]) for branch, s in stats.items()}
                    entry.setdefault("teacache_computed", []).append(computed)
                if measure:
                    entry["image_bytes"] = counted
                    entry["image_memory"] = memory.summary()
                    if rank == 0:
                        entry["latents"] = output.detach().float().cpu()
                if round_index >= settings.warmup:
                    entry["image_times"].append(elapsed)
                    entry["image_cpu_times"].append(cpu)

    phase_s["image"] = time.perf_counter() - start
    for runner in runners:
        per_row[runner.spec.name]["error"] = runner.error
    return dict(
        rank=rank,
        rows=per_row,
        parameters=sum(p.numel() for p in stock.parameters()),
        config={key: value for key, value in config.items() if not key.startswith("_")},
        phase_s=phase_s,
        weights_broadcast=broadcast,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


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
    import diffusers

    from . import __version__

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
            cpu_count=os.cpu_count(),
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            diffusers_qwen_sp=__version__,
            python=platform.python_version(),
            platform=platform.platform(),
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


# ---------------------------------------------------------------------------------------------------------------------
# Markdown, JSON, PNG
# ---------------------------------------------------------------------------------------------------------------------


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown_table(report: dict[str, Any]) -> str:
    r"""The main table of a report, plus notes, the communication terms and the SP scaling, in Markdown."""
    env, model, inputs = report["environment"], report["model"], report["inputs"]
    config = model["config"]
    lines: list[str] = []
    where = (
        f"{env['processes']} x {env['device_name']} ({env['backend']})" if env["device"] == "cuda"
        else f"{env['processes']} gloo processes x {env['threads_per_rank']} thread on {env['cpu_count']} CPU cores "
             f"({env['device_name']})"
    )
    settings = report["settings"]
    forward, image = "forward" in settings["phases"], "image" in settings["phases"]
    workload = (
        f"{inputs['steps']} steps with true CFG ({inputs['transformer_calls_per_image']} transformer calls per image)"
        if image else "one transformer forward, batch 1"
    )
    rounds = " and ".join(
        f"{settings[f'{phase}_repeats']} ({phase})" for phase, on in (("forward", forward), ("image", image)) if on
    )
    lines.append(
        f"Qwen-Image transformer, {model['source']}: {config['num_layers']} layers, "
        f"{config['num_attention_heads']} heads x {config['attention_head_dim']}, {model['parameters'] / 1e6:,.1f} M "
        f"parameters, {model['dtype']}; {inputs['height']}x{inputs['width']} px = {inputs['image_tokens']} image "
        f"tokens, {inputs['text_tokens']} text tokens ({inputs['text_padding']} padded); {workload}; {where}; torch "
        f"{env['torch']}, diffusers {env['diffusers']}. Medians of {rounds} interleaved rounds after "
        f"{settings['warmup']} warm-up; the run took {report['wall_s']:.0f} s."
    )
    lines.append("")
    # The head-to-head with diffusers' own context parallelism, as a time ratio of the same run.
    by_key = {row["key"]: row for row in report["rows"] if row["status"] == "ok"}
    peer = by_key.get("diffusers-cp")
    for key, row in by_key.items():
        if peer is None or row["kind"] == "diffusers_cp" or row.get("ulysses") != peer.get("ulysses"):
            continue
        if row.get("ring", 1) == 1 and row.get("cfg", 1) == 1 and row.get("teacache_threshold") is None:
            ratio = _ratio(row.get("per_forward_s"), peer.get("per_forward_s"))
            if ratio is not None:
                lines.append(f"**{row['name']} / {peer['name']}, forward time: {ratio:.3f}** (below 1: ours is faster).")
                lines.append("")
    teacache_column = any(row.get("computed_calls") is not None for row in report["rows"])
    header = ["row", "procs"]
    if forward:
        header += ["forward (s)", "forward speed-up"]
    if image:
        header += ["image (s)", "image speed-up"]
    if teacache_column:
        header += ["TeaCache computed / calls (ideal)"]
    if image:
        header += ["PSNR vs stock (dB)"]
    header += ["peak memory / rank", "sent / forward / rank (minimum)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    notes: list[str] = []
    for row in report["rows"]:
        if row["status"] != "ok":
            notes.append(f"- **{row['name']}**: n/a — {row['reason']}")
            lines.append(f"| {row['name']} | {row['processes']} | n/a |" + " |" * (len(header) - 3))
            continue
        cells = [row["name"], str(row["processes"])]
        if forward:
            cells += [_fmt_s(row.get("per_forward_s")), _fmt_x(row.get("forward_speedup_vs_stock"))]
        if image:
            speed_image = _fmt_x(row.get("image_speedup_vs_stock"))
            if row.get("image_speedup_vs_uncached") is not None:
                speed_image += f" ({row['image_speedup_vs_uncached']:.2f}x vs {row['uncached_row']})"
            cells += [_fmt_s(row.get("per_image_s")), speed_image]
        if teacache_column:
            teacache = "—"
            if row.get("computed_calls") is not None:
                teacache = f"{row['computed_calls']} / {row['transformer_calls']} ({row['ideal_speedup']:.2f}x)"
            cells.append(teacache)
        if image:
            if row.get("identical_to_stock"):
                cells.append("identical")
            elif row.get("psnr_vs_stock_db") is not None:
                cells.append(f"{row['psnr_vs_stock_db']:.1f}")
            else:
                cells.append("—")
        memory = row.get("peak_memory_per_rank_bytes")
        memory_cell = _fmt_bytes(max(memory)) if memory else "—"
        above = [value for value in row.get("peak_memory_above_idle_per_rank_bytes") or [] if value is not None]
        if memory and above:
            memory_cell += f" (+{_fmt_bytes(max(above))})"
        cells.append(memory_cell)
        if "bytes_per_forward_per_rank" in row:
            sent = _fmt_bytes(row["bytes_per_forward_per_rank"])
            if row.get("analytic_min_bytes_per_forward"):
                sent += f" ({_fmt_bytes(row['analytic_min_bytes_per_forward'])})"
        elif row.get("bytes_per_image_per_rank") is not None:
            calls = row.get("transformer_calls") or 1
            sent = f"{_fmt_bytes(row['bytes_per_image_per_rank'] / calls)} avg per call"
        else:
            sent = "—"
        cells.append(sent)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = "Speed-ups are against the stock diffusers row of the same run"
    if teacache_column:
        note += (" (TeaCache rows also against their uncached row); *ideal* = transformer calls / computed calls, the "
                 "speed-up if a skipped call cost nothing")
    note += (
        ". Peak memory: the largest rank's during " + (report["rows"][0].get("peak_memory_during") or "one call")
        + ", with the rise above the memory in use just before the call in parentheses ("
        + (report["rows"][0].get("memory_method") or "n/a") + "). Sent: bytes one rank sends per transformer forward "
        "through collectives, with the analytic minimum of the algorithm in parentheses"
        + (" (rows without per-forward timing: the average over the calls of one image)." if image else ".")
    )
    lines.append(note)
    if any(row.get("psnr_vs_stock_db") is not None or row.get("identical_to_stock") for row in report["rows"]):
        lines.append(PSNR_NOTE)
    if notes:
        lines.append("")
        lines.extend(notes)

    noisy = sorted({
        row["name"] for row in report["rows"] for key in ("forward_spread", "image_spread")
        if row["status"] == "ok" and (row.get(key) or 0) > NOISY_SPREAD
    })
    if noisy:
        lines.append("")
        lines.append(
            f"Noisy: the rounds of {', '.join(noisy)} spread by more than {NOISY_SPREAD:.0%} of their median "
            "(interquartile range from 4 rounds on, else the whole range; other "
            "load on the machine?), so their median ratios are uncertain to about that much; more rounds "
            "(--forward-repeats, --image-repeats) or a quieter machine narrow them. Second estimates: the ratio of "
            "the fastest rounds (load only ever adds time) and, on CPU, of the median CPU seconds of the busiest "
            "rank's process (other processes hardly inflate it; it leaves out waiting for the other ranks, so it "
            "flatters the parallel rows):"
        )
        lines.append("")
        estimates = [("median", ""), ("fastest", "_fastest"), ("CPU time", "_cpu_time")]
        columns = [(phase, label, suffix) for phase, on in (("forward", forward), ("image", image)) if on
                   for label, suffix in estimates]
        lines.append("| row | " + " | ".join(f"{phase}: {label}" for phase, label, _ in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for row in report["rows"][1:]:
            if row["status"] == "ok":
                cells = [_fmt_x(row.get(f"{phase}_speedup_vs_stock{suffix}")) for phase, _, suffix in columns]
                lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")

    drift = [
        f"{row['name']} {row['forward_max_abs_diff_vs_stock']:.1e}"
        for row in report["rows"]
        if row["status"] == "ok" and row.get("forward_max_abs_diff_vs_stock") is not None and row["processes"] > 1
    ]
    if drift:
        lines.append("")
        lines.append("Max |diff| of every timed forward against the stock forward: " + ", ".join(drift) + ".")
        if report["model"]["dtype"] == "float32":
            off = [f"{row['name']} ({row['forward_calls_above_fp32_bar']} of {row['forward_calls_checked']} calls)"
                   for row in report["rows"] if row["status"] == "ok" and row.get("forward_calls_above_fp32_bar")]
            if off:
                lines.append(f"Calls above the fp32 parity bar of {FP32_TOLERANCE:g}: {', '.join(off)}.")

    comm = [row for row in report["rows"] if row["status"] == "ok" and row.get("analytic_terms")]
    if comm:
        lines.append("")
        lines.append("Communication per forward per rank, measured against the analytic minimum:")
        lines.append("")
        lines.append("| row | measured by operation | analytic terms | measured / minimum |")
        lines.append("|---|---|---|---|")
        for row in comm:
            measured = ", ".join(f"{op} {_fmt_bytes(v)}" for op, v in row.get("bytes_per_forward_by_op", {}).items())
            terms = ", ".join(f"{op} {_fmt_bytes(v)}" for op, v in row["analytic_terms"].items())
            ratio = row.get("bytes_measured_over_minimum")
            lines.append(f"| {row['name']} | {measured} | {terms} | {'—' if ratio is None else f'{ratio:.4f}'} |")

    teacache_rows = [row for row in report["rows"] if row.get("computed_steps")]
    if teacache_rows:
        lines.append("")
        lines.append("Steps TeaCache computed (first and last always):")
        lines.append("")
        for row in teacache_rows:
            steps = "; ".join(f"{branch} {step_ranges(s)}" for branch, s in row["computed_steps"].items())
            lines.append(f"- {row['name']}: {steps}")

    if any(entry["processes"] not in (1, report["environment"]["processes"]) for entry in report["scaling"]):
        lines.append("")
        lines.append("SP scaling, per forward (each against the stock forward of its own run):")
        lines.append("")
        lines.append("| processes | mode | forward (s) | stock forward (s) | speed-up | efficiency |")
        lines.append("|---|---|---|---|---|---|")
        for entry in report["scaling"]:
            efficiency = entry.get("efficiency")
            lines.append(
                f"| {entry['processes']} | {entry['mode']} | {_fmt_s(entry['per_forward_s'])} "
                f"| {_fmt_s(entry['stock_per_forward_s'])} | {_fmt_x(entry['speedup'])} "
                f"| {'—' if efficiency is None else f'{efficiency:.0%}'} |"
            )
    return "\n".join(lines) + "\n"


def step_ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts: list[list[int]] = []
    for step in steps:
        if parts and step == parts[-1][1] + 1:
            parts[-1][1] = step
        else:
            parts.append([step, step])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def _plot_bars(report: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, forward speed-up, image speed-up, ideal) per measured row."""
    bars = []
    for row in report["rows"]:
        if row["status"] != "ok":
            continue
        bars.append((row["name"], row.get("forward_speedup_vs_stock"), row.get("image_speedup_vs_stock"),
                     row.get("ideal_image_speedup_vs_stock")))
    return bars


def _plot_title(report: dict[str, Any]) -> str:
    env, model, inputs = report["environment"], report["model"], report["inputs"]
    config = model["config"]
    where = f"{env['processes']} x {env['device_name']}" if env["device"] == "cuda" else (
        f"{env['processes']} CPU processes x {env['threads_per_rank']} thread")
    return (
        f"Speed-up vs stock diffusers ({where}; {config['num_layers']} layers, {config['num_attention_heads']}x"
        f"{config['attention_head_dim']}, {model['dtype']}, {inputs['height']}x{inputs['width']} px, "
        f"{inputs['steps']} steps)"
    )


def write_plot(report: dict[str, Any], path: Path) -> str:
    r"""Write a PNG bar chart of the speed-ups (matplotlib when importable, else Pillow). Returns the renderer used."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(report, path)
        return "pillow"
    bars = _plot_bars(report)
    scaling = report["scaling"]
    panels = 2 if len(scaling) > 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels + 3, 0.45 * len(bars) + 2), squeeze=False)
    axis = axes[0][0]
    positions = list(range(len(bars)))
    height = 0.38
    forward = [b[1] or 0 for b in bars]
    image = [b[2] or 0 for b in bars]
    axis.barh([p - height / 2 for p in positions], forward, height, label="per forward", color="#4c78a8")
    axis.barh([p + height / 2 for p in positions], image, height, label="per image", color="#f58518")
    for p, (_, f, i, ideal) in zip(positions, bars):
        if f:
            axis.text(f, p - height / 2, f" {f:.2f}x", va="center", fontsize=8)
        if i:
            axis.text(i, p + height / 2, f" {i:.2f}x", va="center", fontsize=8)
        if ideal:
            axis.plot([ideal], [p + height / 2], marker="|", color="black", markersize=12)
    axis.axvline(1.0, color="gray", linewidth=0.8)
    axis.set_yticks(positions, [b[0] for b in bars])
    axis.invert_yaxis()
    axis.set_xlabel("speed-up vs stock diffusers (| = TeaCache ideal: uncached row x calls / computed)")
    axis.legend(loc="lower right")
    if panels == 2:
        axis2 = axes[0][1]
        labels = {"ulysses": "Ulysses", "ring": "Ring", "usp": "Ulysses x Ring 2"}
        for algorithm, label in labels.items():
            points = [(1, scaling[0]["speedup"])] + [
                (s["processes"], s["speedup"]) for s in scaling if s["algorithm"] == algorithm and s["speedup"]
            ]
            if len(points) > 1:
                axis2.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        top = max(s["processes"] for s in scaling)
        axis2.plot([1, top], [1, top], linestyle="--", color="gray", label="linear")
        axis2.set_xlabel("processes")
        axis2.set_ylabel("speed-up per forward")
        axis2.legend()
    fig.suptitle(_plot_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


def _plot_with_pil(report: dict[str, Any], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    bars = _plot_bars(report)
    try:
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = small = ImageFont.load_default()
    label_width, bar_area, margin = 300, 560, 20
    row_height, top = 44, 64
    width = label_width + bar_area + 120
    height = top + row_height * len(bars) + 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), _plot_title(report), fill="black", font=small)
    largest = max([v for b in bars for v in b[1:] if v] + [1.0])
    scale = bar_area / (largest * 1.1)
    x0 = label_width
    colors = {"per forward": (76, 120, 168), "per image": (245, 133, 24)}
    for index, (label, forward, per_image, ideal) in enumerate(bars):
        y = top + index * row_height
        draw.text((margin, y + 12), label, fill="black", font=font)
        for offset, value, color in ((0, forward, colors["per forward"]), (20, per_image, colors["per image"])):
            if not value:
                continue
            draw.rectangle([x0, y + offset + 2, x0 + value * scale, y + offset + 18], fill=color)
            draw.text((x0 + value * scale + 4, y + offset + 3), f"{value:.2f}x", fill="black", font=small)
        if ideal:
            x = x0 + ideal * scale
            draw.line([x, y + 20, x, y + 40], fill="black", width=3)
    one = x0 + 1.0 * scale
    draw.line([one, top - 6, one, top + row_height * len(bars)], fill=(128, 128, 128), width=1)
    legend_y = top + row_height * len(bars) + 14
    for offset, (name, color) in enumerate(colors.items()):
        lx = margin + offset * 180
        draw.rectangle([lx, legend_y, lx + 16, legend_y + 14], fill=color)
        draw.text((lx + 22, legend_y), name, fill="black", font=small)
    draw.line([margin + 372, legend_y, margin + 372, legend_y + 16], fill="black", width=3)
    legend = "TeaCache ideal (uncached row x calls / computed); grey: 1.0x"
    draw.text((margin + 380, legend_y), legend, fill="black", font=small)
    image.save(path, format="PNG")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_outputs(report: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    r"""Write `bench.json`, `bench.md` and `bench.png` into `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "bench.json", "markdown": output_dir / "bench.md", "plot": output_dir / "bench.png"}
    report["files"] = {name: str(path) for name, path in paths.items()}
    report["plot_renderer"] = write_plot(report, paths["plot"])
    paths["markdown"].write_text("# diffusers_qwen_sp bench\n\n" + markdown_table(report))
    paths["json"].write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

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
                 forward_repeats=5, image_repeats=2, warmup=1, dtype="bfloat16", timeout=3600.0),
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
                        help=f"comma-separated subset of {','.join(ROW_KEYS)} (stock is always measured)")
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

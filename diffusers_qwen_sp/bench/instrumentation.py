"""What the bench measures with, around the hot path: bytes sent (ours through `count_communication`, diffusers' context
parallelism through wrappers), peak memory per rank, timed calls that every rank agrees on, and the CPU stand-in for
an accelerator that diffusers' context parallelism needs. Patches live only inside the bench's processes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import count_communication


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' context parallelism on CPU, and counting its bytes
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
def _count_calls(module: torch.nn.Module) -> Iterator[list[Any]]:
    r"""
    The collectives of `module`'s forward calls inside the block, one `count_communication` stats per call, and
    nothing of the code around them: `count_communication` sees every collective, and a pipeline call also broadcasts
    rank 0's inputs and checks its arguments across ranks, which are no part of "bytes per transformer call".
    """
    counted: list[Any] = []
    active: list[contextlib.ExitStack] = []

    def enter(*_: Any) -> None:
        stack = contextlib.ExitStack()
        counted.append(stack.enter_context(count_communication()))
        active.append(stack)

    def leave(*_: Any) -> None:
        active.pop().close()

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()
        while active:  # a call that never returned
            active.pop().close()


@contextlib.contextmanager
def _count_bytes(kind: str, world: int, module: torch.nn.Module, summary: dict[str, Any]) -> Iterator[None]:
    """Bytes this rank sends in the calls of the transformer `module` inside the block, into `summary` as
    `{"total", "by_op", "calls"}` (filled when the block exits)."""
    if kind == "diffusers_cp":
        with count_diffusers_cp(world) as counters:
            yield
        summary["by_op"] = {op: c.bytes_sent for op, c in counters.items() if c.calls}
        summary["calls"] = {op: c.calls for op, c in counters.items() if c.calls}
    else:
        with _count_calls(module) as per_call:  # every collective of ours: attention, SP gather, CFG, TeaCache
            yield
        summary["by_op"], summary["calls"] = {}, {}
        for stats in per_call:
            for op, sent in stats.bytes_sent_by_op.items():
                summary["by_op"][op] = summary["by_op"].get(op, 0) + sent
            for op, calls in stats.calls.items():
                summary["calls"][op] = summary["calls"].get(op, 0) + calls
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
# Timing: one call on every rank at once
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


def synchronize(device: torch.device) -> None:
    r"""Wait for the device's queued work, so that a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(error: BaseException) -> str:
    r"""One line naming an exception, for a report."""
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
        synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported as n/a, not fatal
        error = describe(exc)
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


def cpu_name() -> str:
    r"""The CPU model from `/proc/cpuinfo`, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""Measure the patch-parallel VAE: decode (and encode) time and per-rank peak memory at degree 1, 2, 4, ...

Runs diffusers' `AutoencoderKLQwenImage` with the real Qwen-Image VAE architecture (diffusers' default config) and
seeded random weights on `degree` gloo processes of one thread each (`run_distributed`), degree 1 being the stock
decode without hooks, and checks every degree against it.

Memory is the peak of the bytes held by tensors allocated during the call, counted by `bench.memory.LiveBytes`
(weights and inputs, alive before the call, are not counted). It counts the same way on CPU and CUDA; on CUDA the
allocator's own peak (`torch.cuda.max_memory_allocated` above the bytes allocated before the call) is reported beside
it.

On a machine with fewer cores than ranks, the ranks share cores and the wall time says little: the compute time
(this thread's CPU time, torch with one thread) is each rank's own work; the speed-up to expect on one device per rank
is degree 1's compute time over the slowest rank's.

    python -m diffusers_qwen_sp bench-vae --sizes 512 --degrees 1 2 4
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .memory import LiveBytes


@dataclass
class VAEParallelRow:
    """One (operation, size, degree) measurement: the slowest rank's times, the largest rank's peak."""

    operation: str
    size: int
    degree: int
    wall_s: float
    compute_s: float
    peak_bytes: int
    cuda_peak_bytes: int | None
    max_diff: float


@dataclass
class VAEParallelMeasurement:
    r"""What [`measure_vae_parallel`] measured, with `to_markdown()`."""

    rows: list[VAEParallelRow] = field(default_factory=list)
    device: str = "cpu"

    def to_markdown(self) -> str:
        mib = 2**20
        base = {(row.operation, row.size): row for row in self.rows if row.degree == 1}
        lines = [
            f"Patch-parallel VAE (real Qwen-Image VAE architecture, random weights, fp32, {self.device}, one thread "
            "per rank)",
            "",
            "| operation | image | degree | wall s | compute s (slowest rank) | speed-up | peak MiB per rank | "
            "memory ratio | max abs diff vs degree 1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            ref = base.get((row.operation, row.size))
            speedup = f"{ref.compute_s / row.compute_s:.2f}x" if ref else "-"
            ratio = f"{row.peak_bytes / ref.peak_bytes:.2f}" if ref else "-"
            cuda = f" (CUDA {row.cuda_peak_bytes / mib:.0f})" if row.cuda_peak_bytes is not None else ""
            lines.append(
                f"| {row.operation} | {row.size}x{row.size} | {row.degree} | {row.wall_s:.2f} | {row.compute_s:.2f} | "
                f"{speedup} | {row.peak_bytes / mib:.0f}{cuda} | {ratio} | {row.max_diff:.1e} |"
            )
        return "\n".join(lines)


def _measure(fn: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if dist.is_initialized():
        dist.barrier()
    wall, compute = time.perf_counter(), time.thread_time()
    cuda = torch.cuda.is_available()
    with torch.no_grad(), LiveBytes("cuda" if cuda else "cpu") as counter:
        output = fn()
    numbers = {
        "wall_s": time.perf_counter() - wall,
        "compute_s": time.thread_time() - compute,
        "peak_bytes": counter.counted_peak_bytes,
        "cuda_peak_bytes": counter.peak_bytes if cuda else None,
    }
    return output, numbers


def _worker(
    rank: int, world_size: int, vae_config: dict[str, Any], sizes: list[int], encode: bool, device: str
) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage

    from ..hooks.vae_patch_parallel import PatchParallelVAEConfig, apply_patch_parallel_vae

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**vae_config).eval().to(device)
    if world_size > 1:
        apply_patch_parallel_vae(vae, PatchParallelVAEConfig(encode=encode))
    factor = vae.spatial_compression_ratio
    with torch.no_grad():  # warm-up (kernel selection, first allocations), not measured
        vae.decode(torch.zeros(1, vae.config.z_dim, 1, 8, 8, device=device))
    results: dict[str, Any] = {}
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        latents = torch.randn(1, vae.config.z_dim, 1, size // factor, size // factor, generator=generator)
        image, numbers = _measure(lambda: vae.decode(latents.to(device)).sample)
        results["decode", size] = {**numbers, "output": image.cpu() if rank == 0 else None}
        if encode:
            pixels = torch.rand(1, vae.config.input_channels, 1, size, size, generator=generator) * 2 - 1
            latent, numbers = _measure(lambda: vae.encode(pixels.to(device)).latent_dist.mode())
            results["encode", size] = {**numbers, "output": latent.cpu() if rank == 0 else None}
    return results


def measure_vae_parallel(
    sizes: tuple[int, ...] = (512,),
    degrees: tuple[int, ...] = (1, 2, 4),
    encode: bool = True,
    vae_config: dict[str, Any] | None = None,
    timeout: float = 1800.0,
) -> VAEParallelMeasurement:
    r"""
    Decode (and encode) square images of each size at each degree and compare every degree with degree 1.

    Args:
        sizes (`tuple[int, ...]`, defaults to `(512,)`): image sides in pixels (multiples of 16).
        degrees (`tuple[int, ...]`, defaults to `(1, 2, 4)`): ranks; degree 1 is the stock VAE without hooks.
        encode (`bool`, defaults to `True`): also measure the encode.
        vae_config (`dict`, *optional*): `AutoencoderKLQwenImage` arguments; default diffusers' (the real VAE).
        timeout (`float`, defaults to `1800.0`): seconds per degree.

    Returns:
        [`VAEParallelMeasurement`]; raises a `RuntimeError` if a degree differs from degree 1 by more than 1e-4.

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.vae_parallel import measure_vae_parallel

    >>> print(measure_vae_parallel(sizes=(512,), degrees=(1, 2, 4)).to_markdown())
    ```
    """
    from ..distributed import run_distributed

    if 1 not in degrees:
        degrees = (1, *degrees)
    device = "cpu"
    measurement = VAEParallelMeasurement(device=device)
    reference: dict[Any, torch.Tensor] = {}
    for degree in sorted(degrees):
        per_rank = run_distributed(
            _worker, degree, dict(vae_config or {}), list(sizes), encode, device, timeout=timeout
        )
        for key in per_rank[0]:
            output = per_rank[0][key]["output"]
            reference.setdefault(key, output)
            diff = (output - reference[key]).abs().max().item()
            if diff > 1e-4:
                raise RuntimeError(f"{key[0]} at {key[1]} px, degree {degree}: max abs diff {diff:g} vs degree 1.")
            measurement.rows.append(
                VAEParallelRow(
                    operation=key[0],
                    size=key[1],
                    degree=degree,
                    wall_s=max(rank[key]["wall_s"] for rank in per_rank),
                    compute_s=max(rank[key]["compute_s"] for rank in per_rank),
                    peak_bytes=max(rank[key]["peak_bytes"] for rank in per_rank),
                    cuda_peak_bytes=per_rank[0][key]["cuda_peak_bytes"],
                    max_diff=diff,
                )
            )
    measurement.rows.sort(key=lambda row: (row.operation, row.size, row.degree))
    return measurement


__all__ = ["VAEParallelMeasurement", "VAEParallelRow", "measure_vae_parallel"]

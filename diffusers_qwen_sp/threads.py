"""How many intra-op threads a CPU run should use, chosen by the size of the work.

PyTorch's default is one OpenMP thread per core. On a small model (the shipped scene model: 64 image tokens x 128
dims) every op is tiny, so a second thread buys nothing on an idle machine, and when another process keeps a core
busy the OpenMP threads spin at every op waiting for the one that was descheduled: `generate` then took 24-33 s
instead of 0.5 s on 2 cores. Large work (real Qwen-Image sizes) needs every core. [`choose_cpu_threads`] decides from
the work per op (image tokens x transformer width), the cores, and how many processes share them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


# Below this many (image tokens x transformer width) per sample, one thread per process is as fast as all cores on an
# idle machine and tens of times faster on a busy one (measured on the scene model, 64 x 128 = 8,192, and on the tiny
# test models; see the README's "CPU threads"). Real Qwen-Image starts at 1,024 tokens x 3,072 = 3.1 M.
SMALL_WORK = 1 << 18


@dataclass(frozen=True)
class ThreadChoice:
    r"""
    The intra-op threads of a CPU run and why.

    Args:
        num_threads (`int`): threads for `torch.set_num_threads`.
        reason (`str`): one line for the user, e.g. `"auto: small model (8192 tokens x width per sample)"`.
    """

    num_threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.num_threads} intra-op thread{'s' if self.num_threads != 1 else ''} ({self.reason})"


def choose_cpu_threads(
    image_tokens: int,
    width: int,
    requested: int | None = None,
    processes_per_host: int = 1,
    cores: int | None = None,
) -> ThreadChoice:
    r"""
    The intra-op threads for a CPU run of a Qwen-Image transformer.

    Args:
        image_tokens (`int`): image tokens per sample (latent pixels / 4).
        width (`int`): the transformer width (`num_attention_heads * attention_head_dim`).
        requested (`int`, *optional*): the user's choice, taken as is.
        processes_per_host (`int`, defaults to `1`): processes sharing this machine's cores (`LOCAL_WORLD_SIZE`).
        cores (`int`, *optional*): cores available; defaults to this process's CPU affinity.

    Returns:
        [`ThreadChoice`]

    Example:

    ```py
    >>> choose_cpu_threads(image_tokens=64, width=128, cores=2).num_threads  # the scene model
    1
    >>> choose_cpu_threads(image_tokens=4096, width=3072, cores=16, processes_per_host=2).num_threads
    8
    ```
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"The number of threads must be a positive integer, got {requested!r}.")
        return ThreadChoice(requested, "requested")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = image_tokens * width
    if work < SMALL_WORK:
        return ThreadChoice(1, f"auto: small work, {image_tokens} tokens x {width} wide; more threads only spin")
    share = max(1, cores // max(1, processes_per_host))
    return ThreadChoice(share, f"auto: {cores} cores shared by {processes_per_host} process(es)")


def apply_cpu_threads(choice: ThreadChoice) -> ThreadChoice:
    r"""`torch.set_num_threads(choice.num_threads)`; returns `choice`."""
    torch.set_num_threads(choice.num_threads)
    return choice


__all__ = ["SMALL_WORK", "ThreadChoice", "apply_cpu_threads", "choose_cpu_threads"]

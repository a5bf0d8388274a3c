"""Section `environment`: what this machine runs (versions, GPUs, NCCL, flash-attn, CPU). No bar: it informs."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from ..bench.instrumentation import cpu_name
from .context import DoctorContext, describe


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def flash_attn_status() -> dict[str, Any]:
    r"""Whether the `flash-attn` package imports here: `{"available": True, "version": ...}` or
    `{"available": False, "reason": ...}`. Imported only when asked (it is an optional, CUDA-only extra)."""
    try:
        module = importlib.import_module("flash_attn")
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken CUDA build failing at import
        return {"available": False, "reason": describe(error)}
    return {"available": True, "version": getattr(module, "__version__", None)}


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    return ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)


def _gpus() -> list[dict[str, Any]]:
    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index,
            "name": properties.name,
            "memory_bytes": int(properties.total_memory),
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
        })
    return gpus


def check_environment(context: DoctorContext) -> dict[str, Any]:
    r"""The `environment` section: versions, GPUs and their memory, NCCL, flash-attn, CPU and threads."""
    cuda = torch.cuda.is_available()
    return {
        "verdict": "info",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "diffusers_qwen_sp": _version("diffusers-qwen-sp"),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "nccl_version": _nccl_version(),
        "device_count": torch.cuda.device_count() if cuda else 0,
        "gpus": _gpus(),
        "sdpa_flash_available": bool(cuda and torch.backends.cuda.is_flash_attention_available()),
        "flash_attn": flash_attn_status(),
        "cpu": {
            "name": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "device": str(context.device),
    }

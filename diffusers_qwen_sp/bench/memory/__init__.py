"""`python -m diffusers_qwen_sp bench-memory`: what fits where. Per-rank peak memory measured on CPU, and computed for
the real Qwen-Image family on 2, 4 and 8 GPUs.

- [`counter`]: [`LiveBytes`], the peak of live tensor bytes during a block (CPU, meta device, CUDA).
- [`model_sizes`]: the real configs, their parameter counts, and activation peaks traced on the meta device.
- [`fit`]: the per-GPU model and [`fit_table`]: which configurations fit 24, 48 and 80 GB cards.
- [`measure`]: [`measure_memory`], the measured part (gloo, world 2 and 4), checked against the model.
- [`report`]: `memory.json` and `memory.md`.
"""

from .counter import FlashAttentionOnMeta, LiveBytes
from .fit import CONFIGURATIONS, MODELS, QUICK_MODELS, fit_table, fits, parameter_summary, rank_peaks
from .measure import QUICK, MemorySettings, measure_memory, targets
from .model_sizes import (
    QWEN25_VL_7B,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
    text_encoder_parameters,
    transformer_parameters,
    vae_parameters,
)
from .report import computed_report, run_memory_bench, write_memory_outputs


__all__ = [
    "CONFIGURATIONS",
    "FlashAttentionOnMeta",
    "LiveBytes",
    "MODELS",
    "MemorySettings",
    "QUICK",
    "QUICK_MODELS",
    "QWEN25_VL_7B",
    "QWEN_IMAGE_TRANSFORMER",
    "QWEN_IMAGE_VAE",
    "computed_report",
    "fit_table",
    "fits",
    "measure_memory",
    "parameter_summary",
    "rank_peaks",
    "run_memory_bench",
    "targets",
    "text_encoder_parameters",
    "transformer_parameters",
    "vae_parameters",
    "write_memory_outputs",
]

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

The package: [`settings`] (the options and presets), [`rows`] (the plan of rows, the analytic bytes), [`worker`] (one
per rank: models, inputs, the measured rounds), [`instrumentation`] (bytes, memory, timed calls), [`report`] (ratios
and `bench.json`), [`markdown`] (`bench.md`), [`plot`] (`bench.png`) and [`run`] ([`run_bench`]).
"""

from .instrumentation import PeakMemory, count_diffusers_cp, cpu_accelerator_count, rotated
from .markdown import markdown_table, step_ranges
from .plot import write_plot
from .report import build_report, psnr
from .rows import (
    RowSpec,
    analytic_bytes_per_forward,
    mid_size_config,
    plan_rows,
    rope_axes,
    scaling_rows,
    transformer_config,
)
from .run import run_bench, write_outputs
from .settings import PRESETS, ROW_KEYS, BenchSettings, add_bench_arguments, settings_from_args
from .worker import forward_inputs, materialize_random_transformer, pipeline_inputs


__all__ = [
    "PRESETS",
    "ROW_KEYS",
    "BenchSettings",
    "PeakMemory",
    "RowSpec",
    "add_bench_arguments",
    "analytic_bytes_per_forward",
    "build_report",
    "count_diffusers_cp",
    "cpu_accelerator_count",
    "forward_inputs",
    "markdown_table",
    "materialize_random_transformer",
    "mid_size_config",
    "pipeline_inputs",
    "plan_rows",
    "psnr",
    "rope_axes",
    "rotated",
    "run_bench",
    "scaling_rows",
    "settings_from_args",
    "step_ranges",
    "transformer_config",
    "write_outputs",
    "write_plot",
]

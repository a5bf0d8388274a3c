"""`python -m diffusers_qwen_sp doctor`: a GPU self-check in one command, proven on the CPU first (`--small`).

Everything this package is for happens on GPUs, and GPU time comes in short windows, so one prepared command checks
all of it in under 8 minutes on one H100/H200-class GPU, and the same code runs on a tiny model on the CPU in under 2
minutes (`--small`), so that no GPU minute goes to debugging the check itself. Sections, in order:

1. `environment` ([`check_environment`]): torch, CUDA, cuDNN, NCCL, GPUs and their memory, flash-attn, CPU.
2. `attention` ([`check_attention`]): every `attention_with_lse` backend that runs here, against a float32 reference,
   in bf16 and fp16 (CPU: fp32, bf16, fp16), with and without a key mask, at Sq = Sk = 1027 and 37 x 61.
3. `transformer` ([`check_transformer`]): stock diffusers vs ours at 1024x1024 and 1328x1328 (batch 1, padded text
   mask), eager and with `compile_repeated_blocks()`: time per forward, overhead ratio, peak memory, compile time.
4. `teacache` ([`check_teacache`]): TeaCache 0.2 over a 50-step true-CFG run (pipeline, latents out): measured
   speed-up against the ideal (calls / computed calls).
5. `multi_gpu` ([`check_multi_gpu`]): with >= 2 GPUs, Ulysses, Ring and Ulysses x Ring over NCCL: scaling, bytes per
   forward against the analytic minimum, parity with one GPU. Skipped with the reason otherwise.

Results go to `benchmarks/results/<device>/doctor.json` and `doctor.md` (`nvidia-h200`, `cpu-small`, ...); every
section carries its verdict and wall time, and the command exits non-zero when a check fails.

Where the GPU run's time goes (one H200, full-size model of 20 B parameters in bf16, about 0.2-0.3 s per forward at
1024x1024 and 0.4-0.6 s at 1328x1328): start-up and imports ~15 s; environment < 1 s; attention ~5 s (80 kernel
calls of < 1 ms plus the float32 references); building the random model on the GPU ~15-30 s; transformer eager ~10 s
(16 forwards); **compilation dominates**: inductor compiles one block at 1024 and recompiles it with dynamic shapes at
1328, ~1-3 min (our model reuses the stock graphs), then 12 compiled forwards ~5 s; **TeaCache** ~40-50 s (100
uncached forwards, then the cached run). About 3-5 minutes in all, under the 8-minute budget (`--timeout 480`): a
part that has not started when the budget is spent is reported as skipped. With several GPUs the multi-GPU section
adds one spawn per world size (every GPU, then 2): ~40-60 s each, mostly building the model on every GPU.

The package: [`settings`] (presets, sections, output folder), [`context`] (budget, shared model, timing),
[`environment`], [`attention_check`], [`transformer_check`], [`teacache_check`], [`multi_gpu`], [`report`] (verdict,
Markdown, files) and [`run`] ([`run_doctor`]).
"""

from .attention_check import TOLERANCES, check_attention, reference_attention, unsupported_reason
from .context import PARITY_BARS, Budget, DoctorContext, range_scaled_diff
from .environment import check_environment
from .multi_gpu import check_multi_gpu, plan_modes
from .report import markdown_report, overall_verdict, write_report
from .run import run_doctor
from .settings import PRESETS, SECTIONS, DoctorSettings, device_slug, output_dir
from .teacache_check import check_teacache
from .transformer_check import check_transformer


__all__ = [
    "PARITY_BARS",
    "PRESETS",
    "SECTIONS",
    "TOLERANCES",
    "Budget",
    "DoctorContext",
    "DoctorSettings",
    "check_attention",
    "check_environment",
    "check_multi_gpu",
    "check_teacache",
    "check_transformer",
    "device_slug",
    "markdown_report",
    "output_dir",
    "overall_verdict",
    "plan_modes",
    "range_scaled_diff",
    "reference_attention",
    "run_doctor",
    "unsupported_reason",
    "write_report",
]

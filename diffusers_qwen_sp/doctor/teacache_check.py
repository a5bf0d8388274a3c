"""Section `teacache`: TeaCache over a whole denoising run, measured speed-up against the ideal one.

Two `QwenImageSPPipeline`s over the same weights (one uncached, one with TeaCache at the threshold) are called with
random prompt embeddings for both CFG branches, true CFG, the real flow-match scheduler and `output_type="latent"`
(no text encoder, no VAE: the same for both, and not what is measured). The speed-up is uncached / cached time; the
ideal is transformer calls / computed calls, the speed-up if a skipped call cost nothing; their ratio is the
efficiency. The weights are random: which steps are skipped, and the PSNR of the cached latents against the uncached
ones, say how TeaCache behaves on this model, nothing about image quality.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..bench import forward_inputs, pipeline_inputs, psnr, rotated
from ..hooks import TeaCacheConfig
from ..models import QwenImageSPTransformer2DModel
from ..pipelines import QwenImageSPPipeline
from ..small_components import flow_match_scheduler_config
from .context import DoctorContext, median, time_call


def _pipeline(stock: torch.nn.Module, threshold: float | None) -> QwenImageSPPipeline:
    pipe = QwenImageSPPipeline(
        transformer=QwenImageSPTransformer2DModel.from_transformer(stock),  # fresh modules, the same weights
        scheduler=FlowMatchEulerDiscreteScheduler(**flow_match_scheduler_config()),
        vae=None, text_encoder=None, tokenizer=None,
    )
    pipe.set_progress_bar_config(disable=True)
    if threshold is not None:
        pipe.enable_teacache(TeaCacheConfig(threshold=threshold))
    return pipe


def check_teacache(context: DoctorContext) -> dict[str, Any]:
    r"""The `teacache` section; see the module docstring."""
    settings, device = context.settings, context.device
    dtype = settings.torch_dtype
    stock = context.stock_transformer()
    config = dict(stock.config)
    height, width = settings.sizes[0]
    bench = settings.bench_settings(height, width, steps=settings.teacache_steps)
    call = pipeline_inputs(config, bench, device, dtype)
    pipes = {"uncached": _pipeline(stock, None), "teacache": _pipeline(stock, settings.teacache_threshold)}
    # One untimed forward: the first CUDA call of a shape pays for kernel selection and workspaces.
    time_call(lambda: pipes["uncached"].transformer(**forward_inputs(config, bench, device, dtype))[0], device)

    times: dict[str, list[float]] = {name: [] for name in pipes}
    latents: dict[str, torch.Tensor] = {}
    computed: dict[str, list[int]] = {}
    skipped_reason = None
    for round_index in range(settings.teacache_repeats):
        for name in rotated(list(pipes), round_index):
            if context.budget.spent():
                skipped_reason = context.budget.reason
                break
            context.progress(f"doctor: TeaCache run, {name}, {settings.teacache_steps} steps at {height}x{width} ...")
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            output, elapsed = time_call(lambda: pipes[name](**call, generator=generator)[0], device)
            times[name].append(elapsed)
            latents.setdefault(name, output.detach().float().cpu())
            if name == "teacache":
                stats = pipes[name].teacache_stats()
                computed = {branch: list(entry["computed"]) for branch, entry in stats.items()}
        if skipped_reason:
            break

    calls = 2 * settings.teacache_steps  # one per step and CFG branch
    computed_calls = sum(len(steps) for steps in computed.values()) or None
    uncached_s, cached_s = median(times["uncached"]), median(times["teacache"])
    speedup = uncached_s / cached_s if uncached_s and cached_s else None
    ideal = calls / computed_calls if computed_calls else None
    efficiency = speedup / ideal if speedup and ideal else None
    if efficiency is None:
        verdict = "fail"
    elif settings.teacache_efficiency_bar is None:
        verdict = "info"
    else:
        verdict = "pass" if efficiency >= settings.teacache_efficiency_bar else "fail"
    similarity = psnr(latents["teacache"], latents["uncached"]) if len(latents) == 2 else None
    result: dict[str, Any] = {
        "verdict": verdict,
        "threshold": settings.teacache_threshold,
        "steps": settings.teacache_steps,
        "height": height,
        "width": width,
        "cfg_scale": settings.cfg_scale,
        "repeats": settings.teacache_repeats,
        "uncached_s": uncached_s,
        "teacache_s": cached_s,
        "times_s": times,
        "transformer_calls": calls,
        "computed_calls": computed_calls,
        "computed_steps": computed,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": efficiency,
        "efficiency_bar": settings.teacache_efficiency_bar,
        "latents_psnr_db": similarity if similarity is None or math.isfinite(similarity) else None,
        "latents_identical": similarity == math.inf,
    }
    if skipped_reason:
        result["cut_short"] = skipped_reason
    return result

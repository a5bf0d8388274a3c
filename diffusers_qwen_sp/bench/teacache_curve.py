"""`python -m diffusers_qwen_sp bench-teacache`: TeaCache's speed/quality curve on the trained scene model.

For every threshold, with sequence parallelism off (one process) and on (Ulysses over `--world` gloo processes), the
same prompts of the scene grammar are drawn uncached and cached, interleaved (each prompt runs every variant, in an
order rotated per prompt) so that the ratios hold on a noisy machine. Reported per threshold and mode:

- **speed-up**: the uncached wall-clock over the cached one (whole pipeline call, summed over the prompts), beside the
  ideal one, transformer calls over calls whose blocks were computed;
- **PSNR** of the cached images against the uncached ones of the same mode, on [0, 1] pixels (pooled MSE);
- **faithfulness**: the share of prompts whose image passes the grammar's checks ([`check_image`]): colours and
  counts right, and every check (relation and no stray colour too); uncached is the baseline;
- under SP, whether every prompt skipped exactly the steps it skipped without SP, and how far the uncached SP images
  are from the single-process ones.

Writes `teacache_curve.json`, `teacache_curve.md` and `teacache_curve.png` (the images of the first prompts for each
threshold) into `--output-dir`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import run_distributed
from ..scenes.grammar import check_image, scene_prompts
from ..scenes.model import (
    SCENE_DEFAULT_STEPS,
    SCENE_IMAGE_SIZE,
    SCENE_TEACACHE_COEFFICIENTS,
    generate_scene_image,
    load_scene_pipeline,
)
from .instrumentation import rotated
from .report import psnr


__all__ = [
    "CurveSettings",
    "markdown_curve",
    "run_curve",
    "write_curve_outputs",
    "write_grid",
]

UNCACHED = "uncached"


@dataclass(frozen=True)
class CurveSettings:
    r"""
    One `bench-teacache` run; picklable, so it travels to the spawned ranks.

    Args:
        model (`str`, *optional*): a scene-model folder; defaults to the shipped weights.
        thresholds (`tuple[float, ...]`): TeaCache thresholds, from 0.05 to 0.8 by default.
        prompts (`int`, defaults to `20`): prompts of the grammar drawn with `seed`.
        steps (`int`), cfg_scale (`float`, defaults to `4.0`): sampling of every call.
        world (`int`, defaults to `2`): processes of the SP-on mode (Ulysses degree); 1 skips that mode.
        threads (`int`, defaults to `1`): intra-op threads per process.
        coefficients (`tuple[float, ...]`): TeaCache's rescaling polynomial; defaults to the scene model's.
        warmup_steps (`int`, defaults to `0`): TeaCache's warm-up, the first steps always computed.
        timeout (`float`, defaults to `1800`): seconds for each spawned mode.
    """

    model: str | None = None
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
    prompts: int = 20
    steps: int = SCENE_DEFAULT_STEPS
    cfg_scale: float = 4.0
    world: int = 2
    threads: int = 1
    seed: int = 1234
    coefficients: tuple[float, ...] = SCENE_TEACACHE_COEFFICIENTS
    warmup_steps: int = 0
    timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not self.thresholds or any(not (t >= 0 and math.isfinite(t)) for t in self.thresholds):
            raise ValueError(f"thresholds must be numbers >= 0 (e.g. 0.05 0.2 0.8), got {self.thresholds!r}")
        if len(set(self.thresholds)) != len(self.thresholds):
            raise ValueError(f"thresholds repeat a value: {self.thresholds!r}; give each once")
        if not (self.cfg_scale > 0 and self.timeout > 0):
            raise ValueError(f"cfg_scale and timeout must be positive, got {self.cfg_scale!r} and {self.timeout!r}")
        for name in ("prompts", "steps", "world", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if not self.coefficients:
            raise ValueError("coefficients is empty: pass the polynomial calibrate-teacache printed for the model.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    @property
    def variants(self) -> dict[str, float | None]:
        r"""Variant name -> TeaCache threshold (`None`: uncached), in the order of the report."""
        return {UNCACHED: None, **{repr(float(threshold)): float(threshold) for threshold in self.thresholds}}


def _curve_worker(rank: int, world: int, settings: CurveSettings) -> dict[str, Any]:
    from ..pipelines import QwenImageSPPipeline

    torch.set_num_threads(settings.threads)
    pipe = load_scene_pipeline(settings.model, pipeline_cls=QwenImageSPPipeline)
    pipe.set_progress_bar_config(disable=True)
    if world > 1:
        pipe.enable_sequence_parallel(ulysses_degree=world)
    prompts = scene_prompts(settings.prompts, settings.seed)
    variants = settings.variants
    times: dict[str, list[float]] = {name: [] for name in variants}
    images: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    skips: dict[str, list[dict[str, list[int]]]] = {name: [] for name in variants}
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in variants}

    def set_variant(name: str) -> None:
        pipe.disable_teacache()  # a no-op when off
        if variants[name] is not None:
            pipe.enable_teacache(
                threshold=variants[name],
                num_inference_steps=settings.steps,
                coefficients=list(settings.coefficients),
                warmup_steps=settings.warmup_steps,
            )

    for name in (UNCACHED, list(variants)[-1]):  # untimed warm-up: first-call costs land on no variant
        set_variant(name)
        generate_scene_image(pipe, prompts[0], 0, settings.steps, settings.cfg_scale)
    for index, prompt in enumerate(prompts):
        # Rotate the order per prompt so that no variant always runs first or last.
        for name in rotated(list(variants), index):
            set_variant(name)
            start = time.perf_counter()
            images[name].append(generate_scene_image(pipe, prompt, index, settings.steps, settings.cfg_scale))
            times[name].append(time.perf_counter() - start)
            if name == UNCACHED:
                total = 2 * settings.steps  # cond and uncond branch
                calls[name].append((total, total))
                skips[name].append({})
            else:
                stats = pipe.teacache_stats()
                computed = sum(len(entry["computed"]) for entry in stats.values())
                skipped = sum(len(entry["skipped"]) for entry in stats.values())
                calls[name].append((computed + skipped, computed))
                skips[name].append({branch: list(entry["skipped"]) for branch, entry in stats.items()})
    pipe.disable_teacache()
    result: dict[str, Any] = {"times": times, "calls": calls, "skips": skips}
    if rank == 0:
        result["images"] = images
    return result


def _psnr(images: list[np.ndarray], references: list[np.ndarray]) -> float:
    # Pooled over all prompts, on [0, 1] pixels: (N, H, W, 3) uint8 stacks.
    return psnr(torch.from_numpy(np.stack(images)) / 255.0, torch.from_numpy(np.stack(references)) / 255.0, peak=1.0)


def _summarise(settings: CurveSettings, results: list[dict[str, Any]], prompts: list[str]) -> dict[str, Any]:
    variants = settings.variants
    # A call's time is its slowest rank's.
    times = {name: np.max([result["times"][name] for result in results], axis=0) for name in variants}
    images = results[0]["images"]
    uncached_total = float(times[UNCACHED].sum())
    rows = []
    for name in variants:
        checks = [check_image(image, prompt) for image, prompt in zip(images[name], prompts)]
        total_calls = sum(total for total, _ in results[0]["calls"][name])
        computed = sum(done for _, done in results[0]["calls"][name])
        rows.append({
            "variant": name,
            "threshold": variants[name],
            "seconds_per_image": float(times[name].mean()),
            "speedup": uncached_total / float(times[name].sum()),
            "ideal_speedup": total_calls / computed,
            "computed_calls": computed,
            "total_calls": total_calls,
            "psnr_db": _psnr(images[name], images[UNCACHED]),
            "colours_and_counts": sum(check.colours_and_counts for check in checks) / len(checks),
            "faithful": sum(check.faithful for check in checks) / len(checks),
            "passed": [check.faithful for check in checks],
            "skips": results[0]["skips"][name],
        })
    return {"rows": rows, "images": images}


def run_curve(settings: CurveSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    r"""
    Measure the curve with SP off and (when `settings.world > 1`) on. Returns the report (images as uint8 arrays
    under `"images"` per mode).
    """
    progress = progress or (lambda line: None)
    prompts = scene_prompts(settings.prompts, settings.seed)
    report: dict[str, Any] = {"settings": asdict(settings), "prompts": prompts, "modes": {}}
    start = time.perf_counter()
    worlds = [1] + ([settings.world] if settings.world > 1 else [])
    for world in worlds:
        mode = "off" if world == 1 else f"ulysses{world}"
        progress(f"SP {mode}: {len(prompts)} prompts x {len(settings.variants)} variants x {settings.steps} steps ...")
        mode_start = time.perf_counter()
        results = run_distributed(_curve_worker, world, settings, timeout=settings.timeout)
        report["modes"][mode] = _summarise(settings, results, prompts)
        report["modes"][mode]["wall_s"] = time.perf_counter() - mode_start
        progress(f"SP {mode}: done in {report['modes'][mode]['wall_s']:.0f} s")
    if len(worlds) > 1:
        off, on = report["modes"]["off"], report["modes"][f"ulysses{settings.world}"]
        on["max_pixel_diff_vs_off"] = int(max(
            np.abs(a.astype(np.int16) - b.astype(np.int16)).max()
            for a, b in zip(on["images"][UNCACHED], off["images"][UNCACHED])
        ))
        for row_on, row_off in zip(on["rows"], off["rows"]):
            row_on["same_skips_as_off"] = row_on["skips"] == row_off["skips"]
            row_on["sp_speedup"] = row_off["seconds_per_image"] / row_on["seconds_per_image"]
    report["wall_s"] = time.perf_counter() - start
    return report


def _fmt_db(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f}"


def markdown_curve(report: dict[str, Any]) -> str:
    r"""The curve as a Markdown table, one row per (mode, threshold)."""
    settings = report["settings"]
    lines = [
        f"TeaCache on the scene model: {settings['prompts']} prompts, {settings['steps']} steps, true CFG "
        f"{settings['cfg_scale']:g} (2 transformer calls per step), TeaCache warm-up "
        f"{settings.get('warmup_steps', 0)} steps, {settings['threads']} thread(s) per process.",
        "",
        "| SP | threshold | computed calls | ideal speed-up | measured speed-up | s / image | PSNR vs uncached (dB) "
        "| colours + counts | all checks | same skips as SP off |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in report["modes"].items():
        for row in result["rows"]:
            same = row.get("same_skips_as_off")
            lines.append(
                f"| {mode} | {row['variant']} | {row['computed_calls']} / {row['total_calls']} "
                f"| {row['ideal_speedup']:.2f}x | {row['speedup']:.2f}x | {row['seconds_per_image']:.2f} "
                f"| {_fmt_db(row['psnr_db'])} | {row['colours_and_counts']:.0%} | {row['faithful']:.0%} "
                f"| {'-' if same is None else ('yes' if same else 'NO')} |"
            )
    for mode, result in report["modes"].items():
        if "max_pixel_diff_vs_off" in result:
            speedups = [row["sp_speedup"] for row in result["rows"]]
            lines += [
                "",
                f"SP {mode}: uncached images differ from the single-process ones by at most "
                f"{result['max_pixel_diff_vs_off']} / 255; its speed-up per image over SP off is "
                f"{min(speedups):.2f}x to {max(speedups):.2f}x across the rows.",
            ]
    return "\n".join(lines) + "\n"


def write_grid(report: dict[str, Any], path: Path, mode: str = "off", rows: int = 4, scale: int = 2) -> None:
    r"""PNG of the first `rows` prompts (rows) for uncached and every threshold (columns), labelled."""
    from PIL import Image, ImageDraw

    images = report["modes"][mode]["images"]
    variants = list(images)
    rows = min(rows, len(report["prompts"]))
    cell, label = SCENE_IMAGE_SIZE * scale, 14
    grid = Image.new("RGB", (cell * len(variants), label + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(variants):
        draw.text((column * cell + 3, 1), name if name == UNCACHED else f"t={name}", fill="black")
        for row in range(rows):
            tile = Image.fromarray(images[name][row]).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (column * cell, label + row * cell))
    grid.save(path)


def write_curve_outputs(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    r"""Write `teacache_curve.json`, `.md` and `.png` (the images of the first prompts) of a [`run_curve`] report into
    `output_dir`. Adds the Markdown table under `report["table"]` and the paths under `report["files"]`; returns the
    paths by kind (`"json"`, `"md"`, `"png"`)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_curve(report)
    write_grid(report, output / "teacache_curve.png")
    serialisable = {
        **{key: value for key, value in report.items() if key != "modes"},
        "modes": {
            mode: {key: value for key, value in result.items() if key != "images"}
            for mode, result in report["modes"].items()
        },
    }
    (output / "teacache_curve.json").write_text(json.dumps(serialisable, indent=2) + "\n")
    (output / "teacache_curve.md").write_text(table)
    report["table"] = table
    report["files"] = {kind: output / f"teacache_curve.{kind}" for kind in ("json", "md", "png")}
    return report["files"]

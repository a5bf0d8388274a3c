"""The memory bench's report: the computed table, the measured rows, `memory.json` and `memory.md`
([`run_memory_bench`], [`write_memory_outputs`])."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .fit import (
    CARD_MARGIN,
    CARDS_GIB,
    CONFIGURATIONS,
    CUDA_OVERHEAD_BYTES,
    DEGREES,
    GIB,
    MODELS,
    PROMPT_TOKENS,
    FamilyModel,
    fit_table,
    parameter_summary,
)
from .measure import MemorySettings, measure_memory


MIB = 2**20
# Measured stages: (row key, label, the held-bytes key whose weights are resident then)
_STAGES = (
    ("forward replicated", "transformer forward, replicated weights"),
    ("forward sharded", "transformer forward, sharded weights"),
    ("encode replicated", "prompt encode, TE replicated"),
    ("encode one_rank", "prompt encode, TE on one rank"),
    ("encode sharded", "prompt encode, TE sharded"),
    ("decode whole", "VAE decode, whole on every rank"),
    ("decode parallel", "VAE decode, patch-parallel"),
)
_HELD = (("held replicated", "replicated transformer, TE replicated"),
         ("held sharded", "sharded transformer, TE on one rank"),
         ("held te sharded", "sharded transformer, TE sharded"))


def computed_report(models: tuple[FamilyModel, ...] = MODELS) -> dict[str, Any]:
    r"""The computed part: parameter counts of the real configs and the fit table of `models` (see `fit`)."""
    return {
        "parameters": parameter_summary(),
        "assumptions": {
            "dtype": "bfloat16", "batch": 1, "prompt_tokens": PROMPT_TOKENS, "true_cfg": "sequential, batch 1",
            "cuda_overhead_gib": CUDA_OVERHEAD_BYTES / GIB, "card_margin": CARD_MARGIN, "cards_gib": list(CARDS_GIB),
        },
        "rows": fit_table(models),
    }


def run_memory_bench(settings: MemorySettings | None = None, computed: bool = True, measured: bool = True,
                     progress: Any = None, models: tuple[FamilyModel, ...] = MODELS) -> dict[str, Any]:
    r"""
    The whole bench: the computed table of `models` (about 20 s for all of them, no GPU) and the measured run on CPU
    (see `measure_memory`).

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.memory import QUICK, run_memory_bench, write_memory_outputs

    >>> report = run_memory_bench(QUICK)
    >>> write_memory_outputs(report, "bench-results")
    ```
    """
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": "cpu", "torch": torch.__version__, "machine": platform.machine(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if computed:
        report["computed"] = computed_report(models)
        if progress is not None:
            progress(f"computed table: {time.perf_counter() - start:.0f} s")
    if measured:
        report["measured"] = measure_memory(settings, progress=progress)
    report["wall_s"] = time.perf_counter() - start
    report["markdown"] = markdown(report)
    return report


# ---------------------------------------------------------------------------------------------------- markdown


def _cell(row: dict[str, Any]) -> str:
    cards = [card for card in CARDS_GIB if row["fits"][f"{card}GB"]]
    return f"{row['peak_gib']:.1f} ({cards[0]} GB)" if cards else f"{row['peak_gib']:.1f} (none)"


def computed_markdown(computed: dict[str, Any]) -> str:
    r"""The computed part as Markdown: parameter counts, then peak GiB per GPU and the smallest card that fits."""
    params = computed["parameters"]
    lines = [
        "Parameters computed from the real configs (meta device):",
        "",
        "| component | computed | published | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("transformer", "text_encoder", "vae"):
        entry = params[name]
        lines.append(f"| {name} | {entry['computed'] / 1e9:.3f} B | {entry['published'] / 1e9:.3f} B | "
                     f"{entry['ratio']:.4f} |")
    assumptions = computed["assumptions"]
    lines += [
        "",
        f"Per-GPU peak in GiB (bf16, batch 1, {assumptions['prompt_tokens']}-token prompt, true CFG) and, in "
        f"brackets, the smallest card it fits: peak + {assumptions['cuda_overhead_gib']:.1f} GiB (CUDA context, NCCL, "
        f"workspaces) <= {1 - assumptions['card_margin']:.0%} of the card. The fewest GPUs that fit each card:",
        "",
        summary_markdown(computed["rows"]),
        "",
        "Every configuration:",
        "",
        "| model | image | configuration | " + " | ".join(f"{n} GPUs" for n in DEGREES)
        + f" | peak at ({DEGREES[-1]} GPUs) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in DEGREES) + " | --- |",
    ]
    rows = computed["rows"]
    names = {config.key: config.name for config in CONFIGURATIONS}
    for model in MODELS:
        for side in model.resolutions:
            for config in CONFIGURATIONS:
                group = {row["gpus"]: row for row in rows if row["model"] == model.key and
                         row["resolution"] == side and row["configuration"] == config.key}
                if not group:
                    continue
                cells = " | ".join(_cell(group[n]) if n in group else "-" for n in DEGREES)
                stage = group[max(group)]["peak_stage"].replace("_", " ")
                lines.append(f"| {model.name} | {side}x{side} | {names[config.key]} | {cells} | {stage} |")
    return "\n".join(lines)


def fit_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r"""Per model, resolution and card: the fewest GPUs that fit, with the simplest configuration that does (the
    first of `CONFIGURATIONS` in order), or `None` when none of the table's does."""
    order = {config.key: index for index, config in enumerate(CONFIGURATIONS)}
    summary = []
    for model in MODELS:
        for side in model.resolutions:
            group = [row for row in rows if row["model"] == model.key and row["resolution"] == side]
            if not group:
                continue
            entry: dict[str, Any] = {"model": model.key, "model_name": model.name, "resolution": side, "cards": {}}
            for card in CARDS_GIB:
                fitting = [row for row in group if row["fits"][f"{card}GB"]]
                best = min(fitting, key=lambda row: (row["gpus"], order[row["configuration"]]), default=None)
                entry["cards"][f"{card}GB"] = None if best is None else {
                    "gpus": best["gpus"], "configuration": best["configuration"],
                    "configuration_name": best["configuration_name"], "peak_gib": best["peak_gib"]}
            summary.append(entry)
    return summary


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    r"""[`fit_summary`] as a Markdown table: per card, the fewest GPUs and the simplest configuration that fit."""
    lines = ["| model | image | " + " | ".join(f"{card} GB cards" for card in CARDS_GIB) + " |",
             "| --- | --- | " + " | ".join("---" for _ in CARDS_GIB) + " |"]
    for entry in fit_summary(rows):
        cells = []
        for card in CARDS_GIB:
            best = entry["cards"][f"{card}GB"]
            cells.append("no" if best is None else
                         f"{best['gpus']} GPUs, {best['configuration_name']} ({best['peak_gib']:.1f} GiB)")
        lines.append(f"| {entry['model_name']} | {entry['resolution']}x{entry['resolution']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def measured_markdown(measured: dict[str, Any]) -> str:
    r"""The measured part as Markdown: per world, bytes held and stage peaks per rank, the model's prediction beside
    each, and the targets."""
    settings = measured["settings"]
    lines = [
        f"Measured on CPU (gloo, one thread per rank, fp32, random weights): transformer {settings['layers']} blocks "
        f"of {settings['heads']} x {settings['head_dim']} heads, {settings['image_side'] ** 2} image + "
        f"{settings['text_tokens']} text tokens; text encoder {settings['te_layers']} layers, "
        f"{measured['prompt_tokens']}-token prompt; VAE base {settings['vae_base_dim']} channels, "
        f"{settings['decode_side']}x{settings['decode_side']} decode.",
    ]
    for world, entry in measured["worlds"].items():
        ranks = entry["ranks"]
        header = " | ".join(f"rank {rank['rank']}" for rank in ranks)
        lines += ["", f"World {world} ({entry['wall_s']:.0f} s): parameter MiB held per rank", "",
                  f"| configuration | component | {header} |", "| --- | --- | " + " | ".join("---" for _ in ranks) + " |"]
        for key, label in _HELD:
            for component in ("transformer", "text_encoder", "vae"):
                values = [rank[key] for rank in ranks]
                cells = " | ".join("skipped" if "skipped" in value else _mib(value[component]) for value in values)
                lines.append(f"| {label} | {component} | {cells} |")
        lines += ["", f"World {world}: peak MiB of live tensors per rank during each stage (computed model beside)",
                  "", f"| stage | {header} | computed | measured / computed |",
                  "| --- | " + " | ".join("---" for _ in ranks) + " | --- | --- |"]
        for key, label in _STAGES:
            values = [rank[key] for rank in ranks]
            if any(isinstance(value, dict) and "skipped" in value for value in values):
                reason = next(value["skipped"] for value in values if isinstance(value, dict) and "skipped" in value)
                lines.append(f"| {label} | skipped: {reason} |" + " |" * (len(ranks) + 1))
                continue
            predicted = entry["predicted"].get(key)
            worst = max(value for value in values if value)  # the encoding ranks
            ratio = f"{worst / predicted:.2f}" if predicted else "-"
            lines.append(f"| {label} | " + " | ".join(_mib(value) for value in values) +
                         f" | {_mib(predicted)} | {ratio} |")
        target = entry["targets"]
        lines += ["", f"- sharded / replicated transformer bytes per rank: {target['sharded_bytes_ratio']:.3f} "
                  f"(target <= {target['sharded_bytes_target']:.3f} = 1/{world} + one block): "
                  f"{'met' if target['sharded_met'] else 'MISSED'}"]
        one_rank = target["one_rank"]
        saved = ", ".join(_mib(value) for value in one_rank["saved_per_other_rank"])
        lines.append(f"- text encoder on one rank: the other ranks save {saved} MiB each, the whole encoder is "
                     f"{_mib(one_rank['text_encoder_bytes'])} MiB: {'met' if one_rank['met'] else 'MISSED'}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    parts = ["# Memory: what fits where", ""]
    if "computed" in report:
        parts += ["## Computed for the real models", "", computed_markdown(report["computed"]), ""]
    if "measured" in report:
        parts += ["## Measured on CPU", "", measured_markdown(report["measured"]), ""]
    return "\n".join(parts)


def write_memory_outputs(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    r"""Write `memory.json` and `memory.md` into `output_dir` (created); returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": output_dir / "memory.json", "md": output_dir / "memory.md"}
    body = {key: value for key, value in report.items() if key != "markdown"}
    files["json"].write_text(json.dumps(body, indent=1, default=str) + "\n")
    files["md"].write_text(report.get("markdown") or markdown(report))
    return files


__all__ = ["computed_markdown", "computed_report", "fit_summary", "markdown", "measured_markdown", "run_memory_bench",
           "summary_markdown", "write_memory_outputs"]

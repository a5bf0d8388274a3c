"""The doctor's report: the overall verdict, the Markdown summary, and `doctor.json` / `doctor.md` on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..bench.markdown import format_bytes
from ..bench.run import json_safe


# Section verdicts: "pass" / "fail" where the section has a bar, "info" where it only informs, "skipped" (with a
# reason), "error" (the section raised). The run passes when no section failed or raised.
FAILING = ("fail", "error")


def overall_verdict(sections: dict[str, dict[str, Any]]) -> str:
    r"""`"fail"` when any section failed or raised, else `"pass"`."""
    return "fail" if any(section.get("verdict") in FAILING for section in sections.values()) else "pass"


def _num(value: Any, spec: str = ".3g", suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _memory(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "—"
    above = summary.get("above_idle_bytes")
    return format_bytes(summary["peak_bytes"]) + (f" (+{format_bytes(above)})" if above is not None else "")


def _summary_line(name: str, section: dict[str, Any]) -> str:
    if section.get("skipped"):
        return section.get("reason", "")
    if section.get("verdict") == "error":
        return section.get("error", "")
    if name == "environment":
        gpus = ", ".join(f"{gpu['name']} ({format_bytes(gpu['memory_bytes'])})" for gpu in section["gpus"]) or "no GPU"
        flash = section["flash_attn"]
        return (f"torch {section['torch']}, CUDA {section['cuda_version']}, NCCL {section['nccl_version']}, {gpus}; "
                f"flash-attn {flash.get('version') if flash['available'] else 'absent'}; {section['cpu']['name']}")
    if name == "attention":
        counts = section["counts"]
        return (f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped "
                "(backend x dtype x mask x shape)")
    if name == "transformer":
        ratios = [_num(entry["overhead_ratio"], ".3f") for entry in section["eager"].values()]
        return f"ours / stock per forward (eager): {', '.join(ratios)}"
    if name == "teacache":
        return (f"speed-up {_num(section['speedup'], '.2f', 'x')} vs ideal {_num(section['ideal_speedup'], '.2f', 'x')}"
                f" (efficiency {_num(section['efficiency'], '.2f')})")
    if name == "multi_gpu":
        return f"{len(section['worlds'])} world size(s) over {section['backend']}"
    return ""


def _attention_table(section: dict[str, Any]) -> list[str]:
    lines = ["| backend | dtype | mask | Sq x Sk | out max err (tol) | LSE max err (tol) | time / call | status |",
             "|---|---|---|---|---|---|---|---|"]
    skipped: dict[tuple[str, str], list[str]] = {}
    for row in section["rows"]:
        mask = "yes" if row["masked"] else "no"
        where = f"| {row['backend']} | {row['dtype']} | {mask} | {row['seq_q']} x {row['seq_k']}"
        if row["status"] == "skipped":
            combo = f"{row['dtype']}{' masked' if row['masked'] else ''}"
            skipped.setdefault((row["backend"], row.get("reason", "")), [])
            if combo not in skipped[(row["backend"], row.get("reason", ""))]:
                skipped[(row["backend"], row.get("reason", ""))].append(combo)
        elif "out_max_abs_err" not in row:
            lines.append(f"{where} | — | — | — | {row['status']}: {row.get('reason', '')} |")
        else:
            lines.append(
                f"{where} | {row['out_max_abs_err']:.1e} ({row['out_tolerance']:.0e}) | {row['lse_max_abs_err']:.1e} "
                f"({row['lse_tolerance']:.0e}) | {_seconds(row['time_s'])} | {row['status']} |"
            )
    if skipped:
        lines += ["", "Skipped:"] + [f"- {backend} ({', '.join(combos)}): {reason}"
                                     for (backend, reason), combos in skipped.items()]
    return lines


def _diff(diff: dict[str, float] | None) -> str:
    return f"{_num(diff['mean'], '.1e')} / {_num(diff['max'], '.1e')}" if diff else "—"


def _transformer_table(section: dict[str, Any]) -> list[str]:
    compiled = section["compiled"].get("sizes", {})
    lines = ["| size | model | eager / forward | peak memory (eager) | compiled / forward | compile time | "
             "ours vs stock, eager (mean / max) | compiled vs eager stock (mean / max) |",
             "|---|---|---|---|---|---|---|---|"]
    for size, entry in section["eager"].items():
        for name in ("stock", "ours"):
            done = compiled.get(size, {}).get(name, {})
            lines.append(
                f"| {size} | {name} | {_seconds(entry[name]['time_s'])} | {_memory(entry[name]['memory'])} | "
                f"{_seconds(done.get('time_s'))} | {_seconds(done.get('compile_s'))} | "
                f"{_diff(entry['ours_vs_stock']) if name == 'ours' else '—'} | {_diff(done.get('vs_eager_stock'))} |"
            )
    model = section.get("model") or {}
    lines.append("")
    lines.append(
        f"{_num(model.get('parameters'), ',')} parameters, {model.get('dtype')}, built in "
        f"{_num(model.get('build_s'), '.1f', ' s')}; medians of {section['repeats']} interleaved rounds after "
        f"{section['warmup']} warm-up. Diffs are |diff| / range of the stock output. Compile time = first call - "
        "steady state; ours reuses the block graphs compiled for stock (same block class)."
    )
    note = section["compiled"].get("reason") or section["compiled"].get("error")
    if note:
        lines.append(f"\nCompiled: {note}")
    return lines


def _steps(steps: list[int]) -> str:
    ranges, start = [], None
    for index, step in enumerate(steps):
        start = step if start is None else start
        if index + 1 == len(steps) or steps[index + 1] != step + 1:
            ranges.append(str(start) if start == step else f"{start}-{step}")
            start = None
    return ", ".join(ranges)


def _teacache_lines(section: dict[str, Any]) -> list[str]:
    bar = section["efficiency_bar"]
    lines = [
        f"Threshold {section['threshold']:g}, {section['steps']} steps with true CFG (scale {section['cfg_scale']:g}) "
        f"at {section['height']}x{section['width']}: uncached {_seconds(section['uncached_s'])}, TeaCache "
        f"{_seconds(section['teacache_s'])} per image (medians of {section['repeats']}); "
        f"{section['computed_calls']} of {section['transformer_calls']} transformer calls computed; speed-up "
        f"{_num(section['speedup'], '.2f', 'x')} against the ideal {_num(section['ideal_speedup'], '.2f', 'x')} "
        f"(efficiency {_num(section['efficiency'], '.2f')}, bar {_num(bar, '.2f') if bar is not None else 'none'}); "
        f"PSNR of the cached latents against the uncached ones {_num(section['latents_psnr_db'], '.1f', ' dB')} "
        "(random weights: how far the cached run drifts, not image quality).",
        "",
    ]
    lines += [f"- computed steps, {branch}: {_steps(steps)}" for branch, steps in section["computed_steps"].items()]
    return lines


def _multi_gpu_table(section: dict[str, Any]) -> list[str]:
    lines = ["| processes | mode | time / forward | speed-up | sent / forward / rank (minimum) | parity mean / max |",
             "|---|---|---|---|---|---|"]
    for world in section["worlds"]:
        if "rows" not in world:
            why = world.get("skipped") or world.get("error")
            lines.append(f"| {world['processes']} | — | — | — | — | {why} |")
            continue
        for row in world["rows"]:
            if "error" in row or "skipped" in row:
                why = f"error: {row['error']}" if "error" in row else f"skipped: {row['skipped']}"
                lines.append(f"| {row['processes']} | {row['mode']} | — | — | — | {why} |")
                continue
            parity = row.get("parity")
            lines.append(
                f"| {row['processes']} | {row['mode']} | {_seconds(row['time_s'])} | {_num(row['speedup'], '.2f', 'x')}"
                f" | {format_bytes(row.get('bytes_sent'))} ({format_bytes(row.get('bytes_minimum'))}) | "
                + (f"{parity['mean']:.1e} / {parity['max']:.1e} |" if parity else "— |")
            )
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    r"""The Markdown the CLI prints and `doctor.md` holds: a verdict per section, then a table per measuring
    section."""
    sections = report["sections"]
    lines = [
        f"**doctor: {report['verdict'].upper()}** on {report['device']} ({report['preset']} preset) in "
        f"{report['wall_s']:.0f} s (budget {report['timeout_s']:.0f} s)",
        "",
        "| section | verdict | wall | summary |",
        "|---|---|---|---|",
    ]
    for name, section in sections.items():
        lines.append(f"| {name} | {section.get('verdict')} | {_num(section.get('wall_s'), '.1f', ' s')} | "
                     f"{_summary_line(name, section)} |")
    details = (("attention", _attention_table), ("transformer", _transformer_table), ("teacache", _teacache_lines),
               ("multi_gpu", _multi_gpu_table))
    for name, table in details:
        section = sections.get(name, {})
        if section.get("verdict") in ("skipped", "error", None) or section.get("skipped"):
            continue
        lines += ["", f"### {name}", ""] + table(section)
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], directory: Path) -> dict[str, str]:
    r"""Write `doctor.json` and `doctor.md` into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "doctor.json", "markdown": directory / "doctor.md"}
    files = {name: str(path) for name, path in paths.items()}
    paths["markdown"].write_text("# diffusers_qwen_sp doctor\n\n" + report["markdown"])
    body = {key: value for key, value in report.items() if key != "markdown"}
    paths["json"].write_text(json.dumps(json_safe({**body, "files": files}), indent=2, allow_nan=False) + "\n")
    return files

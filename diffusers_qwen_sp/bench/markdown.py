"""`bench.md`: the main table of a report, its notes, the communication terms and the SP scaling
([`markdown_table`])."""

from __future__ import annotations

from typing import Any

from .report import FP32_TOLERANCE, NOISY_SPREAD, PSNR_NOTE, _ratio


def format_bytes(value: float | None) -> str:
    r"""`1536` -> `'1.50 KiB'`; `None` -> `'—'`."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown_table(report: dict[str, Any]) -> str:
    r"""The main table of a report, plus notes, the communication terms and the SP scaling, in Markdown."""
    env, model, inputs = report["environment"], report["model"], report["inputs"]
    config = model["config"]
    lines: list[str] = []
    where = (
        f"{env['processes']} x {env['device_name']} ({env['backend']})" if env["device"] == "cuda"
        else f"{env['processes']} gloo processes x {env['threads_per_rank']} thread on {env['cpu_count']} CPU cores "
             f"({env['device_name']})"
    )
    settings = report["settings"]
    forward, image = "forward" in settings["phases"], "image" in settings["phases"]
    workload = (
        f"{inputs['steps']} steps with true CFG ({inputs['transformer_calls_per_image']} transformer calls per image)"
        if image else "one transformer forward, batch 1"
    )
    rounds = " and ".join(
        f"{settings[f'{phase}_repeats']} ({phase})" for phase, on in (("forward", forward), ("image", image)) if on
    )
    lines.append(
        f"Qwen-Image transformer, {model['source']}: {config['num_layers']} layers, "
        f"{config['num_attention_heads']} heads x {config['attention_head_dim']}, {model['parameters'] / 1e6:,.1f} M "
        f"parameters, {model['dtype']}; {inputs['height']}x{inputs['width']} px = {inputs['image_tokens']} image "
        f"tokens, {inputs['text_tokens']} text tokens ({inputs['text_padding']} padded); {workload}; {where}; torch "
        f"{env['torch']}, diffusers {env['diffusers']}. Medians of {rounds} interleaved rounds after "
        f"{settings['warmup']} warm-up; the run took {report['wall_s']:.0f} s."
    )
    lines.append("")
    # The head-to-head with diffusers' own context parallelism, as a time ratio of the same run.
    by_key = {row["key"]: row for row in report["rows"] if row["status"] == "ok"}
    peer = by_key.get("diffusers-cp")
    for key, row in by_key.items():
        if peer is None or row["kind"] == "diffusers_cp" or row.get("ulysses") != peer.get("ulysses"):
            continue
        if row.get("ring", 1) == 1 and row.get("cfg", 1) == 1 and row.get("teacache_threshold") is None:
            ratio = _ratio(row.get("per_forward_s"), peer.get("per_forward_s"))
            if ratio is not None:
                lines.append(f"**{row['name']} / {peer['name']}, forward time: {ratio:.3f}** (below 1: ours is faster).")
                lines.append("")
    teacache_column = any(row.get("computed_calls") is not None for row in report["rows"])
    header = ["row", "procs"]
    if forward:
        header += ["forward (s)", "forward speed-up"]
    if image:
        header += ["image (s)", "image speed-up"]
    if teacache_column:
        header += ["TeaCache computed / calls (ideal)"]
    if image:
        header += ["PSNR vs stock (dB)"]
    header += ["peak memory / rank", "sent / forward / rank (minimum)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    notes: list[str] = []
    for row in report["rows"]:
        if row["status"] != "ok":
            notes.append(f"- **{row['name']}**: n/a — {row['reason']}")
            lines.append(f"| {row['name']} | {row['processes']} | n/a |" + " |" * (len(header) - 3))
            continue
        cells = [row["name"], str(row["processes"])]
        if forward:
            speed_forward = _fmt_x(row.get("forward_speedup_vs_stock"))
            if row.get("forward_speedup_vs_uncompiled") is not None:
                speed_forward += f" ({row['forward_speedup_vs_uncompiled']:.2f}x vs {row['uncompiled_row']})"
            cells += [_fmt_s(row.get("per_forward_s")), speed_forward]
        if image:
            speed_image = _fmt_x(row.get("image_speedup_vs_stock"))
            for versus in ("uncached", "uncompiled"):
                if row.get(f"image_speedup_vs_{versus}") is not None:
                    speed_image += f" ({row[f'image_speedup_vs_{versus}']:.2f}x vs {row[f'{versus}_row']})"
            cells += [_fmt_s(row.get("per_image_s")), speed_image]
        if teacache_column:
            teacache = "—"
            if row.get("computed_calls") is not None:
                teacache = f"{row['computed_calls']} / {row['transformer_calls']} ({row['ideal_speedup']:.2f}x)"
            cells.append(teacache)
        if image:
            if row.get("identical_to_stock"):
                cells.append("identical")
            elif row.get("psnr_vs_stock_db") is not None:
                cells.append(f"{row['psnr_vs_stock_db']:.1f}")
            else:
                cells.append("—")
        memory = row.get("peak_memory_per_rank_bytes")
        memory_cell = format_bytes(max(memory)) if memory else "—"
        above = [value for value in row.get("peak_memory_above_idle_per_rank_bytes") or [] if value is not None]
        if memory and above:
            memory_cell += f" (+{format_bytes(max(above))})"
        cells.append(memory_cell)
        if "bytes_per_forward_per_rank" in row:
            sent = format_bytes(row["bytes_per_forward_per_rank"])
            if row.get("analytic_min_bytes_per_forward"):
                sent += f" ({format_bytes(row['analytic_min_bytes_per_forward'])})"
        elif row.get("bytes_per_image_per_rank") is not None:
            calls = row.get("transformer_calls") or 1
            sent = f"{format_bytes(row['bytes_per_image_per_rank'] / calls)} avg per call"
        else:
            sent = "—"
        cells.append(sent)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = "Speed-ups are against the stock diffusers row of the same run"
    if teacache_column:
        note += (" (TeaCache rows also against their uncached row); *ideal* = transformer calls / computed calls, the "
                 "speed-up if a skipped call cost nothing")
    note += (
        ". Peak memory: the largest rank's during " + (report["rows"][0].get("peak_memory_during") or "one call")
        + ", with the rise above the memory in use just before the call in parentheses ("
        + (report["rows"][0].get("memory_method") or "n/a") + "). Sent: bytes one rank sends per transformer forward "
        "through collectives, with the analytic minimum of the algorithm in parentheses"
        + (" (rows without per-forward timing: the average over the calls of one image)." if image else ".")
    )
    lines.append(note)
    if any(row.get("psnr_vs_stock_db") is not None or row.get("identical_to_stock") for row in report["rows"]):
        lines.append(PSNR_NOTE)
    if notes:
        lines.append("")
        lines.extend(notes)

    noisy = sorted({
        row["name"] for row in report["rows"] for key in ("forward_spread", "image_spread")
        if row["status"] == "ok" and (row.get(key) or 0) > NOISY_SPREAD
    })
    if noisy:
        lines.append("")
        lines.append(
            f"Noisy: the rounds of {', '.join(noisy)} spread by more than {NOISY_SPREAD:.0%} of their median "
            "(interquartile range from 4 rounds on, else the whole range; other "
            "load on the machine?), so their median ratios are uncertain to about that much; more rounds "
            "(--forward-repeats, --image-repeats) or a quieter machine narrow them. Second estimates: the ratio of "
            "the fastest rounds (load only ever adds time) and, on CPU, of the median CPU seconds of the busiest "
            "rank's process (other processes hardly inflate it; it leaves out waiting for the other ranks, so it "
            "flatters the parallel rows):"
        )
        lines.append("")
        estimates = [("median", ""), ("fastest", "_fastest"), ("CPU time", "_cpu_time")]
        columns = [(phase, label, suffix) for phase, on in (("forward", forward), ("image", image)) if on
                   for label, suffix in estimates]
        lines.append("| row | " + " | ".join(f"{phase}: {label}" for phase, label, _ in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for row in report["rows"][1:]:
            if row["status"] == "ok":
                cells = [_fmt_x(row.get(f"{phase}_speedup_vs_stock{suffix}")) for phase, _, suffix in columns]
                lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")

    drift = [
        f"{row['name']} {row['forward_max_abs_diff_vs_stock']:.1e}"
        for row in report["rows"]
        if row["status"] == "ok" and row.get("forward_max_abs_diff_vs_stock") is not None and row["processes"] > 1
    ]
    if drift:
        lines.append("")
        lines.append("Max |diff| of every timed forward against the stock forward: " + ", ".join(drift) + ".")
        if report["model"]["dtype"] == "float32":
            off = [f"{row['name']} ({row['forward_calls_above_fp32_bar']} of {row['forward_calls_checked']} calls)"
                   for row in report["rows"] if row["status"] == "ok" and row.get("forward_calls_above_fp32_bar")]
            if off:
                lines.append(f"Calls above the fp32 parity bar of {FP32_TOLERANCE:g}: {', '.join(off)}.")

    comm = [row for row in report["rows"] if row["status"] == "ok" and row.get("analytic_terms")]
    if comm:
        lines.append("")
        lines.append("Communication per forward per rank, measured against the analytic minimum:")
        lines.append("")
        lines.append("| row | measured by operation | analytic terms | measured / minimum |")
        lines.append("|---|---|---|---|")
        for row in comm:
            measured = ", ".join(f"{op} {format_bytes(v)}" for op, v in row.get("bytes_per_forward_by_op", {}).items())
            terms = ", ".join(f"{op} {format_bytes(v)}" for op, v in row["analytic_terms"].items())
            ratio = row.get("bytes_measured_over_minimum")
            lines.append(f"| {row['name']} | {measured} | {terms} | {'—' if ratio is None else f'{ratio:.4f}'} |")

    teacache_rows = [row for row in report["rows"] if row.get("computed_steps")]
    if teacache_rows:
        lines.append("")
        lines.append("Steps TeaCache computed (first and last always):")
        lines.append("")
        for row in teacache_rows:
            steps = "; ".join(f"{branch} {step_ranges(s)}" for branch, s in row["computed_steps"].items())
            lines.append(f"- {row['name']}: {steps}")

    if any(entry["processes"] not in (1, report["environment"]["processes"]) for entry in report["scaling"]):
        lines.append("")
        lines.append("SP scaling, per forward (each against the stock forward of its own run):")
        lines.append("")
        lines.append("| processes | mode | forward (s) | stock forward (s) | speed-up | efficiency |")
        lines.append("|---|---|---|---|---|---|")
        for entry in report["scaling"]:
            efficiency = entry.get("efficiency")
            lines.append(
                f"| {entry['processes']} | {entry['mode']} | {_fmt_s(entry['per_forward_s'])} "
                f"| {_fmt_s(entry['stock_per_forward_s'])} | {_fmt_x(entry['speedup'])} "
                f"| {'—' if efficiency is None else f'{efficiency:.0%}'} |"
            )
    return "\n".join(lines) + "\n"


def step_ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts: list[list[int]] = []
    for step in steps:
        if parts and step == parts[-1][1] + 1:
            parts[-1][1] = step
        else:
            parts.append([step, step])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"

"""`bench.png`: a bar chart of the speed-ups and, with SP scaling, a scaling panel ([`write_plot`]; matplotlib when
importable, else Pillow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plot_bars(report: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, forward speed-up, image speed-up, ideal) per measured row."""
    bars = []
    for row in report["rows"]:
        if row["status"] != "ok":
            continue
        bars.append((row["name"], row.get("forward_speedup_vs_stock"), row.get("image_speedup_vs_stock"),
                     row.get("ideal_image_speedup_vs_stock")))
    return bars


def _plot_title(report: dict[str, Any]) -> str:
    env, model, inputs = report["environment"], report["model"], report["inputs"]
    config = model["config"]
    where = f"{env['processes']} x {env['device_name']}" if env["device"] == "cuda" else (
        f"{env['processes']} CPU processes x {env['threads_per_rank']} thread")
    return (
        f"Speed-up vs stock diffusers ({where}; {config['num_layers']} layers, {config['num_attention_heads']}x"
        f"{config['attention_head_dim']}, {model['dtype']}, {inputs['height']}x{inputs['width']} px, "
        f"{inputs['steps']} steps)"
    )


def write_plot(report: dict[str, Any], path: Path) -> str:
    r"""Write a PNG bar chart of the speed-ups (matplotlib when importable, else Pillow). Returns the renderer used."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(report, path)
        return "pillow"
    bars = _plot_bars(report)
    scaling = report["scaling"]
    panels = 2 if len(scaling) > 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels + 3, 0.45 * len(bars) + 2), squeeze=False)
    axis = axes[0][0]
    positions = list(range(len(bars)))
    height = 0.38
    forward = [b[1] or 0 for b in bars]
    image = [b[2] or 0 for b in bars]
    axis.barh([p - height / 2 for p in positions], forward, height, label="per forward", color="#4c78a8")
    axis.barh([p + height / 2 for p in positions], image, height, label="per image", color="#f58518")
    for p, (_, f, i, ideal) in zip(positions, bars):
        if f:
            axis.text(f, p - height / 2, f" {f:.2f}x", va="center", fontsize=8)
        if i:
            axis.text(i, p + height / 2, f" {i:.2f}x", va="center", fontsize=8)
        if ideal:
            axis.plot([ideal], [p + height / 2], marker="|", color="black", markersize=12)
    axis.axvline(1.0, color="gray", linewidth=0.8)
    axis.set_yticks(positions, [b[0] for b in bars])
    axis.invert_yaxis()
    axis.set_xlabel("speed-up vs stock diffusers (| = TeaCache ideal: uncached row x calls / computed)")
    axis.legend(loc="lower right")
    if panels == 2:
        axis2 = axes[0][1]
        labels = {"ulysses": "Ulysses", "ring": "Ring", "usp": "Ulysses x Ring 2"}
        for algorithm, label in labels.items():
            points = [(1, scaling[0]["speedup"])] + [
                (s["processes"], s["speedup"]) for s in scaling if s["algorithm"] == algorithm and s["speedup"]
            ]
            if len(points) > 1:
                axis2.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        top = max(s["processes"] for s in scaling)
        axis2.plot([1, top], [1, top], linestyle="--", color="gray", label="linear")
        axis2.set_xlabel("processes")
        axis2.set_ylabel("speed-up per forward")
        axis2.legend()
    fig.suptitle(_plot_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


def pil_fonts(sizes: tuple[int, ...] = (14, 12)) -> tuple[Any, ...]:
    r"""Pillow's default font at each of `sizes` (one bitmap size for all before Pillow 10.1)."""
    from PIL import ImageFont

    try:
        return tuple(ImageFont.load_default(size=size) for size in sizes)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return tuple(ImageFont.load_default() for _ in sizes)


def _plot_with_pil(report: dict[str, Any], path: Path) -> None:
    from PIL import Image, ImageDraw

    bars = _plot_bars(report)
    font, small = pil_fonts()
    label_width, bar_area, margin = 300, 560, 20
    row_height, top = 44, 64
    width = label_width + bar_area + 120
    height = top + row_height * len(bars) + 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), _plot_title(report), fill="black", font=small)
    largest = max([v for b in bars for v in b[1:] if v] + [1.0])
    scale = bar_area / (largest * 1.1)
    x0 = label_width
    colors = {"per forward": (76, 120, 168), "per image": (245, 133, 24)}
    for index, (label, forward, per_image, ideal) in enumerate(bars):
        y = top + index * row_height
        draw.text((margin, y + 12), label, fill="black", font=font)
        for offset, value, color in ((0, forward, colors["per forward"]), (20, per_image, colors["per image"])):
            if not value:
                continue
            draw.rectangle([x0, y + offset + 2, x0 + value * scale, y + offset + 18], fill=color)
            draw.text((x0 + value * scale + 4, y + offset + 3), f"{value:.2f}x", fill="black", font=small)
        if ideal:
            x = x0 + ideal * scale
            draw.line([x, y + 20, x, y + 40], fill="black", width=3)
    one = x0 + 1.0 * scale
    draw.line([one, top - 6, one, top + row_height * len(bars)], fill=(128, 128, 128), width=1)
    legend_y = top + row_height * len(bars) + 14
    for offset, (name, color) in enumerate(colors.items()):
        lx = margin + offset * 180
        draw.rectangle([lx, legend_y, lx + 16, legend_y + 14], fill=color)
        draw.text((lx + 22, legend_y), name, fill="black", font=small)
    draw.line([margin + 372, legend_y, margin + 372, legend_y + 16], fill="black", width=3)
    legend = "TeaCache ideal (uncached row x calls / computed); grey: 1.0x"
    draw.text((margin + 380, legend_y), legend, fill="black", font=small)
    image.save(path, format="PNG")

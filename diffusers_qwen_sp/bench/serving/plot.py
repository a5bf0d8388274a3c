"""`serve.png`: images/s against concurrency, one line per server configuration with the baselines as dashed levels
(left), and the p50 / p95 latency of every point as bars (right). Drawn with Pillow (no matplotlib needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..plot import pil_fonts


# One colour per row, in row order (Tableau 10).
PALETTE = [(76, 120, 168), (245, 133, 24), (84, 162, 75), (228, 87, 86), (114, 183, 178), (178, 121, 162),
           (238, 202, 59), (157, 117, 93)]
GRID = (225, 225, 225)


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value`."""
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 2.5, 5, 10) if step * scale >= value)


def _lighter(color: tuple[int, int, int], amount: float = 0.55) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * amount) for c in color)


def write_serve_plot(report: dict[str, Any], path: Path) -> None:
    r"""Write the PNG of a `bench-serve` report (see the module docstring)."""
    from PIL import Image, ImageDraw

    font, small = pil_fonts((14, 12))
    rows = [row for row in report["rows"] if row["status"] == "ok"]
    colors = {row["name"]: PALETTE[index % len(PALETTE)] for index, row in enumerate(report["rows"])}
    bars = [(row, point) for row in rows for point in row["points"]]
    width, left_w, top = 1400, 620, 56
    height = max(500, top + 26 * len(bars) + 80)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 10), report["title"], fill="black", font=font)

    # Left: images/s against concurrency (categorical axis), server rows as lines, baselines as dashed levels.
    x0, y0, x1, y1 = 70, top + 20, left_w - 20, height - 150
    concurrencies = report["settings"]["concurrencies"]
    rates = [p["images_per_s"] for _, p in bars if p["images_per_s"]]
    y_top = _nice_top(max(rates + [1e-9]) * 1.1)
    draw.text((x0, top), "images/s against concurrency", fill="black", font=font)

    def x_of(concurrency: int) -> float:
        index = concurrencies.index(concurrency)
        return x0 + 40 + index * (x1 - x0 - 80) / max(1, len(concurrencies) - 1)

    def y_of(value: float) -> float:
        return y1 - value / y_top * (y1 - y0)

    for tick in range(6):
        value = y_top * tick / 5
        draw.line([x0, y_of(value), x1, y_of(value)], fill=GRID)
        draw.text((x0 - 46, y_of(value) - 7), f"{value:.3g}", fill="black", font=small)
    for concurrency in concurrencies:
        draw.text((x_of(concurrency) - 6, y1 + 6), str(concurrency), fill="black", font=small)
    draw.text(((x0 + x1) // 2 - 70, y1 + 24), "concurrent clients", fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    legend_y = y1 + 48
    for index, row in enumerate(rows):
        color = colors[row["name"]]
        points = [(x_of(p["concurrency"]), y_of(p["images_per_s"])) for p in row["points"] if p["images_per_s"]]
        if row["kind"] == "server":
            if len(points) > 1:
                draw.line(points, fill=color, width=3)
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        else:  # a baseline at concurrency 1: a dashed level across the panel
            y = points[0][1] if points else y1
            for start in range(x0, x1, 16):
                draw.line([start, y, min(start + 8, x1), y], fill=color, width=2)
        lx, ly = x0 + (index % 2) * 270, legend_y + (index // 2) * 18
        draw.rectangle([lx, ly + 3, lx + 14, ly + 13], fill=color)
        draw.text((lx + 20, ly), row["name"] if row["kind"] == "server" else f"{row['name']} (dashed)",
                  fill="black", font=small)

    # Right: p50 (solid) and p95 (light) latency of every point, one pair of bars per (configuration, concurrency), on
    # a log axis: one `generate` process per image takes tens of times a served request.
    bx0, label_w = left_w + 20, 300
    area_x0, area_x1 = bx0 + label_w, width - 90
    values = [v for _, p in bars for v in (p["latency_p50_s"], p["latency_p95_s"]) if v]
    low = math.floor(math.log10(0.5 * min(values + [1.0])))  # half a decade of room below the shortest bar
    high = max(low + 1, math.ceil(math.log10(max(values + [1.0]))))

    def x_at(value: float) -> float:
        return area_x0 + (math.log10(value) - low) / (high - low) * (area_x1 - area_x0)

    draw.text((bx0, top), "latency per request (s, log scale): p50 solid, p95 light", fill="black", font=font)
    bottom = top + 24 + 26 * len(bars)
    for exponent in range(low, high + 1):
        x = x_at(10.0**exponent)
        draw.line([x, top + 24, x, bottom], fill=GRID)
        draw.text((x - 10, bottom + 6), f"{10.0**exponent:g}", fill="black", font=small)
    for index, (row, point) in enumerate(bars):
        y = top + 26 + 26 * index
        color = colors[row["name"]]
        label = row["name"] if row["kind"] != "server" else f"{row['key']}, c={point['concurrency']}"
        draw.text((bx0, y + 4), label, fill="black", font=small)
        for value, shade, offset in ((point["latency_p95_s"], _lighter(color), 0),
                                     (point["latency_p50_s"], color, 6)):
            if value:
                draw.rectangle([area_x0, y + offset, x_at(value), y + 20 - offset], fill=shade)
        if point["latency_p95_s"]:
            draw.text((x_at(point["latency_p95_s"]) + 4, y + 4),
                      f"{point['latency_p50_s']:.2f} / {point['latency_p95_s']:.2f}", fill="black", font=small)
    image.save(path, format="PNG")


__all__ = ["write_serve_plot"]

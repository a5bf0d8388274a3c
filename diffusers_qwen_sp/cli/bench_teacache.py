"""`diffusers-qwen-sp bench-teacache`: TeaCache's speed/quality curve on the trained scene model, with sequence
parallelism on and off (the measuring is `diffusers_qwen_sp.bench.teacache_curve`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..bench.teacache_curve import CurveSettings, run_curve, write_curve_outputs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-teacache",
        help="TeaCache's speed/quality curve on the trained scene model, with sequence parallelism on and off",
        description="For each threshold: speed-up over uncached, PSNR against the uncached image and prompt "
        "faithfulness judged by the scene grammar's checks. Writes JSON, a Markdown table and a PNG of the images.",
    )
    # One option per CurveSettings field; None keeps the field's default, which the help shows.
    defaults = CurveSettings.__dataclass_fields__
    parser.add_argument("--output-dir", default="bench-results", help="default: bench-results/")
    parser.add_argument("--model", default=None, help="scene-model folder (default: the shipped weights)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help=f"default: {' '.join(map(str, defaults['thresholds'].default))}")
    for name in ("prompts", "steps", "world", "threads", "seed", "warmup_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default: {defaults[name].default}")
    parser.add_argument("--cfg-scale", type=float, default=None, help=f"default: {defaults['cfg_scale'].default}")
    parser.add_argument("--coefficients", type=float, nargs="+", default=None,
                        help="TeaCache polynomial, highest power first (default: the scene model's)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds per mode (default: {defaults['timeout'].default:g})")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> CurveSettings:
    r"""The [`CurveSettings`] of the options given; the others keep their defaults."""
    values = {
        item.name: getattr(args, item.name)
        for item in fields(CurveSettings)
        if getattr(args, item.name, None) is not None
    }
    for name in ("thresholds", "coefficients"):
        if name in values:
            values[name] = tuple(values[name])
    return CurveSettings(**values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    report = run_curve(settings_from_args(args), progress=lambda line: print(line, flush=True))
    files = write_curve_outputs(report, args.output_dir)
    print(f"\n{report['table']}")
    print(f"wrote {files['json']}, {files['md']}, {files['png']} ({report['wall_s']:.0f} s)")
    return report

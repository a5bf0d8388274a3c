"""`diffusers-qwen-sp bench`: measure stock diffusers, our SP modes, diffusers' context parallelism and TeaCache on this
machine (the measuring is `diffusers_qwen_sp.bench`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..bench import add_bench_arguments, markdown_table, run_bench


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure stock diffusers, our SP modes, diffusers' context parallelism and TeaCache on this machine",
        description="One run, interleaved, medians: every comparison is a ratio measured in the same run. Writes "
        "JSON, a Markdown table and a PNG plot.",
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    report = run_bench(args, progress=lambda line: print(line, flush=True))
    print(f"\n{markdown_table(report)}")
    files = report["files"]
    print(f"wrote {files['json']}, {files['markdown']}, {files['plot']} ({report['wall_s']:.0f} s)")
    return report

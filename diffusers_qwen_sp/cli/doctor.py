"""`diffusers-qwen-sp doctor`: a GPU self-check in one command, proven on the CPU with `--small` (the checking is
`diffusers_qwen_sp.doctor`)."""

from __future__ import annotations

import argparse
import faulthandler
from typing import Any

from ..doctor import SECTIONS, DoctorSettings, run_doctor


# The process ends this long after the budget even if a call hangs (a CUDA kernel, a compile, a collective), with the
# traceback of every thread on stderr; the report files keep the sections finished before.
HARD_STOP_GRACE_S = 60.0


def _sections(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(SECTIONS)}, got {value!r}")
    return names


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value}")
    return number


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="GPU self-check: environment, attention kernels, stock vs ours (eager and compiled), TeaCache, multi-GPU",
        description="One command that checks this package on a GPU in under 8 minutes: attention backends against a "
        "float32 reference, the full-size Qwen-Image transformer (random weights) stock vs ours, eager and compiled, "
        "TeaCache over 50 steps, and Ulysses / Ring over NCCL with 2+ GPUs. Writes doctor.json and doctor.md; exits "
        "with 1 when a check fails. --small runs the same code on a tiny model on the CPU in under 2 minutes.",
    )
    parser.add_argument("--small", action="store_true",
                        help="tiny model on the CPU (fp32, aot_eager compile, 10 TeaCache steps): proves the check")
    parser.add_argument("--output-dir", default=None,
                        help="default: benchmarks/results/<device>/ (e.g. nvidia-h200, cpu-small)")
    parser.add_argument("--sections", type=_sections, default=None,
                        help=f"comma list of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--timeout", type=_seconds, default=None,
                        help="seconds for the whole check (default: 480, 120 with --small); parts not started by then "
                        "are reported as skipped and the check fails; the process is stopped "
                        f"{HARD_STOP_GRACE_S:.0f} s later whatever it is doing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    r"""Run the `doctor` command: print progress and the Markdown summary; `SystemExit(1)` when a check failed."""
    settings = DoctorSettings.from_preset(
        small=args.small, output_dir=args.output_dir, sections=args.sections, timeout=args.timeout
    )
    faulthandler.dump_traceback_later(settings.timeout + HARD_STOP_GRACE_S, exit=True)
    try:
        report = run_doctor(settings, progress=lambda line: print(line, flush=True))
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"\n{report['markdown']}")
    files = report["files"]
    print(f"wrote {files['json']}, {files['markdown']} ({report['wall_s']:.0f} s)")
    if report["verdict"] != "pass":
        raise SystemExit(1)
    return report

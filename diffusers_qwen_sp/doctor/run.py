"""[`run_doctor`]: run the selected sections in order, each timed and isolated, and write the report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .attention_check import check_attention
from .context import Budget, DoctorContext, describe, free_memory
from .environment import check_environment
from .multi_gpu import check_multi_gpu
from .report import markdown_report, overall_verdict, write_report
from .settings import SECTIONS, DoctorSettings, device_slug, output_dir
from .teacache_check import check_teacache
from .transformer_check import check_transformer


logger = logging.get_logger(__name__)

CHECKS: dict[str, Callable[[DoctorContext], dict[str, Any]]] = {
    "environment": check_environment,
    "attention": check_attention,
    "transformer": check_transformer,
    "teacache": check_teacache,
    "multi_gpu": check_multi_gpu,
}


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_doctor(settings: DoctorSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    r"""
    Run the doctor: every selected section of [`SECTIONS`] in order, write `doctor.json` and `doctor.md`, and return
    the report.

    Each section is timed (`wall_s`) and carries its verdict (`"pass"`/`"fail"` where it has a bar, `"info"`,
    `"skipped"` with a `reason`, or `"error"` with the exception when it raised: the next sections still run). The
    run's `verdict` is `"fail"` when a section failed or raised, or when the run took longer than `settings.timeout`.
    The files are rewritten after every section (`verdict` `"incomplete"` until the end), so a run killed from
    outside leaves the sections it finished.

    Args:
        settings ([`DoctorSettings`]): e.g. `DoctorSettings.from_preset(small=True)`.
        progress (`Callable[[str], None]`, *optional*): receives a line per step (default: the logger).

    Returns:
        `dict`: the content of `doctor.json`: `verdict`, `device`, `preset`, `timeout_s`, `wall_s`, `settings`,
        `sections` (one dict per section name), `files`; plus `markdown`, the table the CLI prints.

    Example:

    ```py
    >>> from diffusers_qwen_sp.doctor import DoctorSettings, run_doctor

    >>> report = run_doctor(DoctorSettings.from_preset(small=True, output_dir="doctor-results"))
    >>> report["verdict"], report["sections"]["attention"]["verdict"]
    ('pass', 'pass')
    ```
    """
    progress = progress or logger.info
    device = torch.device("cuda", 0) if settings.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    budget = Budget(settings.timeout)
    context = DoctorContext(settings=settings, device=device, budget=budget, progress=progress)
    directory = output_dir(settings)
    sections: dict[str, dict[str, Any]] = {
        name: {"skipped": True, "verdict": "skipped", "reason": "not selected (--sections)", "wall_s": 0.0}
        for name in SECTIONS
        if name not in settings.sections
    }
    with _threads(settings.threads):
        for name in SECTIONS:
            if name not in settings.sections:
                continue
            progress(f"doctor: {name} ({budget.elapsed():.0f} s of {budget.seconds:.0f} s used) ...")
            start = time.perf_counter()
            if budget.spent():
                result = {"skipped": True, "verdict": "skipped", "reason": budget.reason}
            else:
                try:
                    result = CHECKS[name](context)
                except Exception as error:  # noqa: BLE001 - one broken section must not hide the others
                    logger.exception(f"doctor section {name} raised")
                    result = {"verdict": "error", "error": describe(error)}
            result["wall_s"] = time.perf_counter() - start
            sections[name] = result
            free_memory(device)
            # Written after every section: a run stopped from outside (a GPU lease ending) keeps what it measured.
            _report(settings, sections, budget, directory, final=False)
        context.release_model()
    return _report(settings, sections, budget, directory, final=True)


def _report(
    settings: DoctorSettings, sections: dict[str, dict[str, Any]], budget: Budget, directory: Path, final: bool
) -> dict[str, Any]:
    wall_s = budget.elapsed()
    verdict = overall_verdict(sections) if wall_s <= settings.timeout else "fail"
    report: dict[str, Any] = {
        "verdict": verdict if final else "incomplete",
        "device": device_slug(settings),
        "preset": settings.preset,
        "timeout_s": settings.timeout,
        "wall_s": wall_s,
        "within_budget": wall_s <= settings.timeout,
        "settings": dict(vars(settings)),
        "sections": {name: sections[name] for name in SECTIONS if name in sections},
    }
    report["markdown"] = markdown_report(report)
    report["files"] = write_report(report, directory)
    return report

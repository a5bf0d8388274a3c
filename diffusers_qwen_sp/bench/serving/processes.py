"""The processes `bench-serve` starts: the service under test ([`ServerProcess`]: one `serve` process, or torchrun
with one per replica) and the one-`generate`-process-per-image baseline ([`time_generate`]).

No process outlives the benchmark: [`ServerProcess.stop`] sends SIGTERM (the service drains and exits; torchrun
forwards it to its workers), waits, then kills the process group and every descendant recorded while it ran (torchrun
starts each worker in a session of its own, so the group alone would miss them).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from diffusers.utils import logging

from .settings import ServeBenchSettings, ServerSpec


logger = logging.get_logger(__name__)

_LISTENING = re.compile(r"Listening on (https?://\S+)")
# How long a drained service may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 12


def _children_by_parent() -> dict[int, list[int]]:
    """`{ppid: [pid, ...]}` from `/proc` (Linux); empty elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    r"""Every live descendant of `pid` (children, their children, ...), from `/proc`."""
    children = _children_by_parent()
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def is_alive(pid: int) -> bool:
    r"""Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cpu_seconds(pids: list[int] | set[int]) -> float:
    r"""User + system CPU seconds used so far by the live processes `pids` (from `/proc/<pid>/stat`; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / ticks


def server_command(spec: ServerSpec, settings: ServeBenchSettings) -> list[str]:
    r"""The command line of one configuration: `python -m diffusers_qwen_sp serve --port 0 ...`, under torchrun
    (`--standalone`: a free rendezvous port) with one process per replica when `spec.dp > 1`."""
    serve = ["-m", "diffusers_qwen_sp", "serve", "--host", "127.0.0.1", "--port", "0", *spec.serve_flags(),
             "--max-queue", str(max(64, 2 * settings.top_concurrency))]
    if settings.model is not None:
        serve += ["--model", settings.model]
    if settings.threads is not None:
        serve += ["--threads", str(settings.threads)]
    if spec.dp == 1:
        return [sys.executable, *serve]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(spec.dp), *serve]


class ServerFailed(RuntimeError):
    """The service exited or did not get ready; the message holds the reason and the tail of its output."""


class ServerProcess:
    r"""
    One service under test, started at construction: [`wait_ready`] returns its URL once `/health` answers 200,
    [`stop`] ends it and every process it started. Use as a context manager (or call `stop` in `finally`).

    Args:
        spec ([`ServerSpec`]): the configuration.
        settings ([`ServeBenchSettings`]): model, threads and timeouts.
    """

    def __init__(self, spec: ServerSpec, settings: ServeBenchSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.command = server_command(spec, settings)
        self.lines: list[str] = []
        self.url: str | None = None
        self.pids: set[int] = set()
        self.started_at = time.perf_counter()
        self.ready_s: float | None = None
        self._stopping = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.pids.add(self.popen.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"ServerProcess({self.spec.key}, pid={self.popen.pid}, url={self.url})"

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(line for line in self.lines[-lines:] if line.strip())

    def failure_reason(self) -> str:
        r"""One line saying why the service failed: its `error: ...` line if it printed one, else its last line."""
        errors = [line.split("error: ", 1)[1] for line in self.lines if "error: " in line]
        if errors:
            return errors[0].strip()
        tail = [line for line in self.lines if line.strip()]
        return tail[-1].strip() if tail else f"exit code {self.popen.poll()}"

    def _record_pids(self) -> None:
        self.pids.update(descendants(self.popen.pid))

    def wait_ready(self, timeout: float | None = None) -> str:
        r"""Wait until the service listens and `/health` answers 200; returns its URL. Raises [`ServerFailed`] when
        the process exits first or `timeout` (default: `settings.startup_timeout`) passes."""
        import httpx

        deadline = time.perf_counter() + (self.settings.startup_timeout if timeout is None else timeout)
        while True:
            self._record_pids()
            if self.popen.poll() is not None:
                self._reader.join(5)
                raise ServerFailed(
                    f"{self.spec.name} exited with code {self.popen.returncode} before it was ready: "
                    f"{self.failure_reason()}\n{self.log_tail()}"
                )
            if self.url is None:
                self.url = next((m.group(1) for line in list(self.lines) if (m := _LISTENING.search(line))), None)
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        self.ready_s = time.perf_counter() - self.started_at
                        self._record_pids()
                        return self.url
                except httpx.HTTPError:
                    pass
            if time.perf_counter() > deadline:
                raise ServerFailed(f"{self.spec.name} was not ready within {self.settings.startup_timeout:g} s "
                                   f"(raise --startup-timeout):\n{self.log_tail()}")
            time.sleep(0.1)

    def request_stop(self) -> None:
        r"""Send SIGTERM once (the service drains: it finishes what it accepted, then exits) without waiting; a second
        SIGTERM would tell it to stop at once."""
        if self.popen.poll() is None and not self._stopping:
            self._stopping = True
            self._record_pids()
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        r"""SIGTERM (drain), wait up to `timeout` s, then SIGKILL the process group and every recorded descendant.
        Returns the exit code (`None` if it had to be killed). Safe to call twice."""
        if self.popen.poll() is None:
            self.request_stop()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(f"{self.spec.name} did not exit {timeout:g} s after SIGTERM; killing it.")
        code = self.popen.poll()
        self._kill_leftovers()
        self._reader.join(5)
        return code

    def _kill_leftovers(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.perf_counter() + 5
        for pid in sorted(self.pids):
            # Workers still draining when the launcher exited get a moment, then SIGKILL.
            while is_alive(pid) and time.perf_counter() < deadline:
                time.sleep(0.05)
            if is_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def cpu_seconds(self) -> float:
        r"""CPU seconds used so far by the service's processes (the launcher and every replica)."""
        self._record_pids()
        return cpu_seconds(self.pids)

    def alive_pids(self) -> list[int]:
        r"""The processes of this service still running (empty after [`stop`])."""
        return [pid for pid in sorted(self.pids) if is_alive(pid)]


_GENERATE_TIME = re.compile(r" in ([0-9.]+) s")


def time_generate(settings: ServeBenchSettings, prompt: str, seed: int, output: Path) -> dict[str, float]:
    r"""
    Run `python -m diffusers_qwen_sp generate` for one image, as a user would; returns its wall-clock time (start-up,
    imports and model loading included), its CPU seconds, and the pipeline time it printed. Raises `RuntimeError` when
    it fails.
    """
    command = [sys.executable, "-m", "diffusers_qwen_sp", "generate", "--prompt", prompt, "--seed", str(seed),
               "--output", str(output)]
    if settings.model is not None:
        command += ["--model", settings.model]
    if settings.steps is not None:
        command += ["--steps", str(settings.steps)]
    if settings.size is not None:
        command += ["--height", str(settings.size), "--width", str(settings.size)]
    if settings.threads is not None:
        command += ["--threads", str(settings.threads)]
    start, cpu_before = time.perf_counter(), _children_cpu_seconds()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings.request_timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"`generate` took more than {settings.request_timeout:g} s") from error
    wall, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-_LOG_TAIL_LINES:])
        raise RuntimeError(f"`generate` exited with code {done.returncode}:\n{tail}")
    match = _GENERATE_TIME.search(done.stdout)
    return {"wall_s": wall, "cpu_s": cpu, "pipeline_s": float(match.group(1)) if match else float("nan")}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


__all__ = ["ServerFailed", "ServerProcess", "cpu_seconds", "descendants", "is_alive", "server_command", "time_generate"]

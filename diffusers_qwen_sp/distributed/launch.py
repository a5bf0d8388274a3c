"""Run a function on several CPU processes with an initialised process group (tests, CPU benchmarks and examples).

The parent never hangs: it waits with a deadline, kills every child on the first error, on timeout and on Ctrl-C,
and re-raises the failing rank's traceback. A child also exits when the parent is killed outright.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


__all__ = ["DistributedProcessError", "run_distributed"]

_MASTER_ADDR = "127.0.0.1"
# How long a child that exited without reporting may take for its last message to arrive.
_DEAD_CHILD_GRACE_S = 2.0
# How long to keep collecting errors from other ranks after the first one (the first is not always the root cause).
_ERROR_COLLECT_S = 0.5
# How long children may take to destroy their process group and exit once every result is in (then they are killed).
_TEARDOWN_S = 10.0


class DistributedProcessError(RuntimeError):
    """A rank of [`run_distributed`] raised (or died); `rank` and `traceback_text` tell which and where.

    `exitcode` is set when the rank died without reporting (negative: killed by that signal); `traceback_text` then
    says so instead of holding a traceback.
    """

    def __init__(
        self,
        rank: int,
        traceback_text: str,
        other_errors: dict[int, str] | None = None,
        exitcode: int | None = None,
    ) -> None:
        self.rank = rank
        self.traceback_text = traceback_text
        self.other_errors = dict(other_errors or {})
        self.exitcode = exitcode
        if exitcode is None:
            message = f"Rank {rank} raised an exception:\n\n{traceback_text}"
        else:
            message = f"Rank {rank} {traceback_text}"
        if self.other_errors:
            message += f"\n(ranks {sorted(self.other_errors)} also failed; see `other_errors`.)"
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return type(self), (self.rank, self.traceback_text, self.other_errors, self.exitcode)


def _exit_with_parent(parent_alive: Any) -> None:
    """Exit this process as soon as the parent dies, even if it was killed outright (SIGKILL, SIGTERM).

    The parent holds the only write end of the `parent_alive` pipe: its read end reaches EOF exactly when the parent
    is gone. (`PR_SET_PDEATHSIG` cannot do this: a forkserver child's parent is the fork server, which every child
    keeps alive.) A thread waits for it, so a main thread blocked in a collective does not delay the exit.
    """

    def watch() -> None:
        try:
            parent_alive.recv_bytes()  # the parent never writes: this returns only by EOFError
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="run_distributed-parent-watch", daemon=True).start()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_cpu(value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


def _start_context(fn: Callable[..., Any]) -> Any:
    """A start method that gives fresh interpreters: forkserver where available (POSIX), spawn otherwise.

    Both start each child from a clean, single-threaded process (never a fork of a parent that has run torch ops).
    The forkserver imports this module and `fn`'s module once, then forks children from that warm, idle process:
    a child does not pay the seconds that importing torch and diffusers costs, which a spawned child pays every time.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Only takes effect when the forkserver starts (the first call in this process); later calls reuse it.
    preload = [__name__]
    module = getattr(fn, "__module__", None)
    if module and module != "__main__":
        preload.append(module)
    ctx.set_forkserver_preload(preload)
    return ctx


def _worker(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    backend: str,
    master_port: int,
    timeout: float,
    collective_timeout: float,
    results: Any,
    parent_alive: Any,
) -> None:
    _exit_with_parent(parent_alive)
    os.environ.update(
        MASTER_ADDR=_MASTER_ADDR,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Several ranks share few cores: intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    try:
        # The parent owns the rendezvous store, so there is no race on a "free" port.
        store = dist.TCPStore(
            _MASTER_ADDR, master_port, world_size, is_master=False, timeout=timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
        )
        output = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor data into the message: no shared-memory handles outliving this process.
        payload = pickle.dumps(_to_cpu(output))
        results.put(("ok", rank, payload))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt included
        results.put(("error", rank, traceback.format_exc()))
    finally:
        # `put` hands the message to a feeder thread: flush it before the teardown, which can abort the process
        # (after a failed collective gloo has been seen to end in std::terminate).
        results.close()
        results.join_thread()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the result (or error) has already been reported
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    collective_timeout: float | None = None,
    return_exceptions: bool = False,
    **kwargs: Any,
) -> list[Any]:
    r"""
    Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned processes sharing a process group.

    Each child gets `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE` and `LOCAL_RANK` in its environment, one
    intra-op thread, and a default process group initialised with a collective timeout of `collective_timeout`
    seconds. The group is destroyed when `fn` returns. Every child is killed when the parent leaves, whatever the
    reason (an error, the deadline, Ctrl-C); a child also exits when the parent is killed outright (SIGKILL).

    Args:
        fn (`Callable`):
            A picklable module-level function. To keep tests fast, make it loop over several cases in one spawn.
        world_size (`int`): number of processes.
        *args, **kwargs: passed to `fn` after `rank, world_size`; must be picklable.
        timeout (`float`, defaults to `120.0`):
            Wall-clock limit in seconds for the whole run (start-up included). On expiry every child is killed and
            `TimeoutError` is raised.
        backend (`str`, defaults to `"gloo"`): process-group backend.
        collective_timeout (`float`, *optional*):
            How long a collective waits for the other ranks before it raises, in seconds (the `timeout` of
            `init_process_group`). Defaults to `timeout`. Set it lower to test how ranks fail when a peer is gone.
        return_exceptions (`bool`, defaults to `False`):
            Wait for every rank instead of failing on the first error, and put a [`DistributedProcessError`] in the
            place of each rank that raised or died. Lets a test check what the surviving ranks did.

    Returns:
        `list`: the return value of `fn` on each rank, indexed by rank. Tensors are moved to CPU.

    Raises:
        [`DistributedProcessError`]: a rank raised (or died); the message holds its traceback. Not with
            `return_exceptions=True`.
        `TimeoutError`: the run took longer than `timeout`.

    Example:

    ```py
    >>> import torch.distributed as dist

    >>> def total(rank, world_size):  # at module level
    ...     t = torch.tensor([rank])
    ...     dist.all_reduce(t)
    ...     return t.item()

    >>> run_distributed(total, 2)
    [1, 1]
    ```
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}.")
    if timeout <= 0:
        raise ValueError(f"`timeout` must be positive, got {timeout}.")
    if collective_timeout is None:
        collective_timeout = timeout
    if collective_timeout <= 0:
        raise ValueError(f"`collective_timeout` must be positive, got {collective_timeout}.")
    deadline = time.monotonic() + timeout
    # Port 0: the OS picks a free port, held by this store for the whole run (no race with other runs).
    store = dist.TCPStore(
        _MASTER_ADDR, 0, None, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False
    )
    ctx = _start_context(fn)
    results_queue = ctx.Queue()
    parent_alive, parent_alive_writer = ctx.Pipe(duplex=False)  # see `_exit_with_parent`
    processes = [
        ctx.Process(
            target=_worker,
            args=(
                rank, world_size, fn, args, kwargs, backend, store.port, timeout, collective_timeout, results_queue,
                parent_alive,
            ),
            daemon=True,
            name=f"run_distributed-rank{rank}",
        )
        for rank in range(world_size)
    ]
    results: dict[int, Any] = {}
    try:
        for process in processes:
            process.start()
        parent_alive.close()  # the children hold their copies
        dead_since: dict[int, float] = {}
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"run_distributed({getattr(fn, '__name__', fn)!r}, world_size={world_size}) did not finish within "
                    f"{timeout} s; ranks {missing} had not returned. All processes were killed."
                )
            try:
                status, rank, payload = results_queue.get(timeout=min(0.1, remaining))
            except queue_module.Empty:
                now = time.monotonic()
                for rank, process in enumerate(processes):
                    if rank in results or process.exitcode is None:
                        continue
                    dead_since.setdefault(rank, now)
                    if now - dead_since[rank] > _DEAD_CHILD_GRACE_S:
                        died = DistributedProcessError(
                            rank,
                            f"exited with code {process.exitcode} without reporting a result or an exception "
                            "(killed by a signal, out of memory, or os._exit?).",
                            exitcode=process.exitcode,
                        )
                        if not return_exceptions:
                            raise died
                        results[rank] = died
                continue
            if status == "error" and return_exceptions:
                results[rank] = DistributedProcessError(rank, payload)
            elif status == "error":
                other_errors: dict[int, str] = {}
                collect_until = min(deadline, time.monotonic() + _ERROR_COLLECT_S)
                while time.monotonic() < collect_until:
                    try:
                        other_status, other_rank, other_payload = results_queue.get(timeout=0.05)
                    except queue_module.Empty:
                        continue
                    if other_status == "error":
                        other_errors[other_rank] = other_payload
                raise DistributedProcessError(rank, payload, other_errors)
            else:
                results[rank] = pickle.loads(payload)
        # Let the children tear down their process group and exit; the results are already here.
        for process in processes:
            process.join(max(0.0, min(deadline - time.monotonic(), _TEARDOWN_S)))
    finally:
        # Also on KeyboardInterrupt: a child blocked in a collective would otherwise outlive the parent.
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            if process.pid is not None:
                process.join(5.0)
        parent_alive.close()
        parent_alive_writer.close()
        results_queue.close()
        results_queue.cancel_join_thread()
        del store
    return [results[rank] for rank in range(world_size)]

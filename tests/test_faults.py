"""Faults under sequence parallelism: every process ends, with a clear error, within a time bound.

- A rank given different call arguments: every rank raises the same ValueError before the first step.
- A rank that raises or dies mid-call: the surviving rank raises a RuntimeError that says a peer failed, which rank
  it is and the collective timeout, chained to the gloo error, within that timeout.
- Ctrl-C (SIGINT) on a parent inside `run_distributed`, or on `torchrun`: no process survives.

Measured on 2 busy cores: a peer that raised and left (its process group destroyed) or died is noticed by gloo at
once (its sockets close): the survivor stops ~0.1 s after the failure. A peer that raised but stays alive outside the
collective is noticed after the collective timeout (COLLECTIVE_TIMEOUT_S = 5 s here: ~5.1 s). After a SIGINT the
ranks are gone within milliseconds; the fork server and the parent need 2-5 s to shut down. Most of the file's time
is process start-up (importing torch and diffusers in the interrupted parent, its fork server and torchrun's workers).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusers_qwen_sp.distributed import DistributedProcessError, run_distributed

from _spawn import Spawn, SpawnedRuns, spawn_fixture


COLLECTIVE_TIMEOUT_S = 5.0
# The first transformer forward of step 1: with true CFG each step runs the cond then the uncond branch.
FAILING_FORWARD = 2
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def _sp_pipeline():
    from diffusers_qwen_sp.testing import build_tiny_pipeline, sp_pipeline_class

    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    pipe.enable_sequence_parallel(ulysses_degree=2)
    return pipe


def _count_forwards(pipe) -> list[int]:
    calls = [0]

    def count(module, args):
        calls[0] += 1

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(count)
    return calls


# ---------------------------------------------------------------------------------------------------- mismatched inputs


MISMATCHES = {
    # name: (overrides on rank 1, the message every rank must raise)
    "steps": (
        dict(num_inference_steps=3),
        "num_inference_steps differs across ranks: rank 0 has 2, rank 1 has 3; every rank must call the pipeline "
        "with the same arguments.",
    ),
    "prompt": (
        dict(prompt="a green dog"),
        "prompt differs across ranks: rank 0 has 'a red cat sitting on a blue mat', rank 1 has 'a green dog'; every "
        "rank must call the pipeline with the same arguments.",
    ),
    "cfg_and_size": (  # two at once: both named; CFG off on one rank would change the collectives run
        dict(negative_prompt=None, height=48),
        "negative_prompt differs across ranks: rank 0 has 'blurry, low quality', rank 1 has None; height differs "
        "across ranks: rank 0 has 64, rank 1 has 48; every rank must call the pipeline with the same arguments.",
    ),
    "sigmas": (
        dict(sigmas=[1.0, 0.4]),
        "sigmas differs across ranks: rank 0 has [1.0, 0.5], rank 1 has [1.0, 0.4]",
    ),
}


def _mismatched_inputs(rank, world_size):
    """One spawn for every mismatch case: case name -> what each rank saw; then a matching call and the timeouts."""
    from diffusers_qwen_sp.testing import tiny_pipeline_call_kwargs

    pipe = _sp_pipeline()
    forwards = _count_forwards(pipe)
    outcomes = {}
    with torch.no_grad():
        for name, (overrides, _) in MISMATCHES.items():
            kwargs = tiny_pipeline_call_kwargs("qwen_image", sigmas=[1.0, 0.5])
            if rank == 1:
                kwargs.update(overrides)
            try:
                pipe(**kwargs)
                message = "no error"
            except ValueError as error:
                message = str(error)
            outcomes[name] = {"message": message, "forwards_before": forwards[0]}
        # The check leaves the ranks in step: a matching call right after works, whatever seed each rank was given.
        kwargs = tiny_pipeline_call_kwargs("qwen_image")
        kwargs["generator"] = torch.Generator().manual_seed(rank)
        image = pipe(**kwargs).images
    outcomes["matching_call"] = {"forwards_after": forwards[0], "image": image}
    # The leader's text encoder fails (an out-of-memory, say) while rank 1, which holds none, waits for the
    # embeddings: both raise at once, and the next call runs in step. Twice.
    encoder = pipe.text_encoder
    for attempt in range(2):
        if rank == 0:
            handle = encoder.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(MemoryError("encoder OOM")))
        start = time.monotonic()
        try:
            pipe(**tiny_pipeline_call_kwargs("qwen_image"))
            message = "no error"
        except (MemoryError, RuntimeError) as error:
            message = f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - start
        if rank == 0:
            handle.remove()
        recovered = pipe(**tiny_pipeline_call_kwargs("qwen_image")).images
        outcomes[f"leader_encoder_failure_{attempt}"] = {
            "message": message, "seconds": seconds, "holds_encoder": encoder is not None, "recovered": recovered,
        }
    # Subgroups (SP, Ulysses, Ring, CFG on bigger meshes) wait as long as the world, not gloo's default 30 minutes.
    from diffusers_qwen_sp.distributed import collective_timeout
    from diffusers_qwen_sp.distributed.groups import _new_group

    outcomes["subgroup_timeout"] = collective_timeout(_new_group([0, 1], world_size + 1))
    return outcomes


mismatch_spawn = spawn_fixture(_mismatched_inputs, Spawn(2, timeout=50, collective_timeout=20))


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatched_inputs_raise_on_every_rank_before_the_first_step(mismatch_spawn, name):
    message = MISMATCHES[name][1]
    for rank, outcome in enumerate(mismatch_spawn[2].case(name)):
        assert message in outcome["message"], f"rank {rank}, {name}: {outcome['message']}"
        assert outcome["forwards_before"] == 0, f"rank {rank} ran the transformer before the error"


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_matching_call_after_mismatches_runs_in_step(mismatch_spawn):
    results = mismatch_spawn[2].case("matching_call")
    for outcome in results:
        assert outcome["forwards_after"] == 4, outcome["forwards_after"]  # 2 steps x (cond, uncond)
    assert torch.isfinite(results[0]["image"]).all()
    assert torch.equal(results[0]["image"], results[1]["image"])  # rank 0's noise on both


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("attempt", [0, 1])
def test_a_leader_encoder_failure_raises_on_every_rank_and_the_next_call_runs(mismatch_spawn, attempt):
    leader, follower = mismatch_spawn[2].case(f"leader_encoder_failure_{attempt}")
    assert leader["holds_encoder"] and not follower["holds_encoder"]  # the default placement: "one_rank"
    assert leader["message"] == "MemoryError: encoder OOM", leader["message"]
    assert follower["message"] == (
        "RuntimeError: Rank 0, the replica's leader, failed to compute the prompt embeddings: MemoryError: encoder OOM"
    ), follower["message"]
    # the follower did not wait for the collective timeout (20 s) in a broadcast the leader never reached
    assert follower["seconds"] < 10, follower["seconds"]
    assert torch.equal(leader["recovered"], follower["recovered"])


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_subgroups_wait_as_long_as_the_world(mismatch_spawn):
    for rank, timeout in enumerate(mismatch_spawn[2].case("subgroup_timeout")):
        assert timeout == 20.0, f"rank {rank}: {timeout}"


# ---------------------------------------------------------------------------------------------------- the spawn helper


def _probe(rank, world_size, folder, fail_on_rank):
    with (Path(folder) / f"rank{rank}.starts").open("a") as starts:
        starts.write("x")  # one character per spawn of this rank
    if rank == fail_on_rank:
        raise ValueError(f"deliberate failure on rank {rank} before any case")
    return {"a": rank, "b": 10 * rank}


def _starts(folder) -> list[str]:
    return [(Path(folder) / f"rank{rank}.starts").read_text() for rank in range(2)]


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_failed_spawn_fails_each_case_with_the_rank_traceback_once_spawned(tmp_path):
    # What `spawn_fixture` gives each parametrised test: a failure of its own (not a setup error, not a skip) that
    # carries the failing rank's traceback, from one spawn that is never retried.
    runs = SpawnedRuns(_probe, [Spawn(2, args=(str(tmp_path), 1), timeout=50)])
    for case in ("a", "b"):
        with pytest.raises(pytest.fail.Exception) as info:
            runs[2].case(case)
        text = str(info.value)
        assert "_probe on 2 ranks failed after" in text and f"case {case!r} has no result" in text, text
        assert "Rank 1 raised an exception" in text and "Traceback (most recent call last)" in text, text
        assert "ValueError: deliberate failure on rank 1 before any case" in text, text
    assert runs[2].spawn_count == 1 and _starts(tmp_path) == ["x", "x"]


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_spawn_runs_once_and_a_missing_case_is_named(tmp_path):
    runs = SpawnedRuns(_probe, [Spawn(2, args=(str(tmp_path), None), timeout=50)])
    assert runs[2].case("a") == [0, 1] and runs[2].case("b") == [0, 10]  # one entry per rank, in rank order
    with pytest.raises(pytest.fail.Exception, match=r"rank 0 of _probe on 2 ranks returned no case 'c'; it returned"):
        runs[2].case("c")
    assert runs[2].spawn_count == 1 and _starts(tmp_path) == ["x", "x"]
    with pytest.raises(KeyError, match=r"no Spawn for world size 4; it has \[2\]"):
        runs[4]


def test_describe_argument():
    import numpy as np
    from PIL import Image

    from diffusers_qwen_sp.pipelines.call_arguments import describe_argument

    assert describe_argument([Image.new("RGB", (40, 64)), Image.new("RGBA", (8, 8))]) == [
        "RGB image of 40x64",
        "RGBA image of 8x8",
    ]
    assert describe_argument(torch.zeros(1, 6, 32)) == "Tensor of shape (1, 6, 32)"
    assert describe_argument(np.array([1.0, 0.5]), by_value=True) == [1.0, 0.5]
    assert describe_argument(object()) == "object"  # never a repr with an address, which differs per rank
    assert describe_argument(("a", 4.0, None)) == ["a", 4.0, None]


# ---------------------------------------------------------------------------------------------------- a failing rank


def _fail_on_rank1(rank, world_size, how, folder):
    from diffusers_qwen_sp.testing import tiny_pipeline_call_kwargs

    pipe = _sp_pipeline()
    forwards = [0]

    def fail(module, args):
        forwards[0] += 1
        if rank == 1 and forwards[0] == FAILING_FORWARD + 1:
            if how == "dies":
                os._exit(1)
            raise RuntimeError("deliberate failure inside the transformer on rank 1")

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail)
    start = time.monotonic()
    try:
        with torch.no_grad():
            pipe(**tiny_pipeline_call_kwargs("qwen_image", num_inference_steps=3))
    except Exception as error:  # noqa: BLE001 - the test inspects it
        elapsed = time.monotonic() - start
        done = Path(folder) / "rank0.done"
        if rank == 1 and how == "raises and stays":
            # Alive, its process group open, but in no collective: rank 0 can only wait for its timeout.
            _wait_for(done.exists, COLLECTIVE_TIMEOUT_S + 20.0, "rank 0 to stop")
        if rank == 1:
            raise
        done.touch()
        cause = error.__cause__
        return dict(
            type=type(error).__name__,
            message=str(error),
            cause=f"{type(cause).__name__}: {cause}" if cause is not None else None,
            elapsed=elapsed,
            forwards=forwards[0],
        )
    return "no error"


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["raises", "dies", "raises and stays"])
def test_a_failing_rank_stops_the_others_with_a_clear_error(how, tmp_path):
    start = time.monotonic()
    results = run_distributed(
        _fail_on_rank1, 2, how, str(tmp_path), timeout=50, collective_timeout=COLLECTIVE_TIMEOUT_S,
        return_exceptions=True,
    )
    total = time.monotonic() - start
    survivor, failed = results
    # Rank 1's own error reaches the parent unchanged: it is the cause, not a peer's failure.
    assert isinstance(failed, DistributedProcessError), failed
    if how == "dies":
        assert failed.exitcode == 1, failed
    else:
        assert "RuntimeError: deliberate failure inside the transformer on rank 1" in failed.traceback_text
        assert "a torch.distributed collective failed" not in failed.traceback_text
    assert isinstance(survivor, dict), survivor
    assert survivor["type"] == "RuntimeError"
    message = survivor["message"]
    assert message.startswith("Rank 0 of 2 stopped: a torch.distributed collective failed"), message
    assert f"collective timeout of {COLLECTIVE_TIMEOUT_S:g} s" in message, message
    assert "Look at the other ranks' errors" in message, message
    # Rank 0 reached step 1 (both branches of step 0 and the cond of step 1 at least started).
    assert survivor["forwards"] >= FAILING_FORWARD + 1, survivor
    if how == "raises and stays":
        assert re.search(r"Timed out|timeout", survivor["cause"], re.IGNORECASE), survivor["cause"]
        assert COLLECTIVE_TIMEOUT_S - 0.5 <= survivor["elapsed"] <= COLLECTIVE_TIMEOUT_S + 10.0, survivor
    else:
        assert re.search(r"Connection (closed|reset) by peer", survivor["cause"]), survivor["cause"]
        assert survivor["elapsed"] <= COLLECTIVE_TIMEOUT_S, survivor  # gloo notices the closed sockets at once
    print(f"{how}: rank 0 stopped {survivor['elapsed']:.2f} s into the call; run took {total:.1f} s")


# ---------------------------------------------------------------------------------------------------- Ctrl-C


def _block(rank, world_size, folder):
    (Path(folder) / f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        torch.distributed.barrier()  # blocked in C++: a pending KeyboardInterrupt would not even be seen here
    time.sleep(600)


_PARENT = """
import sys
from test_faults import _block
from diffusers_qwen_sp.distributed import run_distributed
run_distributed(_block, 2, sys.argv[1], timeout=600)
"""


def _descendants(pid: int) -> list:
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _survivors(processes: list, within: float) -> list:
    psutil = pytest.importorskip("psutil")
    gone, alive = psutil.wait_procs(processes, timeout=within)
    return [process for process in alive if process.status() != psutil.STATUS_ZOMBIE]


def _wait_for(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ctrl_c_on_run_distributed_leaves_no_process(tmp_path):
    # SIGINT to the parent alone: only run_distributed's clean-up can stop the ranks, one of them blocked in C++.
    # (A terminal's Ctrl-C signals the whole process group, ranks included: an easier case, checked by hand.)
    pytest.importorskip("psutil")
    path = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(lambda: len(list(tmp_path.glob("rank*.pid"))) == 2 or parent.poll() is not None, 50, "the ranks")
        assert parent.poll() is None, parent.communicate()[0].decode()
        ranks = {int(path.read_text()) for path in tmp_path.glob("rank*.pid")}
        processes = _descendants(parent.pid)  # the fork server, the resource tracker and the ranks
        assert ranks <= {process.pid for process in processes}
        start = time.monotonic()
        os.kill(parent.pid, signal.SIGINT)
        parent.wait(timeout=15)
        survivors = _survivors(processes, within=10)
        assert survivors == [], f"still running after Ctrl-C: {survivors}"
        print(f"Ctrl-C to the parent: everything gone after {time.monotonic() - start:.2f} s")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for path in tmp_path.glob("rank*.pid"):
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _connected(process) -> bool:
    """Whether a worker has joined the process group: its store and gloo sockets are open (after building the pipeline,
    just before the denoising loop)."""
    psutil = pytest.importorskip("psutil")
    try:
        connections = process.net_connections(kind="tcp")
    except psutil.Error:
        return False
    return sum(connection.status == psutil.CONN_ESTABLISHED for connection in connections) >= 2


def _is_worker(process) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return "diffusers_qwen_sp" in process.cmdline()
    except psutil.Error:
        return False


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ctrl_c_on_torchrun_leaves_no_worker(tmp_path):
    pytest.importorskip("psutil")
    # 200 steps at 128x128 keep the tiny model busy for ~15 s: long enough to be interrupted mid-loop.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "diffusers_qwen_sp", "generate", "--ulysses-degree", "2", "--steps", "200", "--height", "128",
        "--width", "128", "--output", str(tmp_path / "out.png"),
    ]
    torchrun = subprocess.Popen(
        command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(torchrun.stdout), daemon=True)
    reader.start()
    workers: list = []
    try:
        def started() -> bool:
            workers[:] = [process for process in _descendants(torchrun.pid) if _is_worker(process)]
            return len(workers) == 2 and all(_connected(worker) for worker in workers) or torchrun.poll() is not None

        _wait_for(started, 45, "the workers to join the process group")
        assert torchrun.poll() is None, b"".join(output).decode(errors="replace")
        time.sleep(0.5)  # inside the denoising loop
        start = time.monotonic()
        os.kill(torchrun.pid, signal.SIGINT)  # torchrun forwards it to the workers
        torchrun.wait(timeout=40)
        survivors = _survivors(workers, within=5)
        assert survivors == [], f"still running after Ctrl-C: {survivors}"
        text = b"".join(output).decode(errors="replace")
        assert not (tmp_path / "out.png").exists(), text
        print(f"Ctrl-C to torchrun: exit code {torchrun.returncode}, all gone after {time.monotonic() - start:.2f} s")
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
        for process in workers:
            try:
                process.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass

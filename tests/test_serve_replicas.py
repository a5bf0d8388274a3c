"""`serve --dp-degree 2`: two single-process replicas of the scene model (world 2, gloo, CPU), driven by real clients.

- One module-scoped world: concurrent requests (the `openai` client and httpx) all answered with faithful scenes, both
  replicas used (`replica_batches_total` in /metrics), a seeded request equal to `generate --seed` on either replica,
  a batch failing on replica 1 (500, the service goes on), SIGTERM on rank 0 draining both replicas (exit 0).
- Another world: rank 1 (replica 1) killed while each replica runs a request: both get 503, /health 503, rank 0
  ends with a clear error and every process is gone within the collective timeout.
- No process: the world must equal dp x cfg x ring x ulysses (the degrees the flags leave out are filled in).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_qwen_sp.scenes.grammar import check_image
from diffusers_qwen_sp.serve import ServeConfig, Service

from _serving import ServingWorld, client as openai_client, pixels, wait_for, wait_until_health_is_broken


for _module in ("fastapi", "uvicorn", "multipart"):
    pytest.importorskip(_module)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPT = "two red circles left of a blue square on a yellow background"
# Prompts and seeds the scene model draws faithfully (checked once with `generate`; the service must draw the same).
SCENES = (
    (PROMPT, 3),
    ("a green triangle on a black background", 1),
    ("two blue squares above a red circle on a white background", 2),
    ("a purple circle on a gray background", 4),
)
COLLECTIVE_TIMEOUT_S = 10.0
STEPS = 8  # the seeded parity checks: fewer steps than the scene model's 20, as fast and as exact
FAIL_MARKER = "<fail on replica 1>"



def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _replica_batches(url: str) -> dict[tuple[str, str], float]:
    """`replica_batches_total` per (replica, outcome)."""
    pattern = re.compile(r'^diffusers_qwen_sp_replica_batches_total\{replica="(\d+)",outcome="(\w+)"\} (\S+)$')
    found = {}
    for line in _metrics(url).splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1), match.group(2)] = float(match.group(3))
    return found


def _started(url: str) -> float:
    line = next(line for line in _metrics(url).splitlines()
                if line.startswith("diffusers_qwen_sp_queue_wait_seconds_count "))
    return float(line.split()[-1])



def _serve_rank(rank: int, world_size: int, folder: str) -> str:
    """One rank of `serve --dp-degree 2` (one process per replica at world 2, Ulysses 2 per replica at world 4); rank 0
    writes its URL. At world 2, on rank 1 (replica 1's leader) a prompt holding FAIL_MARKER fails its batch."""
    from diffusers_qwen_sp.cli.serve import load_for_serving
    from diffusers_qwen_sp.serve.service import stop_signals_drain

    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))

    def load(config):
        served = load_for_serving(config)
        if rank == 1 and world_size == 2:
            encode_prompt = served.pipe.encode_prompt

            def failing_encode_prompt(*args, **kwargs):
                prompts = kwargs.get("prompt")
                if any(FAIL_MARKER in prompt for prompt in ([prompts] if isinstance(prompts, str) else prompts or [])):
                    raise RuntimeError("injected failure on replica 1")
                return encode_prompt(*args, **kwargs)

            served.pipe.encode_prompt = failing_encode_prompt
        return served

    # One image per batch: every request runs alone, so its pixels are exactly `generate`'s.
    config = ServeConfig(port=0, dp_degree=2, timeout=COLLECTIVE_TIMEOUT_S, broken_grace_s=2.0, max_batch_size=1)
    service = Service(config, load, on_listening=lambda url: Path(folder, "url").write_text(url))
    with stop_signals_drain(service):
        service.run()
    return "drained"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """What `python -m diffusers_qwen_sp generate --seed 3 --steps 8` writes (the single-process reference)."""
    from diffusers_qwen_sp.cli import main

    path = tmp_path_factory.mktemp("generate") / "seed3.png"
    assert main(["generate", "--prompt", PROMPT, "--seed", "3", "--steps", str(STEPS), "--output", str(path)]) == 0
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    running = ServingWorld(_serve_rank, tmp_path_factory.mktemp("replicas"), collective_timeout=COLLECTIVE_TIMEOUT_S)
    yield running
    if running.thread.is_alive():
        os.kill(running.pid(0), signal.SIGTERM)
        running.thread.join(60)
    running.kill_all()


# ------------------------------------------------------------------------------------------------ world 2, dp 2


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_dp2_seeded_requests_equal_generate_on_both_replicas(world, generated):
    before = _replica_batches(world.url)
    results: list = []
    client = openai_client(world.url)

    def send() -> None:
        results.append(client.images.generate(prompt=PROMPT, size="64x64",
                                              extra_body={"seed": 3, "num_inference_steps": STEPS}))

    for _ in range(2):  # twice: state left behind by a round would show in the second
        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == 8
    for result in results:
        assert np.array_equal(pixels(result.data[0].b64_json), generated)
    after = _replica_batches(world.url)
    ran = {replica: after.get((replica, "ok"), 0) - before.get((replica, "ok"), 0) for replica in ("0", "1")}
    assert sum(ran.values()) == 8 and min(ran.values()) >= 1, ran  # both replicas drew some: all equal generate


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_dp2_concurrent_clients_are_all_answered_with_faithful_scenes_by_both_replicas(world):
    before = _replica_batches(world.url)
    answers: dict = {}

    def with_openai(index: int, prompt: str, seed: int) -> None:
        result = openai_client(world.url).images.generate(prompt=prompt, size="64x64", extra_body={"seed": seed})
        answers[index] = (prompt, pixels(result.data[0].b64_json))

    def with_httpx(index: int, prompt: str, seed: int) -> None:
        response = httpx.post(f"{world.url}/v1/images/generations", json={"prompt": prompt, "seed": seed},
                              timeout=60)
        assert response.status_code == 200, response.text
        answers[index] = (prompt, pixels(response.json()["data"][0]["b64_json"]))

    threads = [
        threading.Thread(target=(with_openai if index % 2 else with_httpx), args=(index, *SCENES[index % 4]))
        for index in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(answers) == list(range(8))
    for index, (prompt, image) in answers.items():
        assert check_image(image.astype(np.uint8), prompt).faithful, (index, prompt)
    after = _replica_batches(world.url)
    ran = {replica: after.get((replica, "ok"), 0) - before.get((replica, "ok"), 0) for replica in ("0", "1")}
    assert sum(ran.values()) == 8 and min(ran.values()) >= 1, ran


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_dp2_a_batch_failing_on_replica_1_gets_500_and_the_service_goes_on(world, generated):
    client = openai_client(world.url)
    errors = []
    for _ in range(20):  # whichever replica is free takes it; replica 0 draws it, replica 1 fails it
        before = _replica_batches(world.url).get(("1", "failed"), 0)
        try:
            client.images.generate(prompt=f"{PROMPT} {FAIL_MARKER}", extra_body={"num_inference_steps": 1})
        except openai.InternalServerError as error:
            errors.append(error)
            break
    assert errors, "replica 1 never took the request"
    assert "RuntimeError: injected failure on replica 1" in errors[0].body["message"], errors[0].body
    assert _replica_batches(world.url)[("1", "failed")] == before + 1
    result = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 3, "num_inference_steps": STEPS})
    assert np.array_equal(pixels(result.data[0].b64_json), generated)


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_dp2_sigterm_on_rank_0_drains_both_replicas_and_every_rank_exits_cleanly(world):
    client = openai_client(world.url)
    answers: list = []
    started = _started(world.url)

    def long_request() -> None:
        answers.append(client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 60}))

    threads = [threading.Thread(target=long_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: _started(world.url) >= started + 2, 30, "both replicas to start a request")
    os.kill(world.pid(0), signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{world.url}/health").status_code == 503, 10, "health to turn 503")
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(prompt=PROMPT)
    assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
    for thread in threads:
        thread.join(60)
    assert len(answers) == 2 and all(len(answer.data) == 1 for answer in answers)  # both finished, not cut off
    assert world.finish(within=30) == ["drained", "drained"]


# ------------------------------------------------------------------------------------------------ a killed replica


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_dp2_a_killed_replica_turns_health_503_and_ends_every_process(tmp_path):
    killed = ServingWorld(_serve_rank, tmp_path, collective_timeout=COLLECTIVE_TIMEOUT_S)
    try:
        client = openai_client(killed.url)
        errors: list = []

        def long_request() -> None:
            try:
                client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 100})
            except Exception as error:  # noqa: BLE001 - asserted below
                errors.append(error)

        threads = [threading.Thread(target=long_request) for _ in range(2)]  # one on each replica
        for thread in threads:
            thread.start()
        wait_for(lambda: _started(killed.url) >= 2, 30, "both requests to start")
        start = time.monotonic()
        os.kill(killed.pid(1), signal.SIGKILL)
        statuses = wait_until_health_is_broken(killed.url, COLLECTIVE_TIMEOUT_S)
        assert statuses[-1] == (503, "broken"), statuses
        for thread in threads:
            thread.join(30)
        assert len(errors) == 2, errors  # replica 1's request and replica 0's, cut off at its next step
        for error in errors:
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503, errors
            assert "lost the process group of replica 1" in error.body["message"], error.body
        rank0, rank1 = killed.finish(within=COLLECTIVE_TIMEOUT_S + 10)
        assert rank1.exitcode == -signal.SIGKILL, rank1
        assert "FatalServeError: rank 0 of 2 lost the process group of replica 1 (led by rank 1" in str(rank0), rank0
        assert time.monotonic() - start < COLLECTIVE_TIMEOUT_S + 5
    finally:
        killed.kill_all()  # whatever failed above, no rank outlives the test


# ------------------------------------------------------------------------------------------------ no process


@pytest.mark.parametrize("world, flags, expected", [
    (2, dict(dp_degree=2), (2, 1, 1, 1)),  # two single-process replicas
    (8, dict(dp_degree=2), (2, 1, 1, 4)),  # only --dp-degree: Ulysses over each replica
    (8, dict(dp_degree=2, cfg_parallel=True), (2, 2, 1, 2)),
    (8, dict(dp_degree=2, ring_degree=2), (2, 1, 2, 2)),
    (3, dict(dp_degree=2), "--dp-degree 2 does not divide the 3 processes"),
    (1, dict(dp_degree=2), "--dp-degree 2 does not divide the 1 processes"),
    (4, dict(dp_degree=2, ulysses_degree=4, ring_degree=1), "= 8 processes, but 4 were launched: the world must equal dp x cfg"),
    (8, dict(dp_degree=2, ulysses_degree=3), "4 processes in each of the 2 replicas do not split"),
])
def test_the_world_must_equal_dp_x_cfg_x_ring_x_ulysses(monkeypatch, world, flags, expected):
    from types import SimpleNamespace

    from diffusers_qwen_sp.cli._common import sequence_parallel_config

    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = SimpleNamespace(**{"ulysses_degree": None, "ring_degree": None, "cfg_parallel": False,
                              "attention_backend": "auto", "timeout": 60.0, **flags})
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            sequence_parallel_config(args)
        return
    config = sequence_parallel_config(args)
    assert (config.dp_degree, config.cfg_degree, config.ring_degree, config.ulysses_degree) == expected
    assert config.world_size == world


# ------------------------------------------------------------------------------------------------ world 4: dp 2 x ulysses 2


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_dp2_ulysses2_replicas_answer_generate_pixels_and_drain_when_every_rank_gets_sigterm(tmp_path, generated):
    # Replica 1 is ranks 2 and 3: its leader takes batches from rank 0 over their control group and runs them with
    # its follower over its own SP group. torchrun and orchestrators signal every process at once: one drain each.
    running = ServingWorld(_serve_rank, tmp_path, world_size=4,
                           collective_timeout=COLLECTIVE_TIMEOUT_S)
    try:
        client = openai_client(running.url)
        for _ in range(2):  # twice: state left behind by a round would show in the second
            before = _replica_batches(running.url)
            results: list = []
            threads = [
                threading.Thread(target=lambda: results.append(client.images.generate(
                    prompt=PROMPT, size="64x64", extra_body={"seed": 3, "num_inference_steps": STEPS})))
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert len(results) == 4
            for result in results:
                assert np.array_equal(pixels(result.data[0].b64_json), generated)
            after = _replica_batches(running.url)
            ran = {replica: after.get((replica, "ok"), 0) - before.get((replica, "ok"), 0) for replica in ("0", "1")}
            assert sum(ran.values()) == 4, ran
        assert after.get(("1", "ok"), 0) >= 1, after  # replica 1 (ranks 2 and 3) drew some
        answers: list = []
        started = _started(running.url)
        threads = [threading.Thread(target=lambda: answers.append(client.images.generate(
            prompt=PROMPT, extra_body={"num_inference_steps": 60}))) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: _started(running.url) >= started + 2, 30, "both replicas to start a request")
        for rank in range(4):
            os.kill(running.pid(rank), signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert len(answers) == 2  # finished, not cut off by a signal counted twice
        assert running.finish(within=60) == ["drained"] * 4
    finally:
        running.kill_all()

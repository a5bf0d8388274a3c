"""`serve`: the OpenAI-compatible image service, driven by real clients (the `openai` package and httpx).

- In process (one service thread over the shipped scene model, one over a tiny edit model): generations, the same
  pixels as `generate`, batching (a gate on the transformer holds the engine so requests queue deterministically),
  every 4xx with OpenAI's error body, a failing batch (500, then the service goes on), health, models, metrics.
- `python -m diffusers_qwen_sp serve` as a subprocess: the command line, the API key from the environment, TeaCache
  counted in the metrics, and SIGTERM draining (the request in flight finishes, new ones get 503, exit 0).
- World 2 (Ulysses 2, rank 0 serves, the test is the client): the same pixels as one process, a batch failing on every
  rank (500, ranks still in step), SIGTERM draining the group; in another spawn a killed rank (503 in flight, health
  503, rank 0 exits with a clear error within the collective timeout).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_qwen_sp.serve import APIError, RequestQueue, ServeConfig, Service, WorkItem, describe_served_model
from diffusers_qwen_sp.serve.metrics import ServeMetrics

from _serving import ServingWorld, client, pixels, wait_for, wait_until_health_is_broken


# The `serve` extra (fastapi, uvicorn, python-multipart) and the clients of the `test` extra.
for _module in ("fastapi", "uvicorn", "multipart"):
    pytest.importorskip(_module)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPT = "two red circles left of a blue square on a yellow background"
OTHER_PROMPTS = (
    "a green triangle on a black background",
    "three blue squares above a red circle on a white background",
    "a purple circle on a gray background",
)
KEY = "test-key"
COLLECTIVE_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
FAIL_MARKER = "<fail this batch>"



def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return client(url, key)


def _metric(url: str, name: str) -> float:
    """The value of an unlabelled metric, e.g. `queue_wait_seconds_count` (batches started, one per request here)."""
    line = next(line for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith(f"diffusers_qwen_sp_{name} "))
    return float(line.split()[-1])



class _InProcess:
    """A [`Service`] run in a thread of the test process (no signals there: `request_stop` is SIGTERM)."""

    def __init__(self, config: ServeConfig, served) -> None:
        self.service = Service(config, load=lambda _: served)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.service.state.status != "loading" or self.error is not None, 30, "the service")
        assert self.error is None, self.error
        self.url = self.service.url

    def _run(self) -> None:
        try:
            self.service.run()
        except BaseException as error:  # noqa: BLE001 - reported by the fixture
            self.error = error

    def stop(self) -> None:
        self.service.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the service did not drain within 30 s"
        assert self.error is None, self.error


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scene_served():
    from diffusers_qwen_sp.cli.serve import load_for_serving

    return load_for_serving(ServeConfig())  # the CLI's loader, in process: the shipped scene model on CPU


@pytest.fixture(scope="module")
def scene_service(scene_served):
    config = ServeConfig(port=0, api_key=KEY, max_queue=3, max_n=3, max_batch_size=4, batch_wait_ms=20,
                         max_body_bytes=256 * 1024)
    running = _InProcess(config, describe_served_model(scene_served.pipe, config, 64, 20, scene=True))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """What `python -m diffusers_qwen_sp generate --seed 3` writes (the single-process reference)."""
    from diffusers_qwen_sp.cli import main

    path = tmp_path_factory.mktemp("generate") / "seed3.png"
    assert main(["generate", "--prompt", PROMPT, "--seed", "3", "--output", str(path)]) == 0
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# ------------------------------------------------------------------------------------------------ no model


def test_config_validates_itself():
    with pytest.raises(ValueError, match=r"ServeConfig.dp_degree must be a positive integer, got 0"):
        ServeConfig(dp_degree=0)
    assert ServeConfig(dp_degree=2).dp_degree == 2  # replicas: tests/test_serve_replicas.py
    with pytest.raises(ValueError, match=r"port must be an integer in \[0, 65535\]"):
        ServeConfig(port=70000)
    assert ServeConfig(teacache=0.2).effective_max_batch_size == 1  # skips are decided over the whole batch
    assert ServeConfig().effective_max_batch_size == 4
    assert "without an API key" in ServeConfig(host="0.0.0.0").exposure_warning()
    assert ServeConfig(host="::", api_key="k").exposure_warning() is None and ServeConfig().exposure_warning() is None
    assert "secret" not in repr(ServeConfig(api_key="secret"))


def _item(prompt: str, steps: int = 20, n: int = 1, rid: str = "") -> WorkItem:
    return WorkItem(rid or prompt, "generation", prompt, " ", tuple(range(n)), 64, 64, steps, 4.0)


def test_queue_groups_compatible_requests_and_keeps_the_others_in_order():
    queue = RequestQueue(max_queue=5, max_batch_size=3, batch_wait_s=0.0)
    for item in (_item("a"), _item("b", steps=10), _item("c", n=2), _item("d"), _item("e")):
        queue.submit(item)
    with pytest.raises(APIError) as info:
        queue.submit(_item("f"))
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "2"  # 5 waiting / 3 per batch x 1 s
    batches = [[entry.item.prompt for entry in queue.next_batch(0.1).entries] for _ in range(3)]
    # a + c fill 3 images; d would make 4, so it waits; b (other steps) keeps its place.
    assert batches == [["a", "c"], ["b"], ["d", "e"]]
    assert queue.next_batch(0.01) is None


def test_metrics_render_prometheus_text():
    metrics = ServeMetrics(lambda: 2, 8, lambda: "ready")
    metrics.requests.inc(endpoint="/health", outcome="ok")
    metrics.batch_size.observe(3)
    text = metrics.render()
    assert 'diffusers_qwen_sp_requests_total{endpoint="/health",outcome="ok"} 1' in text
    assert "diffusers_qwen_sp_queue_depth 2" in text and 'diffusers_qwen_sp_status{status="ready"} 1' in text
    # 3 falls in the bucket le=4 (cumulative: 0 at le=2, 1 from le=4 on).
    assert 'diffusers_qwen_sp_batch_size_bucket{le="2"} 0' in text
    assert 'diffusers_qwen_sp_batch_size_bucket{le="4"} 1' in text and "diffusers_qwen_sp_batch_size_count 1" in text


# ------------------------------------------------------------------------------------------------ one process


@pytest.mark.timeout(60)
def test_generation_with_the_openai_client_equals_generate(scene_service, generated):
    result = _client(scene_service.url).images.generate(
        model="qwen-image", prompt=PROMPT, size="64x64", n=1, response_format="b64_json", quality="high",
        style="vivid", user="test", extra_body={"seed": 3},
    )
    assert len(result.data) == 1 and result.data[0].model_extra["seed"] == 3
    assert np.array_equal(pixels(result.data[0].b64_json), generated)


@pytest.mark.timeout(60)
def test_n_images_get_consecutive_seeds_and_a_random_seed_is_reported(scene_service):
    client = _client(scene_service.url)
    result = client.images.generate(prompt=PROMPT, n=2, extra_body={"seed": 11, "num_inference_steps": 4})
    assert [item.model_extra["seed"] for item in result.data] == [11, 12]
    first, second = (pixels(item.b64_json) for item in result.data)
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    seed = client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2}).data[0].model_extra["seed"]
    assert isinstance(seed, int) and seed >= 0


@pytest.fixture(scope="module")
def queued_scenario(scene_service, scene_served):
    """Hold the engine in its first transformer forward (request A), queue B, C, D (the queue holds 3), send E (429),
    release; then run B, C, D again one by one."""
    gate, entered = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        assert gate.wait(30), "the test never released the gate"

    handle = scene_served.pipe.transformer.register_forward_pre_hook(hold)
    url = scene_service.url
    metrics_before = httpx.get(f"{url}/metrics").text
    bodies = {name: {"prompt": prompt, "size": "64x64", "num_inference_steps": 6, "seed": 100 + index}
              for index, (name, prompt) in enumerate(zip("ABCD", (PROMPT,) + OTHER_PROMPTS))}
    responses: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        responses[name] = httpx.post(f"{url}/v1/images/generations", json=bodies[name],
                                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    threads = {name: threading.Thread(target=send, args=(name,)) for name in "ABCD"}
    try:
        threads["A"].start()
        assert entered.wait(30), "request A never reached the transformer"
        for name in "BCD":
            threads[name].start()
        wait_for(lambda: len(scene_service.service.queue) == 3, 30, "B, C and D to queue")
        send_e = dict(bodies["B"], seed=7)
        full = httpx.post(f"{url}/v1/images/generations", json=send_e, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    finally:
        handle.remove()
        gate.set()
        for thread in threads.values():
            if thread.ident is not None:  # started
                thread.join(60)
    metrics_after = httpx.get(f"{url}/metrics").text
    alone = {}
    for name in "BCD":
        send(name)
        alone[name] = responses[name]
    return dict(responses=responses, full=full, alone=alone, metrics=(metrics_before, metrics_after))


def _bucket(text: str, le: str) -> float:
    prefix = f'diffusers_qwen_sp_batch_size_bucket{{le="{le}"}}'
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return float(line.split()[-1])


@pytest.mark.timeout(120)
def test_a_full_queue_answers_429_with_retry_after(queued_scenario):
    full = queued_scenario["full"]
    assert full.status_code == 429, full.text
    assert int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "queue_full" and "--max-queue" in full.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_queued_compatible_requests_run_as_one_batch(queued_scenario):
    for name, response in queued_scenario["responses"].items():
        assert response.status_code == 200, (name, response.text)
    before, after = queued_scenario["metrics"]
    # One batch of 3 images (B, C, D): the le=2 bucket did not move, the le=4 one did (A was a batch of 1).
    assert _bucket(after, "2") - _bucket(before, "2") == 1
    assert _bucket(after, "4") - _bucket(before, "4") == 2


@pytest.mark.timeout(120)
def test_a_batch_equals_its_requests_run_one_by_one(queued_scenario):
    # Same noise per image (a generator per seed); only float rounding of the batched matmuls differs (~1e-6 in [0, 1]),
    # which moves a rare pixel by one level.
    for name in "BCD":
        batched = pixels(queued_scenario["responses"][name].json()["data"][0]["b64_json"])
        alone = pixels(queued_scenario["alone"][name].json()["data"][0]["b64_json"])
        diff = np.abs(batched - alone)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())


BAD_REQUESTS = {
    "size_not_a_multiple": ({"size": "65x64"}, "size", "multiple of 8"),
    "size_malformed": ({"size": "large"}, "size", "WIDTHxHEIGHT"),
    "size_too_many_pixels": ({"size": "4096x4096"}, "size", "--max-image-pixels"),
    "n_over_max": ({"n": 4}, "n", "between 1 and 3"),
    "n_not_an_integer": ({"n": "2"}, "n", "an integer"),
    "response_format_url": ({"response_format": "url"}, "response_format", "b64_json"),
    "response_format_unknown": ({"response_format": "webp"}, "response_format", "b64_json"),
    "unknown_model": ({"model": "dall-e-3"}, "model", "'qwen-image'"),
    "missing_prompt": ({"prompt": None}, "prompt", "required"),
    "steps_zero": ({"num_inference_steps": 0}, "num_inference_steps", "between 1 and 100"),
    "negative_seed": ({"seed": -1}, "seed", "between 0 and"),
    "cfg_scale_nan": ({"true_cfg_scale": "high"}, "true_cfg_scale", "a number"),
    "lora_none_loaded": ({"lora": "my-adapter"}, "lora", "no adapter named 'my-adapter' is loaded; available: none"),
    "unknown_field": ({"negative_promt": "x"}, "negative_promt", "Unrecognized request argument"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_the_openai_error_body(scene_service, case):
    overrides, param, phrase = BAD_REQUESTS[case]
    body = {key: value for key, value in {"prompt": PROMPT, **overrides}.items() if value is not None}
    response = httpx.post(f"{scene_service.url}/v1/images/generations", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and phrase in error["message"], error


@pytest.mark.timeout(60)
def test_the_openai_client_sees_400_for_an_edit_on_a_text_model_and_for_bad_json(scene_service):
    with pytest.raises(openai.BadRequestError) as info:
        _client(scene_service.url).images.edit(image=("in.png", _png_bytes(), "image/png"), prompt=PROMPT)
    assert info.value.body["code"] == "unsupported_endpoint" and "/v1/images/generations" in info.value.body["message"]
    response = httpx.post(f"{scene_service.url}/v1/images/generations", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.timeout(60)
def test_a_wrong_or_missing_key_gets_401(scene_service):
    with pytest.raises(openai.AuthenticationError) as info:
        _client(scene_service.url, key="wrong").images.generate(prompt=PROMPT)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{scene_service.url}/v1/models").status_code == 401
    assert httpx.get(f"{scene_service.url}/health").status_code == 200  # health and metrics stay open


@pytest.mark.timeout(60)
def test_an_oversized_body_gets_413(scene_service):
    url, headers = f"{scene_service.url}/v1/images/generations", {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"prompt": "x" * 300_000}).encode()
    response = httpx.post(url, content=big, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while it streams in
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = httpx.post(url, content=chunks(), headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 413, response.text


@pytest.mark.timeout(60)
def test_a_failing_batch_answers_500_and_the_next_request_succeeds(scene_service, scene_served):
    def fail(module, args):
        raise RuntimeError("injected failure inside the transformer")

    handle = scene_served.pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail)
    client = _client(scene_service.url)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2})
    finally:
        handle.remove()
    assert info.value.status_code == 500 and "injected failure inside the transformer" in info.value.body["message"]
    assert info.value.body["code"] == "generation_failed"
    assert len(client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2}).data) == 1
    assert 'diffusers_qwen_sp_batches_total{outcome="failed"}' in httpx.get(f"{scene_service.url}/metrics").text


@pytest.mark.timeout(60)
def test_health_and_requests_get_503_while_the_model_loads(scene_served):
    loaded = threading.Event()
    config = ServeConfig(port=0)
    served = describe_served_model(scene_served.pipe, config, 64, 20, scene=True)
    service = Service(config, load=lambda _: (loaded.wait(30), served)[1])
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: service.url is not None, 30, "the server to listen")
        health = httpx.get(f"{service.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        response = httpx.post(f"{service.url}/v1/images/generations", json={"prompt": PROMPT})
        assert response.status_code == 503 and "still loading" in response.json()["error"]["message"]
        assert response.headers["Retry-After"] == "5"
        loaded.set()
        wait_for(lambda: httpx.get(f"{service.url}/health").status_code == 200, 30, "ready")
    finally:
        loaded.set()
        service.request_stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_health_models_and_metrics(scene_service):
    url = scene_service.url
    assert httpx.get(f"{url}/health").json() == {"status": "ready", "reason": "ready"}
    models = _client(url).models.list()
    assert [model.id for model in models.data] == ["qwen-image-scenes", "qwen-image"]
    _client(url).images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 3})
    text = httpx.get(f"{url}/metrics").text
    for name in ("requests_total", "queue_depth", "batch_size_bucket", "request_latency_seconds_bucket",
                 "queue_wait_seconds_count", "batch_seconds_sum", "images_total", "transformer_calls_total"):
        assert f"diffusers_qwen_sp_{name}" in text, name
    assert 'diffusers_qwen_sp_requests_total{endpoint="/v1/images/generations",outcome="ok"}' in text
    computed = next(line for line in text.splitlines() if 'transformer_calls_total{result="computed"}' in line)
    assert float(computed.split()[-1]) >= 6  # 3 steps x 2 CFG branches at least


def _png_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.timeout(90)
def test_edits_on_an_edit_model_equal_the_pipeline_call():
    import torch

    from diffusers_qwen_sp.testing import build_tiny_pipeline, small_reference_images, sp_pipeline_class

    pipe = build_tiny_pipeline("qwen_image_edit", pipeline_cls=sp_pipeline_class("qwen_image_edit"))
    config = ServeConfig(model="tiny-edit", port=0)
    running = _InProcess(config, describe_served_model(pipe, config, default_size=64, default_steps=2))
    try:
        client = _client(running.url)
        with small_reference_images():  # the stock edit pipeline resizes references to 1024x1024 otherwise
            result = client.images.edit(image=("in.png", _png_bytes(), "image/png"), prompt="make it blue",
                                        model="qwen-image-edit", size="64x64", extra_body={"seed": 5})
            expected = pipe(image=Image.open(io.BytesIO(_png_bytes())).convert("RGB"), prompt="make it blue",
                            negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2, height=64, width=64,
                            generator=torch.Generator().manual_seed(5)).images[0]
        assert np.array_equal(pixels(result.data[0].b64_json), np.asarray(expected).astype(np.int16))
        with pytest.raises(openai.BadRequestError, match="edits input images"):
            client.images.generate(prompt="a cat")
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            client.images.edit(image=("in.png", b"not an image", "image/png"), prompt="make it blue")
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------------ the command line


def _serve_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "diffusers_qwen_sp", "serve", "--port", "0", *flags]


class _Process:
    """A subprocess whose stdout lines are collected by a thread; `url` is read from the 'Listening on' line."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.popen.stdout), daemon=True).start()

    def url(self, within: float) -> str:
        wait_for(lambda: any("Ready:" in line for line in self.lines) or self.popen.poll() is not None, within,
                  "the server to be ready")
        assert self.popen.poll() is None, "".join(self.lines)
        line = next(line for line in self.lines if line.startswith("Listening on "))
        return line.split()[2]

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cli_serves_with_a_key_from_the_environment_counts_teacache_and_drains_on_sigterm():
    process = _Process(_serve_command("--teacache", "0.2"), env={"DIFFUSERS_QWEN_SP_API_KEY": KEY})
    try:
        url = process.url(within=60)
        client = _client(url)
        assert client.images.generate(prompt=PROMPT, extra_body={"seed": 1}).data[0].b64_json
        skipped = next(line for line in httpx.get(f"{url}/metrics").text.splitlines()
                       if 'transformer_calls_total{result="skipped"}' in line)
        assert float(skipped.split()[-1]) > 0  # the scene model's coefficients skip steps at 0.2
        long_result: dict = {}

        def long_request() -> None:  # 100 steps: still running when SIGTERM comes
            try:
                long_result["data"] = client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 100})
            except Exception as error:  # noqa: BLE001 - asserted below
                long_result["error"] = error

        started = _metric(url, "queue_wait_seconds_count")
        thread = threading.Thread(target=long_request)
        thread.start()
        wait_for(lambda: _metric(url, "queue_wait_seconds_count") > started, 30, "the long request to start")
        process.popen.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, 10, "health to turn 503")
        with pytest.raises(openai.APIStatusError) as info:
            client.images.generate(prompt=PROMPT)
        assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
        thread.join(60)
        assert "data" in long_result, long_result  # finished, not cut off
        assert process.popen.wait(30) == 0, "".join(process.lines)
        assert "Drained and stopped." in "".join(process.lines)
    finally:
        process.kill()


# ------------------------------------------------------------------------------------------------ world 2


def _serve_rank(rank: int, world_size: int, folder: str) -> str:
    """One rank of a Ulysses-2 service; rank 0 writes its URL. A prompt holding FAIL_MARKER fails on every rank."""
    from diffusers_qwen_sp.cli.serve import load_for_serving
    from diffusers_qwen_sp.serve.service import stop_signals_drain

    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))

    def load(config):
        served = load_for_serving(config)
        encode_prompt = served.pipe.encode_prompt

        def failing_encode_prompt(*args, **kwargs):
            prompts = kwargs.get("prompt")
            if any(FAIL_MARKER in prompt for prompt in ([prompts] if isinstance(prompts, str) else prompts or [])):
                raise RuntimeError(f"injected failure on rank {rank}")
            return encode_prompt(*args, **kwargs)

        served.pipe.encode_prompt = failing_encode_prompt
        if rank == 1:  # after the pipeline's last collective, on rank 1 only: the all-reduce must tell rank 0
            postprocess = served.pipe.image_processor.postprocess
            flag = Path(folder, "fail_rank1_once")

            def failing_postprocess(*args, **kwargs):
                if flag.exists():
                    flag.unlink()
                    raise RuntimeError("injected failure on rank 1 only")
                return postprocess(*args, **kwargs)

            served.pipe.image_processor.postprocess = failing_postprocess
        return served

    config = ServeConfig(port=0, ulysses_degree=2, timeout=COLLECTIVE_TIMEOUT_S, broken_grace_s=2.0)
    service = Service(config, load, on_listening=lambda url: Path(folder, "url").write_text(url))
    with stop_signals_drain(service):  # the rank's main thread: SIGTERM drains the group
        service.run()
    return "drained"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    running = ServingWorld(_serve_rank, tmp_path_factory.mktemp("world"), timeout=100,
                           collective_timeout=COLLECTIVE_TIMEOUT_S)
    yield running
    if running.thread.is_alive():
        os.kill(running.pid(0), signal.SIGTERM)
        running.thread.join(60)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world2_ulysses_service_answers_the_single_process_pixels(world, generated):
    result = _client(world.url).images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 3})
    assert np.array_equal(pixels(result.data[0].b64_json), generated)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world2_a_batch_failing_on_every_rank_gets_500_and_the_ranks_stay_in_step(world, generated):
    client = _client(world.url)
    with pytest.raises(openai.InternalServerError) as info:
        client.images.generate(prompt=f"{PROMPT} {FAIL_MARKER}")
    assert "rank 0: RuntimeError: injected failure on rank 0" in info.value.body["message"], info.value.body
    result = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 3})
    assert np.array_equal(pixels(result.data[0].b64_json), generated)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world2_a_batch_failing_on_one_rank_only_gets_500_and_the_ranks_stay_in_step(world, generated):
    (world.folder / "fail_rank1_once").touch()
    client = _client(world.url)
    with pytest.raises(openai.InternalServerError) as info:
        client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2})
    assert "rank 1: RuntimeError: injected failure on rank 1 only" in info.value.body["message"], info.value.body
    result = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 3})
    assert np.array_equal(pixels(result.data[0].b64_json), generated)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world2_sigterm_on_rank_0_drains_the_group_and_every_rank_exits_cleanly(world):
    client = _client(world.url)
    long_result: dict = {}
    started = _metric(world.url, "queue_wait_seconds_count")
    thread = threading.Thread(target=lambda: long_result.update(
        data=client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 60})))
    thread.start()
    wait_for(lambda: _metric(world.url, "queue_wait_seconds_count") > started, 30, "the request to start")
    os.kill(world.pid(0), signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{world.url}/health").status_code == 503, 10, "health to turn 503")
    thread.join(60)
    assert len(long_result["data"].data) == 1  # the request in flight finished
    assert world.finish(within=30) == ["drained", "drained"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_world2_a_killed_rank_turns_health_503_and_ends_rank_0_with_an_error(tmp_path):
    killed = ServingWorld(_serve_rank, tmp_path, timeout=100, collective_timeout=COLLECTIVE_TIMEOUT_S)
    try:
        _kill_rank_1_while_a_request_runs(killed)
    finally:
        for rank in (0, 1):  # whatever failed above, no rank outlives the test
            try:
                os.kill(killed.pid(rank), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_rank_1_while_a_request_runs(killed: ServingWorld) -> None:
    client = _client(killed.url)
    in_flight: dict = {}

    def long_request() -> None:
        try:
            client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 100})
        except Exception as error:  # noqa: BLE001 - asserted below
            in_flight["error"] = error

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(lambda: _metric(killed.url, "queue_wait_seconds_count") >= 1, 30, "the request to start")
    start = time.monotonic()
    os.kill(killed.pid(1), signal.SIGKILL)
    statuses = wait_until_health_is_broken(killed.url, COLLECTIVE_TIMEOUT_S)
    assert statuses[-1] == (503, "broken"), statuses
    thread.join(30)
    error = in_flight.get("error")
    assert isinstance(error, openai.APIStatusError) and error.status_code == 503, in_flight
    assert "lost the process group" in error.body["message"], error.body
    rank0, rank1 = killed.finish(within=COLLECTIVE_TIMEOUT_S + 10)
    assert rank1.exitcode == -signal.SIGKILL, rank1
    assert "FatalServeError: rank 0 of 2 lost the process group" in rank0.traceback_text, rank0
    assert "another rank died, was killed or did not answer within the collective timeout of 10 s" in str(rank0)
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT_S + 5

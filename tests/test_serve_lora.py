"""Per-request LoRA in `serve`: adapters loaded at start (`--lora NAME=SOURCE`), picked by name in `lora`.

The service runs in a thread of the test process on the shipped scene model with two random LoRA adapters written
into a tmp folder (never downloaded). Every answer is compared with the pipeline called in process (same seed, same
adapters set with diffusers' `set_adapters`): requests sent one at a time are single-image batches, and must give the
same pixels exactly (same process, same arithmetic); in a switch sequence A -> none -> B -> A each answer also equals
a fresh pipeline that loaded only that adapter, so a switch leaves nothing behind. Requests with different adapters
never share a batch; batched images match one-by-one ones within one pixel level (batched matmul rounding, as in
tests/test_serve.py).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch

from diffusers_qwen_sp.serve import Service, ServeConfig

from _serving import pixels


pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


PROMPT = "two red circles left of a blue square on a yellow background"
OTHER = "a green triangle above a blue circle on a white background"
STEPS = 8
SEED = 5
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.2", "img_mod.1", "proj_out")


def _write_lora(transformer_config: dict, seed: int, directory) -> str:
    """A random LoRA for the scene transformer (B scaled so the images move visibly), diffusers' file layout."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TARGETS), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**transformer_config)
        transformer.add_adapter(config)
        layers = {key: value.detach() * (0.5 if ".lora_B." in key else 1.0)
                  for key, value in get_peft_model_state_dict(transformer).items()}
    QwenImagePipeline.save_lora_weights(directory, transformer_lora_layers=layers,
                                        transformer_lora_adapter_metadata=config.to_dict())
    return str(directory)



def _in_process(pipe, prompt: str = PROMPT, seed: int = SEED) -> np.ndarray:
    image = pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS, height=64,
                 width=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _scene_pipeline(loras: tuple[tuple[str, str], ...] = ()):
    from diffusers_qwen_sp.cli._pipeline import load_pipeline
    from diffusers_qwen_sp.serve.model import load_adapters

    pipe, _ = load_pipeline(None, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_adapters(pipe, loras)
    return pipe


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from diffusers_qwen_sp.cli._pipeline import load_pipeline

    pipe, _ = load_pipeline(None, torch.float32)
    config = dict(pipe.transformer.config)
    folder = tmp_path_factory.mktemp("serve_loras")
    return (("a", _write_lora(config, 1, folder / "a")), ("b", _write_lora(config, 2, folder / "b")))


@pytest.fixture(scope="module")
def service(loras):
    from diffusers_qwen_sp.cli.serve import load_for_serving

    config = ServeConfig(port=0, loras=loras, max_batch_size=4, batch_wait_ms=300, max_queue=16)
    served = load_for_serving(config)  # the CLI's loader: loads the adapters, all off
    service = Service(config, load=lambda _: served)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while service.state.status != "ready":
        assert not errors and time.monotonic() < deadline, errors or "the service did not become ready"
        time.sleep(0.02)
    yield service
    service.request_stop()
    thread.join(30)
    assert not thread.is_alive() and not errors, errors


@pytest.fixture(scope="module")
def references(loras, service):
    """In-process images (seed SEED, PROMPT) for each adapter setting, from one pipeline with both adapters. After
    the service started: its loader sets the CPU threads, and another thread count rounds differently."""
    pipe = _scene_pipeline(loras)
    out = {}
    for name, adapters in {"none": [], "a": [("a", 1.0)], "b": [("b", 1.0)], "a_half": [("a", 0.5)],
                           "a_and_b": [("a", 1.0), ("b", 0.7)]}.items():
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        else:
            pipe.disable_lora()
        out[name] = _in_process(pipe)
        out[f"{name}_other"] = _in_process(pipe, OTHER, SEED + 1)
    # A fresh pipeline that loaded only "a" (nothing of "b" or of earlier switches in it).
    fresh = _scene_pipeline(loras[:1])
    fresh.enable_lora()
    out["a_fresh"] = _in_process(fresh)
    return out


LORA_FIELDS = {
    "none": None,
    "a": "a",
    "b": {"name": "b"},
    "a_half": {"name": "a", "scale": 0.5},
    "a_and_b": [{"name": "b", "scale": 0.7}, "a"],
}


def _generate(url: str, lora, prompt: str = PROMPT, seed: int = SEED) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    extra = {"seed": seed, "num_inference_steps": STEPS}
    if lora is not None:
        extra["lora"] = lora
    result = client.images.generate(prompt=prompt, size="64x64", response_format="b64_json", extra_body=extra)
    return pixels(result.data[0].b64_json)


def test_the_references_differ(references):
    # Not vacuous: each adapter setting moves the image well beyond a pixel level.
    for name in ("a", "b", "a_half", "a_and_b"):
        assert np.abs(references[name] - references["none"]).max() > 8, name
    assert np.abs(references["a"] - references["a_half"]).max() > 4


@pytest.mark.timeout(120)
def test_switching_adapters_per_request_equals_the_pipeline(service, references):
    url = service.url
    # A -> none -> B -> A -> half A -> A and B -> none, twice: every answer equals the in-process call exactly.
    for _ in range(2):
        for name in ("a", "none", "b", "a", "a_half", "a_and_b", "none"):
            got = _generate(url, LORA_FIELDS[name])
            assert np.array_equal(got, references[name]), (name, np.abs(got - references[name]).max())
    assert np.array_equal(references["a"], references["a_fresh"])  # switching left nothing behind


@pytest.mark.timeout(120)
def test_requests_with_different_adapters_never_share_a_batch(service, references):
    url = service.url
    before = _batch_count(url)
    jobs = [("a", PROMPT, SEED), ("none", OTHER, SEED + 1), ("a", OTHER, SEED + 1), ("none", PROMPT, SEED)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _generate(url, LORA_FIELDS[job[0]], job[1], job[2]), jobs))
    batches = _batch_count(url) - before
    assert 2 <= batches <= 4, batches  # never one batch: two adapters settings
    for (name, prompt, _), got in zip(jobs, answers):
        expected = references[name if prompt == PROMPT else f"{name}_other"]
        assert np.abs(got - expected).max() <= 1, (name, prompt, np.abs(got - expected).max())


def _batch_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line for line in text.splitlines()
                      if line.startswith("diffusers_qwen_sp_batch_size_count")).split()[-1])


BAD_LORA = {
    "unknown": ("c", "no adapter named 'c' is loaded; available: 'a', 'b'"),
    "scale_too_large": ({"name": "a", "scale": 9}, "between -4 and 4"),
    "scale_not_a_number": ({"name": "a", "scale": "high"}, "must be a number"),
    "twice": (["a", {"name": "a", "scale": 0.5}], "more than once"),
    "wrong_type": (3, "an adapter name, an object"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_lora_fields_get_400_naming_the_field(service, case):
    value, phrase = BAD_LORA[case]
    response = httpx.post(f"{service.url}/v1/images/generations", json={"prompt": PROMPT, "lora": value}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "lora" and phrase in error["message"], error


def test_models_list_the_adapters(service):
    data = httpx.get(f"{service.url}/v1/models").json()["data"]
    assert all(model["adapters"] == ["a", "b"] for model in data), data


def test_config_and_flags_are_checked(tmp_path):
    from diffusers_qwen_sp.cli import build_parser

    with pytest.raises(ValueError, match="names an adapter twice"):
        ServeConfig(loras=(("a", "x"), ("a", "y")))
    with pytest.raises(ValueError, match="--lora NAME=SOURCE"):
        ServeConfig(loras=(("none", "x"),))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora", "no-equals-sign"])
    args = build_parser().parse_args(["serve", "--lora", "a=./x.safetensors", "--lora", "b=org/repo::w.safetensors"])
    assert args.loras == [("a", "./x.safetensors"), ("b", "org/repo::w.safetensors")]
    with pytest.raises(ValueError, match=r"--lora a=.*missing: could not load the adapter"):
        _scene_pipeline((("a", str(tmp_path / "missing")),))

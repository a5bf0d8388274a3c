"""Our pipelines against the stock diffusers ones (fp32, same weights), custom_pipeline loading and the CLI.

Tolerance: max abs diff <= 1e-6 (the same ops run in the same order, so in practice 0).
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from diffusers_qwen_sp import QwenImageSPTransformer2DModel, custom_pipeline_path
from diffusers_qwen_sp.cli import main as cli_main
from diffusers_qwen_sp.pipelines import PIPELINES_BY_NAME
from diffusers_qwen_sp.testing import (
    TINY_VARIANTS,
    build_tiny_pipeline,
    save_tiny_pipeline,
    small_reference_images,
    sp_pipeline_class,
    tiny_from_pretrained_kwargs,
    tiny_pipeline_call_kwargs,
)




def _images(pipe, variant, **overrides):
    with small_reference_images(), torch.no_grad():
        images = pipe(**tiny_pipeline_call_kwargs(variant, **overrides)).images
    # Layered returns one (layers, C, H, W) tensor per prompt.
    return torch.stack(list(images)) if isinstance(images, list) else images


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_pipeline_matches_stock(variant):
    stock = build_tiny_pipeline(variant)
    ours = build_tiny_pipeline(variant, pipeline_cls=sp_pipeline_class(variant))
    assert isinstance(ours.transformer, QwenImageSPTransformer2DModel)
    expected = _images(stock, variant)
    actual = _images(ours, variant)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-6


def test_batch_of_prompts_matches_stock():
    stock = build_tiny_pipeline("qwen_image")
    ours = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    overrides = dict(
        prompt=["a red cat", "two small blue squares on a big yellow field at noon"],
        negative_prompt=["blurry", "low quality, watermark, text"],
        num_images_per_prompt=2,
    )
    expected = _images(stock, "qwen_image", **overrides)
    actual = _images(ours, "qwen_image", **overrides)
    assert actual.shape[0] == 4
    assert (actual - expected).abs().max().item() <= 1e-6


class _RecordContexts(ModelHook):
    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.state_manager = StateManager(BaseState)
        self.seen = []

    def pre_forward(self, module, *args, **kwargs):
        context = self.state_manager.context
        self.seen.append((context.name, context.step_index, context.num_inference_steps, float(context.timestep)))
        return args, kwargs

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def test_cache_context_carries_the_denoising_step():
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    hook = _RecordContexts()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(hook, "record")
    _images(pipe, "qwen_image", num_inference_steps=3)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    expected = []
    for index, t in enumerate(timesteps):
        expected += [("cond", index, 3, t), ("uncond", index, 3, t)]
    assert hook.seen == expected


def test_stock_transformer_is_converted_sharing_weights():
    stock = build_tiny_pipeline("qwen_image")
    ours = sp_pipeline_class("qwen_image")(**stock.components)
    assert isinstance(ours.transformer, QwenImageSPTransformer2DModel)
    assert ours.transformer.img_in.weight.data_ptr() == stock.transformer.img_in.weight.data_ptr()
    ours.transformer = stock.transformer  # setting it later converts as well
    assert isinstance(ours.transformer, QwenImageSPTransformer2DModel)


def test_custom_pipeline_loads_a_saved_tiny_pipeline(tmp_path):
    path = save_tiny_pipeline("qwen_image", tmp_path / "tiny")
    pipe = DiffusionPipeline.from_pretrained(
        path, custom_pipeline=custom_pipeline_path("qwen_image"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "QwenImageSPPipeline"
    assert isinstance(pipe.transformer, QwenImageSPTransformer2DModel)
    pipe.set_progress_bar_config(disable=True)
    stock = build_tiny_pipeline("qwen_image")
    assert (_images(pipe, "qwen_image") - _images(stock, "qwen_image")).abs().max().item() <= 1e-6
    # Saved by our pipeline, the folder still loads with plain diffusers.
    pipe.save_pretrained(tmp_path / "resaved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "resaved")
    assert type(again).__name__ == "QwenImagePipeline"


@pytest.mark.parametrize("name", sorted(PIPELINES_BY_NAME))
def test_each_custom_pipeline_folder_exposes_exactly_our_class(name):
    # diffusers loads every local pipeline.py under one module name, so import each file under its own name here.
    spec = importlib.util.spec_from_file_location(f"_custom_{name}", f"{custom_pipeline_path(name)}/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    candidates = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, DiffusionPipeline) and cls.__module__.split(".")[0] != "diffusers"
    ]
    assert candidates == [PIPELINES_BY_NAME[name]]


def test_custom_pipeline_from_saved_edit_pipeline_matches_stock(tmp_path):
    path = save_tiny_pipeline("qwen_image_edit_2511", tmp_path / "tiny")
    ours = PIPELINES_BY_NAME["qwen_image_edit_plus"].from_pretrained(
        path, **tiny_from_pretrained_kwargs("qwen_image_edit_2511")
    )
    ours.set_progress_bar_config(disable=True)
    assert ours.transformer.config.zero_cond_t
    stock = build_tiny_pipeline("qwen_image_edit_2511")
    assert (_images(ours, "qwen_image_edit_2511") - _images(stock, "qwen_image_edit_2511")).abs().max() <= 1e-6


def test_unknown_custom_pipeline_name():
    with pytest.raises(ValueError, match="'qwen_image_video'.*qwen_image_edit"):
        custom_pipeline_path("qwen_image_video")


def test_cli_generate_writes_a_png(tmp_path, capsys):
    from PIL import Image

    output = tmp_path / "out.png"
    assert cli_main(["generate", "--steps", "2", "--height", "32", "--width", "48", "--output", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (48, 32)
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_unsupported_sizes(tmp_path, capsys):
    assert cli_main(["generate", "--height", "60", "--output", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "height=60" in error and "56 or 64" in error
    with pytest.raises(SystemExit):
        cli_main(["generate", "--width", "-8"])


def test_cli_rejects_a_model_that_is_not_qwen_image(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert cli_main(["generate", "--model", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "StableDiffusionPipeline" in capsys.readouterr().err


def test_cli_calibrate_teacache_prints_coefficients(capsys):
    import re

    assert cli_main(["calibrate-teacache", "--prompts", "a red cat", "a blue dog", "--steps", "5"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("TeaCacheConfig(")][0]
    coefficients = [float(value) for value in re.findall(r"[-+0-9.e]+", line.split("[")[1])]
    assert len(coefficients) == 5 and all(abs(value) < float("inf") for value in coefficients)


def test_cli_generate_with_teacache_reports_skips(tmp_path, capsys):
    output = tmp_path / "cached.png"
    assert cli_main(["generate", "--teacache", "0.15", "--steps", "6", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.exists() and "TeaCache cond: computed [0," in printed and "skipped [" in printed


@pytest.mark.parametrize("script", ["text_to_image.py", "edit.py"])
def test_examples_run_on_the_tiny_model(script, tmp_path, monkeypatch, capsys):
    import contextlib
    import runpy
    from pathlib import Path

    from PIL import Image

    from diffusers_qwen_sp import QwenImageEditPlusSPPipeline

    output = tmp_path / "example.png"
    path = Path(__file__).resolve().parents[1] / "examples" / script
    argv = [str(path), "--steps", "4", "--teacache", "0.2", "--output", str(output)]
    context = contextlib.nullcontext()  # text_to_image.py runs the shipped scene model without --model
    if script == "edit.py":
        # No edit model ships with the package: save a tiny Edit-2511 and give the example a 64x64 input image.
        variant = "qwen_image_edit_2511"
        model = save_tiny_pipeline(variant, tmp_path / "tiny-qwen-image-edit-2511")
        image_path = tmp_path / "input.png"
        Image.new("RGB", (64, 64), (200, 40, 40)).save(image_path)
        argv += ["--model", str(model), "--image", str(image_path)]
        # Without torchvision transformers cannot load the saved processor: hand the example's from_pretrained a
        # fresh one, as `tiny_from_pretrained_kwargs` documents.
        load = QwenImageEditPlusSPPipeline.from_pretrained
        monkeypatch.setattr(
            QwenImageEditPlusSPPipeline,
            "from_pretrained",
            staticmethod(lambda *args, **kwargs: load(*args, **tiny_from_pretrained_kwargs(variant), **kwargs)),
        )
        # The stock edit pipeline resizes its reference image to 1024x1024 and sizes its output from it: cap both at
        # 64x64 for the tiny model on a CPU.
        context = small_reference_images()
    monkeypatch.setattr("sys.argv", argv)
    with context:
        runpy.run_path(str(path), run_name="__main__")
    with Image.open(output) as image:
        assert image.size == (64, 64)
    assert f"wrote {output}" in capsys.readouterr().out


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_call_shows_the_stock_signature_and_docstring(variant):
    from diffusers_qwen_sp.pipelines import stock_parent

    cls = sp_pipeline_class(variant)
    stock = stock_parent(cls)
    pipe = build_tiny_pipeline(variant, pipeline_cls=cls)
    ours, theirs = inspect.signature(pipe.__call__), inspect.signature(stock.__call__.__get__(pipe))
    assert list(ours.parameters) == list(theirs.parameters) and "prompt" in ours.parameters
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
    assert cls.__call__.__doc__ == stock.__call__.__doc__ and "num_inference_steps" in cls.__call__.__doc__


def test_a_pipeline_built_from_our_components_saves_a_folder_both_loaders_load(tmp_path):
    import json

    from diffusers import QwenImagePipeline

    from diffusers_qwen_sp import QwenImageSPPipeline
    from diffusers_qwen_sp.testing import build_tiny_components

    expected = _images(build_tiny_pipeline("qwen_image"), "qwen_image")
    built = QwenImageSPPipeline(**build_tiny_components("qwen_image", transformer_cls=QwenImageSPTransformer2DModel))
    swapped = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    swapped.transformer = QwenImageSPTransformer2DModel.from_transformer(build_tiny_pipeline("qwen_image").transformer)
    for name, pipe in (("built", built), ("swapped", swapped)):
        pipe.save_pretrained(tmp_path / name)
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"], name
        assert index["_class_name"] == "QwenImagePipeline", name
        for loader in (QwenImageSPPipeline, QwenImagePipeline, DiffusionPipeline):
            for _ in range(2):
                loaded = loader.from_pretrained(tmp_path / name)
                loaded.set_progress_bar_config(disable=True)
                assert (_images(loaded, "qwen_image") - expected).abs().max().item() <= 1e-6, (name, loader)

"""Tests of the tiny offline Qwen-Image pipelines in `diffusers_qwen_sp.testing`."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import (
    pipeline_qwenimage_edit,
    pipeline_qwenimage_edit_plus,
    pipeline_qwenimage_layered,
)

from diffusers_qwen_sp.testing import (
    QWEN_SPECIAL_TOKENS,
    TINY_VARIANTS,
    TINY_VOCAB_SIZE,
    build_tiny_components,
    build_tiny_pipeline,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_pipeline,
    small_reference_images,
    stock_pipeline_class,
    tiny_from_pretrained_kwargs,
    tiny_pipeline_call_kwargs,
    tiny_transformer_config,
    tiny_vae_config,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAMES = ("transformer", "vae", "text_encoder")

# (layers, RGBA, H, W) for layered; (batch, RGB, H, W) otherwise. 64x64 everywhere: the call kwargs ask for 64x64
# and `small_reference_images` turns Layered's 640x640 resolution bucket into 64x64.
EXPECTED_SHAPES = {
    "qwen_image": (1, 3, 64, 64),
    "qwen_image_edit": (1, 3, 64, 64),
    "qwen_image_edit_plus": (1, 3, 64, 64),
    "qwen_image_edit_2511": (1, 3, 64, 64),
    "qwen_image_layered": (2, 4, 64, 64),
}


def _run(pipe, variant: str, **overrides) -> torch.Tensor:
    with small_reference_images():
        images = pipe(**tiny_pipeline_call_kwargs(variant, **overrides)).images
    if variant == "qwen_image_layered":
        # One list entry per prompt, each (layers, C, H, W).
        assert isinstance(images, list) and len(images) == 1
        return images[0]
    return images


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_vocab():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == TINY_VOCAB_SIZE
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    # BPE tokens first, then the 14 special tokens in the real tokenizer's order: 512 - 14 = 498.
    assert ids == list(range(498, 512))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    text = "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>a red cat, 3 dogs!<|im_end|>"
    encoded = tokenizer(text).input_ids
    assert tokenizer.decode(encoded) == text
    # Special tokens stay single tokens.
    assert encoded[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") in encoded


def test_tokenizer_is_fresh_per_call():
    first = build_tiny_tokenizer()
    first.add_tokens(["<|corrupted|>"], special_tokens=True)
    second = build_tiny_tokenizer()
    assert first is not second
    assert len(second) == TINY_VOCAB_SIZE
    assert second.get_vocab() == build_tiny_tokenizer().get_vocab()


def test_tokenizer_is_deterministic_across_processes():
    def digest(tokenizer) -> str:
        return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()

    code = (
        "import hashlib, json\n"
        "from diffusers_qwen_sp.testing import build_tiny_tokenizer\n"
        "vocab = sorted(build_tiny_tokenizer().get_vocab().items())\n"
        "text = 'a red cat sitting on a blue mat, replace the background'\n"
        "print(hashlib.sha256(json.dumps(vocab).encode()).hexdigest(), build_tiny_tokenizer()(text).input_ids)\n"
    )
    # Another hash seed: the BPE trainer's Rust hash maps are seeded per process.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120, check=True
    )
    other_digest, other_ids = result.stdout.strip().splitlines()[-1].split(" ", 1)
    tokenizer = build_tiny_tokenizer()
    assert other_digest == digest(tokenizer)
    assert other_ids == str(tokenizer("a red cat sitting on a blue mat, replace the background").input_ids)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_template_prefix_is_longer_than_the_dropped_tokens(variant):
    # The pipelines drop the first `prompt_template_encode_start_idx` hidden states (34 or 64) as template. With the
    # real tokenizer that is exactly the system prompt; the tiny one must not drop into the user prompt.
    pipe = build_tiny_pipeline(variant)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    # Edit's prefix holds one `<|image_pad|>` that the processor expands to >= 4 tokens; counting it once is a bound.
    assert len(pipe.tokenizer(prefix).input_ids) > pipe.prompt_template_encode_start_idx


def test_processor_expands_image_tokens_for_the_vision_tower():
    processor = build_tiny_processor()
    image = tiny_pipeline_call_kwargs("qwen_image_edit")["image"]  # 64x48 px
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>"
    inputs = processor(text=[text], images=image, padding=True, return_tensors="pt")
    # 64x48 -> smart_resize to 56x56 (min 56*56 px) -> 4x4 patches of 14 px -> 2x2 merged tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"] == image_token_id).sum().item() == 4
    # 16 patches of 3 channels x 2 frames x 14 x 14 px.
    assert inputs["pixel_values"].shape == (16, 3 * 2 * 14 * 14)


# ---------------------------------------------------------------------------------------------------------------------
# Configs and components
# ---------------------------------------------------------------------------------------------------------------------


def test_transformer_config_variants():
    base = tiny_transformer_config()
    assert base["in_channels"] == 16 and base["out_channels"] == 4
    assert base["num_attention_heads"] * base["attention_head_dim"] == 64
    assert sum(base["axes_dims_rope"]) == base["attention_head_dim"]
    assert tiny_transformer_config("qwen_image_edit_2511")["zero_cond_t"] is True
    layered = tiny_transformer_config("qwen_image_layered")
    assert layered["use_additional_t_cond"] is True and layered["use_layer3d_rope"] is True
    assert tiny_transformer_config(num_layers=3)["num_layers"] == 3


def test_layered_vae_is_rgba_with_latents_not_mistakable_for_images():
    # The layered pipeline treats an image tensor with `z_dim` channels as ready-made latents, so an RGBA VAE needs
    # z_dim != 4; the transformer packs 2x2 patches of those latents.
    vae = tiny_vae_config("qwen_image_layered")
    assert vae["input_channels"] == 4 and vae["z_dim"] != 4
    transformer = tiny_transformer_config("qwen_image_layered")
    assert transformer["in_channels"] == 4 * vae["z_dim"] and transformer["out_channels"] == vae["z_dim"]
    assert tiny_vae_config("qwen_image")["input_channels"] == 3


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_components_match_the_stock_pipeline_signature(variant):
    components = build_tiny_components(variant)
    pipe = stock_pipeline_class(variant)(**components)
    assert set(components) == set(pipe.components)
    assert ("processor" in components) == (variant != "qwen_image")
    vocab = components["text_encoder"].get_input_embeddings().num_embeddings
    assert vocab == TINY_VOCAB_SIZE >= len(components["tokenizer"])
    config = components["text_encoder"].config
    tokenizer = components["tokenizer"]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_same_seed_same_weights_other_seed_other_weights():
    first, second = build_tiny_components("qwen_image_edit", seed=3), build_tiny_components("qwen_image_edit", seed=3)
    for name in MODEL_NAMES:
        _assert_same_weights(first[name], second[name])
    other = build_tiny_components("qwen_image_edit", seed=4)
    weight = "img_in.weight"
    assert not torch.equal(first["transformer"].state_dict()[weight], other["transformer"].state_dict()[weight])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_components("qwen_image")
    assert torch.equal(torch.rand(4), expected)


def test_transformer_cls_gets_the_same_weights():
    class MyTransformer(QwenImageTransformer2DModel):
        pass

    custom = build_tiny_components("qwen_image", transformer_cls=MyTransformer)["transformer"]
    stock = build_tiny_components("qwen_image")["transformer"]
    assert type(custom) is MyTransformer
    _assert_same_weights(custom, stock)


def test_pipeline_cls_override():
    class MyPipeline(QwenImagePipeline):
        pass

    assert type(build_tiny_pipeline("qwen_image", pipeline_cls=MyPipeline)) is MyPipeline
    assert type(build_tiny_pipeline("qwen_image")) is QwenImagePipeline


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_stock_pipeline_runs_and_is_reproducible(variant):
    pipe = build_tiny_pipeline(variant)
    assert type(pipe) is stock_pipeline_class(variant)
    image = _run(pipe, variant)
    assert image.shape == EXPECTED_SHAPES[variant]
    assert torch.isfinite(image).all()
    # "pt" output is denormalized to [0, 1].
    assert image.min() >= 0 and image.max() <= 1

    again = _run(build_tiny_pipeline(variant), variant)
    assert torch.equal(image, again)
    other_seed = _run(build_tiny_pipeline(variant, seed=1), variant)
    assert not torch.equal(image, other_seed)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_save_and_from_pretrained_roundtrip(variant, tmp_path):
    path = save_tiny_pipeline(variant, tmp_path / variant)
    assert path == tmp_path / variant
    assert (path / "model_index.json").is_file()
    loaded = stock_pipeline_class(variant).from_pretrained(path, **tiny_from_pretrained_kwargs(variant))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is stock_pipeline_class(variant)

    built = build_tiny_pipeline(variant)
    for name in MODEL_NAMES:
        _assert_same_weights(getattr(built, name), getattr(loaded, name))
    assert loaded.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    # Same weights, bit for bit (above), but loaded ones sit in the memory-mapped safetensors file at 8-byte rather
    # than 64-byte alignment, which can send a matmul down another SIMD path: Layered differs by 5e-7. Tolerance 1e-6.
    torch.testing.assert_close(_run(loaded, variant), _run(built, variant), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# small_reference_images
# ---------------------------------------------------------------------------------------------------------------------


def test_small_reference_images_patches_and_restores():
    originals = {
        "edit": pipeline_qwenimage_edit.calculate_dimensions,
        "edit_plus": pipeline_qwenimage_edit_plus.calculate_dimensions,
        "layered": pipeline_qwenimage_layered.calculate_dimensions,
        "VAE_IMAGE_SIZE": pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE,
        "CONDITION_IMAGE_SIZE": pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE,
    }
    with small_reference_images(area=64 * 64):
        assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == 64 * 64
        assert pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE == 64 * 64
        # sqrt(4096 * 4 / 3) = 73.9 -> 64 and 55.4 -> 64 after rounding to multiples of 32.
        assert pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 4 / 3)[:2] == (64, 64)
        assert pipeline_qwenimage_edit_plus.calculate_dimensions(1024 * 1024, 2.0) == (96, 32)
        assert pipeline_qwenimage_layered.calculate_dimensions(640 * 640, 1.0) == (64, 64)
        # Areas below the cap pass through: 32*32 stays 32x32.
        assert pipeline_qwenimage_layered.calculate_dimensions(32 * 32, 1.0) == (32, 32)
        # Nested caps combine: an inner block can lower the cap, not raise it.
        with small_reference_images(area=32 * 32):
            assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == 32 * 32
            assert pipeline_qwenimage_layered.calculate_dimensions(640 * 640, 1.0) == (32, 32)
        with small_reference_images(area=128 * 128):
            assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == 64 * 64
            assert pipeline_qwenimage_layered.calculate_dimensions(640 * 640, 1.0) == (64, 64)
        assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == 64 * 64
        assert pipeline_qwenimage_layered.calculate_dimensions(640 * 640, 1.0) == (64, 64)

    with pytest.raises(RuntimeError, match="boom"), small_reference_images():
        raise RuntimeError("boom")

    assert pipeline_qwenimage_edit.calculate_dimensions is originals["edit"]
    assert pipeline_qwenimage_edit_plus.calculate_dimensions is originals["edit_plus"]
    assert pipeline_qwenimage_layered.calculate_dimensions is originals["layered"]
    assert pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE == originals["VAE_IMAGE_SIZE"] == 1024 * 1024
    assert pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE == originals["CONDITION_IMAGE_SIZE"] == 384 * 384


@pytest.mark.parametrize("area", [0, 1000, 64.0 * 64, True])
def test_small_reference_images_rejects_bad_area(area):
    with pytest.raises(ValueError, match="area"), small_reference_images(area=area):
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        build_tiny_components,
        build_tiny_pipeline,
        tiny_transformer_config,
        tiny_vae_config,
        tiny_pipeline_call_kwargs,
        tiny_from_pretrained_kwargs,
        stock_pipeline_class,
        lambda variant: save_tiny_pipeline(variant, "/nonexistent/never-written"),
    ],
)
def test_unknown_variant_is_named(build):
    with pytest.raises(ValueError, match=r"'qwen_image_turbo'.*'qwen_image_layered'"):
        build("qwen_image_turbo")

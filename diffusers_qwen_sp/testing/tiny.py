"""Tiny random-weight Qwen-Image pipelines, built offline in seconds on CPU.

Every component is the stock class the real checkpoints use (`QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen2Tokenizer`, `Qwen2VLProcessor`, `FlowMatchEulerDiscreteScheduler`), only
shrunk: nothing is downloaded, the tokenizer is a byte-level BPE trained on a built-in corpus, and the weights are
random but seeded. The pipelines are the stock diffusers classes, so a test that runs a tiny pipeline exercises exactly
the code path a real checkpoint takes. The tokenizer, text encoder, VAE and scheduler configs come from the library's
`diffusers_qwen_sp.small_components`, which the shipped scene model is built from too; this module only adds the test
defaults (corpus, sizes, variants) and the test helpers.

Variants (see [`TINY_VARIANTS`]):

| variant                  | pipeline                    | differences from `"qwen_image"`                            |
|--------------------------|-----------------------------|------------------------------------------------------------|
| `"qwen_image"`           | `QwenImagePipeline`         |                                                            |
| `"qwen_image_edit"`      | `QwenImageEditPipeline`     | + `processor`                                              |
| `"qwen_image_edit_plus"` | `QwenImageEditPlusPipeline` | + `processor`                                              |
| `"qwen_image_edit_2511"` | `QwenImageEditPlusPipeline` | + `processor`, transformer `zero_cond_t=True`              |
| `"qwen_image_layered"`   | `QwenImageLayeredPipeline`  | + `processor`, RGBA VAE with 8 latent channels,            |
|                          |                             | transformer `use_additional_t_cond`, `use_layer3d_rope`    |

The edit and layered pipelines size their reference images from hard-coded areas (1024x1024 for the VAE image of
Edit and Edit-Plus, 640x640 or 1024x1024 for Layered), which is far too slow for CPU tests; run them inside
[`small_reference_images`], which lowers those areas for the duration of a `with` block.

Example:

```py
>>> from diffusers_qwen_sp.testing import build_tiny_pipeline, small_reference_images, tiny_pipeline_call_kwargs

>>> pipe = build_tiny_pipeline("qwen_image_edit_plus")
>>> with small_reference_images():
...     image = pipe(**tiny_pipeline_call_kwargs("qwen_image_edit_plus")).images
>>> image.shape
torch.Size([1, 3, 64, 64])
```
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.utils import logging
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_processing_utils import BaseVideoProcessor

from ..small_components import (
    QWEN_SPECIAL_TOKENS,
    VISION_MERGE_SIZE,
    VISION_PATCH_SIZE,
    VISION_TEMPORAL_PATCH_SIZE,
    build_bpe_tokenizer,
    flow_match_scheduler_config,
    small_text_encoder_config,
    small_vae_config,
)
from .reference_images import small_reference_images


logger = logging.get_logger(__name__)

__all__ = [
    "TINY_VARIANTS",
    "TINY_VOCAB_SIZE",
    "QWEN_SPECIAL_TOKENS",
    "build_tiny_components",
    "build_tiny_pipeline",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "save_tiny_pipeline",
    "small_reference_images",
    "sp_pipeline_class",
    "stock_pipeline_class",
    "tiny_from_pretrained_kwargs",
    "tiny_pipeline_call_kwargs",
    "tiny_scheduler_config",
    "tiny_text_encoder_config",
    "tiny_transformer_config",
    "tiny_vae_config",
]

TINY_VARIANTS: tuple[str, ...] = (
    "qwen_image",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "qwen_image_edit_2511",
    "qwen_image_layered",
)

# Byte-level BPE tokens plus the `QWEN_SPECIAL_TOKENS`; also the text encoder's embedding size.
TINY_VOCAB_SIZE = 512

# Deliberately generic text: the pipelines' system prompts are *not* in it, so they stay long after tokenization. The
# pipelines drop the first 34 (text-to-image, layered) or 64 (edit) hidden states as "template"; with this corpus the
# template prefix alone is longer than that, as with the real tokenizer.
_TOKENIZER_CORPUS: tuple[str, ...] = (
    "a red cat sitting on a blue mat in the morning light",
    "a small dog running across a green field under a cloudy sky",
    "an old wooden house beside a quiet lake with tall pine trees",
    "a bowl of fresh fruit on a kitchen table, apples, oranges and grapes",
    "a city street at night with neon signs, wet pavement and reflections",
    "a portrait of a smiling woman wearing a yellow hat and a white dress",
    "a mountain landscape with snow on the peaks and a river in the valley",
    "the text on the sign says open every day from nine to five",
    "two children playing with a ball on the beach near the waves",
    "a vintage car parked in front of a brick building with large windows",
    "make the sky darker and add stars, keep the rest of the picture the same",
    "replace the background with a forest and change the color of the shirt to green",
    "remove the person on the left side and add a bicycle next to the wall",
    "low quality, blurry, distorted, bad anatomy, watermark, jpeg artifacts",
    "a photo of a cup of coffee with latte art on a marble counter",
    "an illustration of a robot reading a book in a library full of shelves",
)

# Condition images are resized to 56x56 .. 112x112 px before the vision tower: 4 to 16 image tokens each.
_PROCESSOR_MIN_PIXELS = 56 * 56
_PROCESSOR_MAX_PIXELS = 112 * 112



@dataclass(frozen=True)
class _VariantSpec:
    pipeline_cls: type[DiffusionPipeline]
    uses_processor: bool
    # 3 for RGB, 4 for the RGBA VAE of Qwen-Image-Layered.
    image_channels: int = 3
    # VAE `z_dim`. The layered pipeline takes any image tensor with `z_dim` channels for ready-made latents, so an RGBA
    # image needs `z_dim != 4` there.
    latent_channels: int = 4
    transformer_flags: dict[str, Any] = field(default_factory=dict)


_VARIANT_SPECS: dict[str, _VariantSpec] = {
    "qwen_image": _VariantSpec(QwenImagePipeline, uses_processor=False),
    "qwen_image_edit": _VariantSpec(QwenImageEditPipeline, uses_processor=True),
    "qwen_image_edit_plus": _VariantSpec(QwenImageEditPlusPipeline, uses_processor=True),
    "qwen_image_edit_2511": _VariantSpec(
        QwenImageEditPlusPipeline, uses_processor=True, transformer_flags={"zero_cond_t": True}
    ),
    "qwen_image_layered": _VariantSpec(
        QwenImageLayeredPipeline,
        uses_processor=True,
        image_channels=4,
        latent_channels=8,
        transformer_flags={"use_additional_t_cond": True, "use_layer3d_rope": True},
    ),
}


def _spec(variant: str) -> _VariantSpec:
    if variant not in _VARIANT_SPECS:
        raise ValueError(f"Unknown tiny variant {variant!r}; pass one of {', '.join(map(repr, TINY_VARIANTS))}.")
    return _VARIANT_SPECS[variant]


def stock_pipeline_class(variant: str) -> type[DiffusionPipeline]:
    r"""
    The stock diffusers pipeline class a variant runs with.

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].

    Returns:
        `type[DiffusionPipeline]`: `QwenImagePipeline`, `QwenImageEditPipeline`, `QwenImageEditPlusPipeline` (for
        `"qwen_image_edit_plus"` and `"qwen_image_edit_2511"`) or `QwenImageLayeredPipeline`.
    """
    return _spec(variant).pipeline_cls


def sp_pipeline_class(variant: str) -> type[DiffusionPipeline]:
    r"""Our pipeline class for a variant: the `diffusers_qwen_sp` subclass of [`stock_pipeline_class`]."""
    from ..pipelines import PIPELINES_BY_STOCK_NAME

    return PIPELINES_BY_STOCK_NAME[stock_pipeline_class(variant).__name__]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor
# --------------------------------------------------------------------------------------------------------------------


def build_tiny_tokenizer(
    corpus: tuple[str, ...] = _TOKENIZER_CORPUS, vocab_size: int = TINY_VOCAB_SIZE
) -> Qwen2Tokenizer:
    r"""
    Build the small deterministic `Qwen2Tokenizer` of the tiny pipelines: [`build_bpe_tokenizer`] with defaults.

    The BPE tokens take the first ids and [`QWEN_SPECIAL_TOKENS`] follow right after; each call returns a new
    tokenizer object, so callers may modify theirs freely.

    Args:
        corpus (`tuple[str, ...]`, *optional*):
            Texts to learn the merges from; defaults to a small built-in corpus of generic captions.
        vocab_size (`int`, defaults to `TINY_VOCAB_SIZE`):
            Total size including the special tokens; the text encoder's embedding size must match.

    Returns:
        `Qwen2Tokenizer`: a tokenizer of at most `vocab_size` tokens with pad and eos token `<|endoftext|>`.
    """
    return build_bpe_tokenizer(corpus, vocab_size)


def build_tiny_processor(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2VLProcessor:
    r"""
    Build the `Qwen2VLProcessor` the edit and layered pipelines feed condition images through.

    The image processor is transformers' PIL backend of `Qwen2VLImageProcessor` (no torchvision needed), limited to
    56x56 .. 112x112 pixels, i.e. 4 to 16 vision tokens per image. `Qwen2VLProcessor` requires a video processor; the
    pipelines never pass videos, so a plain `BaseVideoProcessor` stands in for the torchvision-only
    `Qwen2VLVideoProcessor`.

    Args:
        tokenizer (`Qwen2Tokenizer`, *optional*):
            Defaults to a new [`build_tiny_tokenizer`].

    Returns:
        `Qwen2VLProcessor`
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=_PROCESSOR_MIN_PIXELS,
        max_pixels=_PROCESSOR_MAX_PIXELS,
        patch_size=VISION_PATCH_SIZE,
        temporal_patch_size=VISION_TEMPORAL_PATCH_SIZE,
        merge_size=VISION_MERGE_SIZE,
    )
    video_processor = BaseVideoProcessor(
        size={"shortest_edge": _PROCESSOR_MIN_PIXELS, "longest_edge": _PROCESSOR_MAX_PIXELS},
        patch_size=VISION_PATCH_SIZE,
        temporal_patch_size=VISION_TEMPORAL_PATCH_SIZE,
        merge_size=VISION_MERGE_SIZE,
    )
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)

    # Without torchvision, transformers cannot resolve the expected class of `video_processor` and the constructor's
    # type check raises for any value. Skip only that check, on this instance only, and run the stock `__init__`.
    def check_argument_for_proper_class(argument_name: str, argument: Any) -> type:
        if argument_name == "video_processor":
            return type(argument)
        return Qwen2VLProcessor.check_argument_for_proper_class(processor, argument_name, argument)

    processor.check_argument_for_proper_class = check_argument_for_proper_class
    try:
        Qwen2VLProcessor.__init__(
            processor, image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor
        )
    finally:
        del processor.check_argument_for_proper_class
    return processor


# --------------------------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------------------------


def tiny_transformer_config(variant: str = "qwen_image", **overrides: Any) -> dict[str, Any]:
    r"""
    Config of a tiny `QwenImageTransformer2DModel` for a variant.

    4 heads x 16 dims (inner dim 64), 2 blocks, 2x2 patches of the VAE latents (`in_channels=16, out_channels=4`;
    32 and 8 for `"qwen_image_layered"`, see [`tiny_vae_config`]), text embeddings of 32 dims (the tiny text
    encoder's hidden size) and RoPE axes (8, 4, 4) for (frame, height, width).

    Args:
        variant (`str`, defaults to `"qwen_image"`):
            One of [`TINY_VARIANTS`]. `"qwen_image_edit_2511"` adds `zero_cond_t=True`; `"qwen_image_layered"` adds
            `use_additional_t_cond=True, use_layer3d_rope=True`.
        **overrides:
            Config entries to replace, e.g. `num_layers=3`.

    Returns:
        `dict[str, Any]`: keyword arguments for `QwenImageTransformer2DModel`.
    """
    latent_channels = _spec(variant).latent_channels
    config: dict[str, Any] = {
        "patch_size": 2,
        # 2x2 patches of the VAE latents.
        "in_channels": 4 * latent_channels,
        "out_channels": latent_channels,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 4, 4),
    }
    config.update(_spec(variant).transformer_flags)
    config.update(overrides)
    return config


def tiny_vae_config(variant: str = "qwen_image") -> dict[str, Any]:
    r"""
    Config of a tiny `AutoencoderKLQwenImage` ([`small_vae_config`] with base 24 channels): spatial factor 4 (with the
    transformer's 2x2 patches, pixel sizes must be multiples of 8), RGB with 4 latent channels, or for
    `"qwen_image_layered"` RGBA with 8 latent channels.

    Layered needs `z_dim != 4`: `QwenImageLayeredPipeline.prepare_latents` takes an image tensor whose channel count
    equals `z_dim` for ready-made latents and skips the VAE, which a 4-channel RGBA image would trigger.

    Args:
        variant (`str`, defaults to `"qwen_image"`):
            One of [`TINY_VARIANTS`].

    Returns:
        `dict[str, Any]`: keyword arguments for `AutoencoderKLQwenImage`.
    """
    spec = _spec(variant)
    return small_vae_config(base_dim=24, z_dim=spec.latent_channels, input_channels=spec.image_channels)


# The real Qwen-Image scheduler config, under the name the tests have always used.
tiny_scheduler_config = flow_match_scheduler_config


def tiny_text_encoder_config(
    tokenizer: Qwen2Tokenizer | None = None, hidden_size: int = 32, vocab_size: int = TINY_VOCAB_SIZE
) -> Qwen2_5_VLConfig:
    r"""
    Config of a tiny `Qwen2_5_VLForConditionalGeneration` whose token ids match [`build_tiny_tokenizer`]: the
    [`small_text_encoder_config`] of that tokenizer.

    Args:
        tokenizer (`Qwen2Tokenizer`, *optional*):
            The tokenizer whose special-token ids to use; defaults to a new [`build_tiny_tokenizer`].
        hidden_size (`int`, defaults to `32`):
            Width of the text model (and of the vision tower's output); the heads stay 16 dims wide.
        vocab_size (`int`, defaults to `TINY_VOCAB_SIZE`):
            Embedding rows; the tokenizer's size.

    Returns:
        `Qwen2_5_VLConfig`
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return small_text_encoder_config(tokenizer, vocab_size=vocab_size, hidden_size=hidden_size)


# --------------------------------------------------------------------------------------------------------------------
# Components and pipelines
# --------------------------------------------------------------------------------------------------------------------


def build_tiny_components(
    variant: str, seed: int = 0, transformer_cls: type[torch.nn.Module] | None = None
) -> dict[str, Any]:
    r"""
    Build the constructor arguments of a variant's pipeline, with seeded random weights.

    Each model is initialized right after `torch.manual_seed(seed)` inside `torch.random.fork_rng`, so the same seed
    gives bit-identical weights and the caller's global RNG state is left untouched.

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].
        seed (`int`, defaults to `0`):
            Seed of the random weights.
        transformer_cls (`type`, *optional*):
            Transformer class to instantiate with [`tiny_transformer_config`]; defaults to diffusers'
            `QwenImageTransformer2DModel`. Pass a subclass to test it with the same weights as the stock class.

    Returns:
        `dict[str, Any]`: `transformer`, `vae`, `text_encoder`, `tokenizer`, `scheduler`, plus `processor` for the
        edit and layered variants; all models in eval mode on CPU in float32.
    """
    spec = _spec(variant)
    transformer_cls = transformer_cls if transformer_cls is not None else QwenImageTransformer2DModel
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = transformer_cls(**tiny_transformer_config(variant))
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**tiny_vae_config(variant))
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tokenizer))
    components: dict[str, Any] = {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**tiny_scheduler_config()),
    }
    if spec.uses_processor:
        components["processor"] = build_tiny_processor(tokenizer)
    return components


def build_tiny_pipeline(
    variant: str,
    pipeline_cls: type[DiffusionPipeline] | None = None,
    seed: int = 0,
    transformer_cls: type[torch.nn.Module] | None = None,
) -> DiffusionPipeline:
    r"""
    Build a complete tiny pipeline of a variant (progress bar disabled).

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].
        pipeline_cls (`type[DiffusionPipeline]`, *optional*):
            Defaults to the stock diffusers class, see [`stock_pipeline_class`]. A subclass of it works as long as
            its constructor takes the same components.
        seed (`int`, defaults to `0`):
            Seed of the random weights.
        transformer_cls (`type`, *optional*):
            Transformer class; defaults to diffusers' `QwenImageTransformer2DModel`.

    Returns:
        `DiffusionPipeline`: on CPU, in float32.

    Example:

    ```py
    >>> from diffusers_qwen_sp.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs

    >>> pipe = build_tiny_pipeline("qwen_image")
    >>> pipe(**tiny_pipeline_call_kwargs("qwen_image")).images.shape
    torch.Size([1, 3, 64, 64])
    ```
    """
    pipeline_cls = pipeline_cls if pipeline_cls is not None else _spec(variant).pipeline_cls
    pipe = pipeline_cls(**build_tiny_components(variant, seed=seed, transformer_cls=transformer_cls))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(variant: str, path: str | os.PathLike, seed: int = 0) -> Path:
    r"""
    Save a tiny stock pipeline in the `save_pretrained` layout (`model_index.json` and one folder per component).

    The folder loads back offline with the stock class and the same weights:
    `stock_pipeline_class(variant).from_pretrained(path, **tiny_from_pretrained_kwargs(variant))`. The extra kwargs
    supply the `processor` of the edit and layered variants, which transformers cannot load from disk without
    torchvision (see [`tiny_from_pretrained_kwargs`]).

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].
        path (`str` or `os.PathLike`):
            Target folder; created if missing.
        seed (`int`, defaults to `0`):
            Seed of the random weights.

    Returns:
        `Path`: the folder.
    """
    path = Path(path)
    build_tiny_pipeline(variant, seed=seed).save_pretrained(path)
    return path


def tiny_from_pretrained_kwargs(variant: str) -> dict[str, Any]:
    r"""
    Extra `from_pretrained` arguments to load a folder written by [`save_tiny_pipeline`].

    `Qwen2VLProcessor.from_pretrained` always loads a video processor, and every transformers video processor requires
    torchvision. The processor holds no weights, so the edit and layered variants get a fresh
    [`build_tiny_processor`], identical to the saved one, passed as a component override; that also keeps the PIL
    image backend when torchvision is installed. Text-to-image has no processor and gets no extra arguments.

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].

    Returns:
        `dict[str, Any]`: `{"processor": ...}` or `{}`.

    Example:

    ```py
    >>> from diffusers_qwen_sp.testing import save_tiny_pipeline, stock_pipeline_class, tiny_from_pretrained_kwargs

    >>> path = save_tiny_pipeline("qwen_image_edit", "/tmp/tiny-qwen-image-edit")
    >>> pipe = stock_pipeline_class("qwen_image_edit").from_pretrained(
    ...     path, **tiny_from_pretrained_kwargs("qwen_image_edit")
    ... )
    ```
    """
    return {"processor": build_tiny_processor()} if _spec(variant).uses_processor else {}


# --------------------------------------------------------------------------------------------------------------------
# Call arguments
# --------------------------------------------------------------------------------------------------------------------


def _tiny_image(width: int, height: int, mode: str, seed: int) -> PIL.Image.Image:
    channels = len(mode)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, mode=mode)


def tiny_pipeline_call_kwargs(variant: str, **overrides: Any) -> dict[str, Any]:
    r"""
    Small, fast call arguments for a variant's tiny pipeline.

    Every variant gets a prompt and a negative prompt with `true_cfg_scale=4.0` (so both CFG branches run), 2 steps,
    `output_type="pt"` and a CPU generator seeded with 0. Besides:

    - `"qwen_image"`: `height=width=64`.
    - `"qwen_image_edit"`: one 64x48 (width x height) RGB image, `height=width=64`.
    - `"qwen_image_edit_plus"`, `"qwen_image_edit_2511"`: two RGB images of different sizes (64x48 and 40x64),
      `height=width=64`.
    - `"qwen_image_layered"`: one 64x64 RGBA image, `layers=2`, `resolution=640` (the pipeline only accepts 640 or
      1024; the output size follows it, not `height`/`width`).

    The edit and layered variants also size their reference images from hard-coded areas of up to 1024x1024; call the
    pipeline inside [`small_reference_images`] to keep them at 64x64.

    Args:
        variant (`str`):
            One of [`TINY_VARIANTS`].
        **overrides:
            Entries to add or replace, e.g. `num_inference_steps=3`.

    Returns:
        `dict[str, Any]`: keyword arguments for the pipeline's `__call__`. Build a new one per call: the generator
        advances when used.
    """
    _spec(variant)
    kwargs: dict[str, Any] = {
        "prompt": "a red cat sitting on a blue mat",
        "negative_prompt": "blurry, low quality",
        "true_cfg_scale": 4.0,
        "num_inference_steps": 2,
        "output_type": "pt",
        "generator": torch.Generator("cpu").manual_seed(0),
    }
    if variant == "qwen_image":
        kwargs.update(height=64, width=64)
    elif variant == "qwen_image_edit":
        kwargs.update(image=_tiny_image(64, 48, "RGB", seed=0), height=64, width=64)
    elif variant in ("qwen_image_edit_plus", "qwen_image_edit_2511"):
        images = [_tiny_image(64, 48, "RGB", seed=0), _tiny_image(40, 64, "RGB", seed=1)]
        kwargs.update(image=images, height=64, width=64)
    elif variant == "qwen_image_layered":
        kwargs.update(image=_tiny_image(64, 64, "RGBA", seed=0), layers=2, resolution=640)
    kwargs.update(overrides)
    return kwargs

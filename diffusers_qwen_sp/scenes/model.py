"""The scene model: a small Qwen-Image trained on procedural scenes, shipped with the package.

Every component is the class of the real checkpoints (`Qwen2Tokenizer`, `Qwen2_5_VLForConditionalGeneration`,
`AutoencoderKLQwenImage`, `QwenImageTransformer2DModel`, `FlowMatchEulerDiscreteScheduler`), only small: 64 x 64 RGB
pictures, a VAE with a spatial factor of 4 and 4 latent channels (so 8 x 8 = 64 image tokens), a 6-block transformer
of 4 heads x 32 dims, and a frozen, randomly initialised text encoder of 64 dims. The folder it ships in is the
`save_pretrained` layout of `QwenImagePipeline`, so it loads with stock diffusers as well as with ours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ..small_components import (
    build_bpe_tokenizer,
    flow_match_scheduler_config,
    small_text_encoder_config,
    small_vae_config,
)
from .grammar import scene_prompts


__all__ = [
    "SCENE_DEFAULT_PROMPT",
    "SCENE_DEFAULT_STEPS",
    "SCENE_IMAGE_SIZE",
    "SCENE_MODEL_PATH",
    "SCENE_NEGATIVE_PROMPT",
    "SCENE_TEACACHE_COEFFICIENTS",
    "build_scene_components",
    "generate_scene_image",
    "is_scene_model",
    "load_scene_pipeline",
    "scene_tokenizer",
    "scene_transformer_config",
    "scene_vae_config",
]

# The trained weights, in the `save_pretrained` layout of `QwenImagePipeline`.
SCENE_MODEL_PATH = Path(__file__).parent / "qwen_image_scenes"
SCENE_IMAGE_SIZE = 64
SCENE_LATENT_CHANNELS = 4
SCENE_TEXT_DIM = 64
# Sampling defaults for this model: true CFG (scale 4) with this negative prompt, on which the unconditional branch
# was trained (it is also the CLI's default negative prompt).
SCENE_DEFAULT_STEPS = 20
SCENE_NEGATIVE_PROMPT = " "
# What `generate` and the examples draw when no prompt is given.
SCENE_DEFAULT_PROMPT = "two red circles left of a blue square on a yellow background"
# TeaCache's rescaling polynomial for this model (highest power first), fitted on the shipped weights with
# `python -m diffusers_qwen_sp calibrate-teacache` (12 prompts of the grammar x 20 steps x 2 CFG branches: 456 pairs,
# input rel-L1 0.079 .. 0.218, RMS residual 0.085).
SCENE_TEACACHE_COEFFICIENTS: tuple[float, ...] = (-4437.76, 1742.7, -157.475, -3.73749, 0.677873)
_SCENE_VOCAB_SIZE = 512

# The pipelines' prompt template (`QwenImagePipeline.prompt_template_encode`).
_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def scene_tokenizer() -> Qwen2Tokenizer:
    r"""
    A byte-level BPE `Qwen2Tokenizer` learned from templated prompts of the grammar, so every word of the grammar and
    of the system prompt is one token, as with the real tokenizer: the template prefix is 34 tokens, the number the
    pipeline drops.
    """
    corpus = tuple(_PROMPT_TEMPLATE.format(prompt) for prompt in scene_prompts(400, seed=0))
    return build_bpe_tokenizer(corpus, vocab_size=_SCENE_VOCAB_SIZE)


def scene_transformer_config() -> dict[str, Any]:
    r"""`QwenImageTransformer2DModel` kwargs: 6 blocks, 4 heads x 32 dims, RoPE axes (8, 12, 12), 2x2 patches."""
    return {
        "patch_size": 2,
        "in_channels": 4 * SCENE_LATENT_CHANNELS,
        "out_channels": SCENE_LATENT_CHANNELS,
        "num_layers": 6,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": SCENE_TEXT_DIM,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 12, 12),
    }


def scene_vae_config(
    latents_mean: list[float] | None = None, latents_std: list[float] | None = None
) -> dict[str, Any]:
    r"""
    `AutoencoderKLQwenImage` kwargs: base 16 channels, two spatial downsamplings (factor 4), 4 latent channels.

    Args:
        latents_mean (`list[float]`, *optional*), latents_std (`list[float]`, *optional*):
            Per-channel statistics of the encoded training images; the pipeline scales latents by them before
            decoding, so the transformer sees unit-variance latents. Default 0 and 1 (before training).
    """
    return small_vae_config(
        base_dim=16, z_dim=SCENE_LATENT_CHANNELS, latents_mean=latents_mean, latents_std=latents_std
    )


def build_scene_components(seed: int = 0) -> dict[str, Any]:
    r"""
    Untrained components of the scene model, seeded: the starting point of training (and the text encoder it keeps).

    Returns:
        `dict[str, Any]`: `transformer`, `vae`, `text_encoder`, `tokenizer`, `scheduler` for `QwenImagePipeline`.
    """
    tokenizer = scene_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            small_text_encoder_config(tokenizer, vocab_size=_SCENE_VOCAB_SIZE, hidden_size=SCENE_TEXT_DIM)
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(**scene_vae_config())
        torch.manual_seed(seed + 2)
        transformer = QwenImageTransformer2DModel(**scene_transformer_config())
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**flow_match_scheduler_config()),
    }


def load_scene_pipeline(
    path: str | os.PathLike | None = None,
    pipeline_cls: type[DiffusionPipeline] = QwenImagePipeline,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> DiffusionPipeline:
    r"""
    Load the trained scene model (offline; it ships with the package).

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A folder written by `python -m diffusers_qwen_sp train-scenes`; defaults to [`SCENE_MODEL_PATH`].
        pipeline_cls (`type[DiffusionPipeline]`, defaults to `QwenImagePipeline`):
            Stock `QwenImagePipeline` or our `diffusers_qwen_sp.QwenImageSPPipeline`.
        dtype (`torch.dtype`, defaults to `torch.float32`)
        kwargs: passed to `from_pretrained` (e.g. `text_encoder=None` on a rank that receives prompt embeddings).

    Returns:
        `DiffusionPipeline`: draws 64 x 64 scenes from prompts of the grammar in `diffusers_qwen_sp.scenes.grammar`.

    Example:

    ```py
    >>> from diffusers_qwen_sp.scenes import load_scene_pipeline

    >>> pipe = load_scene_pipeline()
    >>> image = pipe("two red circles left of a blue square on a yellow background", negative_prompt=" ",
    ...              height=64, width=64, num_inference_steps=20).images[0]
    ```
    """
    path = Path(path) if path is not None else SCENE_MODEL_PATH
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no trained scene model (no model_index.json); train one with "
            f"`python -m diffusers_qwen_sp train-scenes --output {path}`."
        )
    return pipeline_cls.from_pretrained(path, dtype=dtype, **kwargs)


def is_scene_model(model: str | os.PathLike | None) -> bool:
    r"""Whether `model` (as given to `--model`) is a scene model: `None` (the shipped one) or a folder written by
    `train-scenes`, which holds its `training.json`."""
    if model is None:
        return True
    return (Path(model) / "training.json").is_file() and (Path(model) / "model_index.json").is_file()


@torch.no_grad()
def generate_scene_image(
    pipe: DiffusionPipeline,
    prompt: str,
    seed: int,
    num_inference_steps: int = SCENE_DEFAULT_STEPS,
    true_cfg_scale: float = 4.0,
) -> np.ndarray:
    r"""
    One scene as `(64, 64, 3)` uint8 RGB: the sampling `generate` uses (true CFG with [`SCENE_NEGATIVE_PROMPT`]),
    with a CPU generator seeded by `seed`.
    """
    output = pipe(
        prompt,
        negative_prompt=SCENE_NEGATIVE_PROMPT,
        true_cfg_scale=true_cfg_scale,
        height=SCENE_IMAGE_SIZE,
        width=SCENE_IMAGE_SIZE,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return np.clip(np.rint(output.images[0] * 255), 0, 255).astype(np.uint8)

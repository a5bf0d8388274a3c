"""Test support for `diffusers_qwen_sp`: tiny random-weight Qwen-Image pipelines built offline (see `tiny`)."""

from .tiny import (
    QWEN_SPECIAL_TOKENS,
    TINY_VARIANTS,
    TINY_VOCAB_SIZE,
    build_tiny_components,
    build_tiny_pipeline,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_pipeline,
    small_reference_images,
    sp_pipeline_class,
    stock_pipeline_class,
    tiny_from_pretrained_kwargs,
    tiny_pipeline_call_kwargs,
    tiny_scheduler_config,
    tiny_text_encoder_config,
    tiny_transformer_config,
    tiny_vae_config,
)


__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "TINY_VARIANTS",
    "TINY_VOCAB_SIZE",
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

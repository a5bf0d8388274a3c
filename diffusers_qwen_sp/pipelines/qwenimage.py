"""Thin subclasses of diffusers' Qwen-Image pipelines that use the staged transformer."""

from __future__ import annotations

from diffusers import (
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
)

from .base import QwenImageSPPipelineMixin


_EXAMPLE = r"""
    Example:

    ```py
    >>> import torch
    >>> from diffusers_qwen_sp import {cls}

    >>> pipe = {cls}.from_pretrained("{repo}", dtype=torch.bfloat16).to("cuda")
    ```
"""


class QwenImageSPPipeline(QwenImageSPPipelineMixin, QwenImagePipeline):
    __doc__ = (
        "Text-to-image Qwen-Image: diffusers' `QwenImagePipeline` with the staged transformer.\n"
        + _EXAMPLE.format(cls="QwenImageSPPipeline", repo="Qwen/Qwen-Image")
    )


class QwenImageEditSPPipeline(QwenImageSPPipelineMixin, QwenImageEditPipeline):
    __doc__ = (
        "Single-image Qwen-Image-Edit: diffusers' `QwenImageEditPipeline` with the staged transformer.\n"
        + _EXAMPLE.format(cls="QwenImageEditSPPipeline", repo="Qwen/Qwen-Image-Edit")
    )


class QwenImageEditPlusSPPipeline(QwenImageSPPipelineMixin, QwenImageEditPlusPipeline):
    __doc__ = (
        "Multi-image Qwen-Image-Edit-Plus (2509, and 2511 with zero_cond_t): diffusers' `QwenImageEditPlusPipeline` "
        "with the staged transformer.\n" + _EXAMPLE.format(cls="QwenImageEditPlusSPPipeline", repo="Qwen/Qwen-Image-Edit-2511")
    )


class QwenImageLayeredSPPipeline(QwenImageSPPipelineMixin, QwenImageLayeredPipeline):
    __doc__ = (
        "Qwen-Image-Layered (RGBA layer decomposition): diffusers' `QwenImageLayeredPipeline` with the staged "
        "transformer.\n" + _EXAMPLE.format(cls="QwenImageLayeredSPPipeline", repo="Qwen/Qwen-Image-Layered")
    )

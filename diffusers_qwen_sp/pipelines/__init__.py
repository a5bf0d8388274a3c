"""Pipelines: thin subclasses of the stock diffusers Qwen-Image pipelines."""

from .base import QwenImageSPPipelineMixin
from .qwenimage import (
    QwenImageEditPlusSPPipeline,
    QwenImageEditSPPipeline,
    QwenImageLayeredSPPipeline,
    QwenImageSPPipeline,
)

# Custom-pipeline names, as accepted by `custom_pipeline_path`, and the class each loads.
PIPELINES_BY_NAME = {
    "qwen_image": QwenImageSPPipeline,
    "qwen_image_edit": QwenImageEditSPPipeline,
    "qwen_image_edit_plus": QwenImageEditPlusSPPipeline,
    "qwen_image_layered": QwenImageLayeredSPPipeline,
}

__all__ = [
    "PIPELINES_BY_NAME",
    "QwenImageEditPlusSPPipeline",
    "QwenImageEditSPPipeline",
    "QwenImageLayeredSPPipeline",
    "QwenImageSPPipeline",
    "QwenImageSPPipelineMixin",
]

"""Pipelines: thin subclasses of the stock diffusers Qwen-Image pipelines."""

from .base import QwenImageSPPipelineMixin, stock_parent
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

# Stock diffusers pipeline class name (model_index.json `_class_name`) -> our pipeline class.
PIPELINES_BY_STOCK_NAME = {stock_parent(cls).__name__: cls for cls in PIPELINES_BY_NAME.values()}

__all__ = [
    "PIPELINES_BY_STOCK_NAME",
    "PIPELINES_BY_NAME",
    "QwenImageEditPlusSPPipeline",
    "QwenImageEditSPPipeline",
    "QwenImageLayeredSPPipeline",
    "QwenImageSPPipeline",
    "QwenImageSPPipelineMixin",
    "stock_parent",
]

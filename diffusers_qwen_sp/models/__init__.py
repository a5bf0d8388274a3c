"""Models: the Qwen-Image transformer with hookable preparation stages."""

from .transformer_qwenimage_sp import (
    DenoisingStep,
    ImageRopePrepare,
    ModulateIndexPrepare,
    QwenImageBlockInputs,
    QwenImageSPTransformer2DModel,
    check_qwen_image_config,
)

__all__ = [
    "DenoisingStep",
    "ImageRopePrepare",
    "ModulateIndexPrepare",
    "QwenImageBlockInputs",
    "QwenImageSPTransformer2DModel",
    "check_qwen_image_config",
]

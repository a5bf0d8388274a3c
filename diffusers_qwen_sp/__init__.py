"""diffusers_qwen_sp: the Qwen-Image family on many GPUs, as an extension of Hugging Face diffusers.

Load a Qwen-Image pipeline as usual, start it with `torchrun` or `accelerate launch`, and get the image one GPU gives,
faster: sequence parallelism (Ulysses, Ring, both), TeaCache and CFG parallel, attached as diffusers hooks on a
transformer whose forward is split into hookable stages.
"""

from .community import custom_pipeline_path
from .hooks import PatchParallelVAEConfig, SequenceParallelConfig, TeaCacheConfig
from .models import QwenImageSPTransformer2DModel
from .pipelines import (
    QwenImageEditPlusSPPipeline,
    QwenImageEditSPPipeline,
    QwenImageLayeredSPPipeline,
    QwenImageSPPipeline,
)


__version__ = "0.1.0"

__all__ = [
    "QwenImageEditPlusSPPipeline",
    "QwenImageEditSPPipeline",
    "QwenImageLayeredSPPipeline",
    "QwenImageSPPipeline",
    "QwenImageSPTransformer2DModel",
    "PatchParallelVAEConfig",
    "SequenceParallelConfig",
    "TeaCacheConfig",
    "custom_pipeline_path",
]

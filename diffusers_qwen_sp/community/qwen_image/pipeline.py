"""diffusers community pipeline: QwenImageSPPipeline from diffusers_qwen_sp (requires `pip install diffusers-qwen-sp`)."""

# diffusers picks the one DiffusionPipeline subclass in this file that does not come from diffusers itself.
from diffusers_qwen_sp.pipelines.qwenimage import QwenImageSPPipeline


__all__ = ["QwenImageSPPipeline"]

"""A small Qwen-Image trained on procedural scenes: real pictures from the offline default, and a model on which
TeaCache's speed/quality trade-off can be measured without a GPU.

- [`grammar`]: the scenes, their prompts, and the checks that judge an image against a prompt.
- [`model`]: the configs of the small model and [`load_scene_pipeline`] for the weights shipped with the package.
- [`train`]: `python -m diffusers_qwen_sp train-scenes`, which reproduces those weights from scratch on CPU.
"""

from . import grammar, model
from .grammar import *  # noqa: F403
from .model import *  # noqa: F403


__all__ = [*grammar.__all__, *model.__all__]

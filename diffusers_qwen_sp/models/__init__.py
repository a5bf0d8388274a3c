"""Models: the Qwen-Image transformer with hookable stages, and the vocabulary of its sequence-parallel plan."""

from . import sp_plan, stages, transformer_qwenimage_sp
from .sp_plan import *  # noqa: F403
from .stages import *  # noqa: F403
from .transformer_qwenimage_sp import *  # noqa: F403


__all__ = [*sp_plan.__all__, *stages.__all__, *transformer_qwenimage_sp.__all__]

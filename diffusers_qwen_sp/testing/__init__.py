"""Test support for `diffusers_qwen_sp`: tiny random-weight Qwen-Image pipelines built offline (see `tiny`)."""

from . import tiny
from .tiny import *  # noqa: F403


__all__ = list(tiny.__all__)

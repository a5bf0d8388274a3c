"""Which arguments of a pipeline call every rank of a replica must pass alike, and how two ranks compare them."""

from __future__ import annotations

import numbers
from typing import Any


# Call arguments every rank must pass alike under SP / CFG parallel: they decide the sequence of collectives (steps,
# sizes, CFG on or off) or what the image shows. Not the generator: rank 0's noise is broadcast to every rank.
SAME_ACROSS_RANKS = (
    "prompt",
    "negative_prompt",
    "true_cfg_scale",
    "guidance_scale",
    "height",
    "width",
    "num_inference_steps",
    "sigmas",
    "num_images_per_prompt",
    "max_sequence_length",
    "image",
    "layers",
    "resolution",
    "cfg_normalize",
    "use_en_prompt",
    "prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
    "latents",
)
# Compared by value even when given as an array or a tensor (the others by shape: their values are broadcast).
COMPARED_BY_VALUE = ("sigmas",)


def describe_argument(value: Any, by_value: bool = False) -> Any:
    r"""
    A small, picklable summary of a pipeline call argument that two ranks can compare: numbers and strings as they
    are, tensors and arrays by shape (by value with `by_value`), images by mode and size, lists item by item.
    """
    if value is None or isinstance(value, (str, bool, numbers.Real)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe_argument(item, by_value) for item in value]
    if isinstance(value, dict):
        return {key: describe_argument(item, by_value) for key, item in value.items()}
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "tolist"):  # a tensor or an array
        return value.tolist() if by_value else f"{type(value).__name__} of shape {tuple(shape)}"
    size, mode = getattr(value, "size", None), getattr(value, "mode", None)
    if isinstance(size, tuple) and isinstance(mode, str):  # a PIL image
        return f"{mode} image of {size[0]}x{size[1]}"
    return type(value).__name__  # never a default repr: it holds a memory address that differs per rank

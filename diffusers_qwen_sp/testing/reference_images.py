"""Smaller reference images for the stock edit and layered pipelines, whose hard-coded sizes are slow on CPU.
**Test-only** (see [`small_reference_images`])."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from diffusers.pipelines.qwenimage import (
    pipeline_qwenimage_edit,
    pipeline_qwenimage_edit_plus,
    pipeline_qwenimage_layered,
)


DEFAULT_REFERENCE_AREA = 64 * 64


def _capped_area(calculate_dimensions: Callable[..., Any], area: int) -> Callable[..., Any]:
    @functools.wraps(calculate_dimensions)
    def capped(target_area: float, ratio: float) -> Any:
        return calculate_dimensions(min(target_area, area), ratio)

    return capped


@contextlib.contextmanager
def small_reference_images(area: int = DEFAULT_REFERENCE_AREA) -> Iterator[None]:
    r"""
    Temporarily shrink the reference-image sizes the stock edit and layered pipelines hard-code. **Test-only.**

    Inside the block:

    - `pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE` (1024x1024) and `CONDITION_IMAGE_SIZE` (384x384) are capped at
      `area`;
    - `calculate_dimensions` in `pipeline_qwenimage_edit`, `pipeline_qwenimage_edit_plus` and
      `pipeline_qwenimage_layered` caps its target area at `area`. That is the 1024x1024 VAE image of Edit, the default
      output size of Edit and Edit-Plus, and the 640x640 / 1024x1024 `resolution` buckets of Layered (which also set
      its output size).

    Sizes still keep each image's aspect ratio and are rounded to multiples of 32, as the pipelines do; areas already
    below the cap are left alone. Nested blocks combine their caps (an inner block can lower the cap, not raise it).
    This patches module globals of diffusers for the whole process, so it is not thread-safe; everything is restored
    on exit, also on error.

    Args:
        area (`int`, defaults to `64 * 64`):
            Largest area in pixels; at least `32 * 32`.

    Example:

    ```py
    >>> from diffusers_qwen_sp.testing import build_tiny_pipeline, small_reference_images, tiny_pipeline_call_kwargs

    >>> pipe = build_tiny_pipeline("qwen_image_layered")
    >>> with small_reference_images():
    ...     layers = pipe(**tiny_pipeline_call_kwargs("qwen_image_layered")).images[0]
    >>> layers.shape  # (layers, RGBA, height, width)
    torch.Size([2, 4, 64, 64])
    ```
    """
    if isinstance(area, bool) or not isinstance(area, int) or area < 32 * 32:
        raise ValueError(
            f"`area` must be an int of at least {32 * 32} (32x32 px, the pipelines round sizes to multiples of 32), "
            f"got {area!r}."
        )
    replacements: list[tuple[Any, str, Any]] = [
        (module, "calculate_dimensions", _capped_area(module.calculate_dimensions, area))
        for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage_layered)
    ]
    for name in ("VAE_IMAGE_SIZE", "CONDITION_IMAGE_SIZE"):
        replacements.append(
            (pipeline_qwenimage_edit_plus, name, min(getattr(pipeline_qwenimage_edit_plus, name), area))
        )
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    try:
        for module, name, value in replacements:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(originals):
            setattr(module, name, value)


__all__ = ["DEFAULT_REFERENCE_AREA", "small_reference_images"]

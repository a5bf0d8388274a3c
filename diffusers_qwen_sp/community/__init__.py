"""Community-pipeline folders for `DiffusionPipeline.from_pretrained(..., custom_pipeline=...)`.

Each sub-folder holds a `pipeline.py` exposing exactly one pipeline class (one of ours) and a README on pushing it to
the Hub. `custom_pipeline_path(name)` returns the folder.
"""

from __future__ import annotations

from pathlib import Path

from ..pipelines import PIPELINES_BY_NAME


def custom_pipeline_path(name: str) -> str:
    r"""
    The local folder to pass as `custom_pipeline` to `DiffusionPipeline.from_pretrained`.

    Args:
        name (`str`): one of `"qwen_image"`, `"qwen_image_edit"`, `"qwen_image_edit_plus"`, `"qwen_image_layered"`.

    Returns:
        `str`: the folder holding `pipeline.py`.

    Example:

    ```py
    >>> from diffusers import DiffusionPipeline
    >>> from diffusers_qwen_sp import custom_pipeline_path

    >>> pipe = DiffusionPipeline.from_pretrained(
    ...     "Qwen/Qwen-Image", custom_pipeline=custom_pipeline_path("qwen_image"), trust_remote_code=True
    ... )
    ```

    diffusers imports every local `pipeline.py` under the same module name, so load one custom-pipeline folder per
    process (or import the classes from `diffusers_qwen_sp` directly).
    """
    if name not in PIPELINES_BY_NAME:
        raise ValueError(
            f"Unknown custom pipeline name {name!r}. Choose one of {sorted(PIPELINES_BY_NAME)}, e.g. "
            "custom_pipeline_path('qwen_image')."
        )
    folder = Path(__file__).resolve().parent / name
    if not (folder / "pipeline.py").is_file():
        raise RuntimeError(f"{folder / 'pipeline.py'} is missing: the diffusers_qwen_sp installation is incomplete.")
    return str(folder)

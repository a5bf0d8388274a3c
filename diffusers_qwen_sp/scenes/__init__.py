"""A small Qwen-Image trained on procedural scenes: real pictures from the offline default, and a model on which
TeaCache's speed/quality trade-off can be measured without a GPU.

- [`grammar`]: the scenes, their prompts, and the checks that judge an image against a prompt.
- [`model`]: the configs of the small model and [`load_scene_pipeline`] for the weights shipped with the package.
- [`train`]: `python -m diffusers_qwen_sp train-scenes`, which reproduces those weights from scratch on CPU.
- [`teacache_curve`]: `python -m diffusers_qwen_sp bench-teacache`, TeaCache's speed/quality curve on the model.
"""

from .grammar import (
    BACKGROUND_COLOURS,
    COLOURS,
    RELATIONS,
    SHAPE_COLOURS,
    SHAPES,
    Scene,
    SceneCheck,
    ShapeGroup,
    check_image,
    parse_prompt,
    render_scene,
    sample_scene,
    scene_prompts,
    shape_centres,
)
from .model import (
    SCENE_DEFAULT_PROMPT,
    SCENE_DEFAULT_STEPS,
    SCENE_IMAGE_SIZE,
    SCENE_MODEL_PATH,
    SCENE_NEGATIVE_PROMPT,
    SCENE_TEACACHE_COEFFICIENTS,
    build_scene_components,
    generate_scene_image,
    is_scene_model,
    load_scene_pipeline,
    scene_tokenizer,
)


__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "RELATIONS",
    "SCENE_DEFAULT_PROMPT",
    "SCENE_DEFAULT_STEPS",
    "SCENE_IMAGE_SIZE",
    "SCENE_MODEL_PATH",
    "SCENE_NEGATIVE_PROMPT",
    "SCENE_TEACACHE_COEFFICIENTS",
    "SHAPES",
    "SHAPE_COLOURS",
    "Scene",
    "SceneCheck",
    "ShapeGroup",
    "build_scene_components",
    "check_image",
    "generate_scene_image",
    "is_scene_model",
    "load_scene_pipeline",
    "parse_prompt",
    "render_scene",
    "sample_scene",
    "scene_prompts",
    "scene_tokenizer",
    "shape_centres",
]

"""The served pipeline: what it accepts ([`ServedModel`]) and how a batch of [`WorkItem`]s becomes one call of it.

A batch is one pipeline call with one CPU generator per image, seeded with that image's seed: the initial noise of
every image is what `generate --seed <seed>` draws for it alone, whatever else runs in the batch. Before the call the
batch's LoRA adapters are switched on (every rank alike: the work items are broadcast), or all of them off.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..pipelines.base import stock_parent
from .config import ServeConfig
from .protocol import ModelLimits, WorkItem


# The family name each stock pipeline is also served as (clients write model="qwen-image").
FAMILY_NAMES = {
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
    "QwenImageEditPlusPipeline": "qwen-image-edit-plus",
}
SCENE_MODEL_NAME = "qwen-image-scenes"


@dataclass(frozen=True)
class ServedModel:
    r"""
    A loaded pipeline ready to serve, and what requests to it may ask for.

    Args:
        pipe: one of our pipelines (SP, CFG parallel and TeaCache already enabled as configured), on this rank's
            device, progress bar off.
        limits ([`ModelLimits`]): names, kind, defaults and limits checked on every request.
        teacache (`bool`): whether TeaCache is on (the skipped transformer calls are then counted).
        description (`str`): one line for logs and `/v1/models`, e.g. `"Qwen/Qwen-Image (QwenImageSPPipeline)"`.
    """

    pipe: Any
    limits: ModelLimits
    teacache: bool
    description: str

    def __repr__(self) -> str:
        return f"ServedModel({self.description}, names={self.limits.names}, teacache={self.teacache})"


def describe_served_model(
    pipe: Any, config: ServeConfig, default_size: int, default_steps: int, scene: bool = False
) -> ServedModel:
    r"""
    Wrap a loaded pipeline as a [`ServedModel`]: its served names (`config.served_model_names`, or the checkpoint's
    name and the family's), whether it edits images, and the request limits of `config`.

    Raises:
        `ValueError`: for a pipeline kind the service does not serve (Qwen-Image-Layered returns layers, which the
            OpenAI Images API has no place for).
    """
    stock = stock_parent(type(pipe)).__name__
    if stock not in FAMILY_NAMES:
        raise ValueError(
            f"serve does not serve {stock} pipelines yet (it serves {', '.join(sorted(FAMILY_NAMES))}); run "
            "`python -m diffusers_qwen_sp generate` for it."
        )
    if config.served_model_names:
        names = tuple(config.served_model_names)
    else:
        own = SCENE_MODEL_NAME if config.model is None else Path(config.model.rstrip("/")).name.lower()
        names = tuple(dict.fromkeys((own, FAMILY_NAMES[stock])))
    limits = ModelLimits(
        names=names,
        edits="Edit" in stock,
        default_size=default_size,
        default_steps=default_steps,
        size_multiple=pipe.vae_scale_factor * 2,
        max_image_pixels=config.max_image_pixels,
        max_steps=config.max_steps,
        max_n=config.max_n,
        max_input_images=config.max_input_images,
        adapters=tuple(name for name, _ in config.loras),
    )
    source = "the scene model" if scene and config.model is None else config.model
    return ServedModel(pipe, limits, config.teacache is not None, f"{source} ({type(pipe).__name__})")


def pipeline_call(items: list[WorkItem]) -> dict[str, Any]:
    r"""
    The keyword arguments of the one pipeline call that runs `items` (all with the same [`WorkItem.key`]): every image
    gets its own prompt entry and its own CPU generator, so a batch draws the noise the requests would draw alone.
    """
    first = items[0]
    if any(item.key != first.key for item in items):
        raise ValueError(f"A batch mixes requests of different keys: {sorted({str(item.key) for item in items})}.")
    generators = [torch.Generator(device="cpu").manual_seed(seed) for item in items for seed in item.seeds]
    call: dict[str, Any] = dict(
        true_cfg_scale=first.true_cfg_scale,
        num_inference_steps=first.num_inference_steps,
        height=first.height,
        width=first.width,
        generator=generators,
        output_type="pil",
    )
    if first.kind == "edit":
        images = [PIL.Image.open(io.BytesIO(data)).convert("RGB") for data in first.images]
        call.update(
            prompt=first.prompt,
            negative_prompt=first.negative_prompt,
            image=images if len(images) > 1 else images[0],  # as `generate --image` passes them
            num_images_per_prompt=first.n,
        )
        return call
    prompts = [item.prompt for item in items for _ in item.seeds]
    negative = None if first.negative_prompt is None else [first.negative_prompt] * len(prompts)
    call.update(prompt=prompts, negative_prompt=negative)
    return call


def load_adapters(pipe: Any, loras: tuple[tuple[str, str], ...]) -> None:
    r"""
    Load the LoRA adapters `(name, source)` into `pipe` and leave them all off (a request names the ones it wants).
    A source is a local file or folder or a Hub repo id, optionally `REPO_ID::WEIGHT_NAME`. Call it before sequence
    parallelism with sharded weights (FSDP2 needs the adapters' layers in place before it shards).

    Raises:
        `ValueError`: naming the adapter and the source that failed to load, with diffusers' reason.
    """
    for name, source in loras:
        location, _, weight_name = source.partition("::")
        kwargs = {"weight_name": weight_name} if weight_name else {}
        try:
            pipe.load_lora_weights(location, adapter_name=name, **kwargs)
        except Exception as error:  # noqa: BLE001 - diffusers and the Hub raise many types; the cause is chained
            raise ValueError(
                f"--lora {name}={source}: could not load the adapter ({type(error).__name__}: {error}). Give a local "
                "LoRA file or folder, or a Hub repo id (REPO_ID::WEIGHT_NAME to pick a file)."
            ) from error
    if loras:
        pipe.disable_lora()


def activate_adapters(served: ServedModel, adapters: tuple[tuple[str, float], ...]) -> None:
    r"""
    Switch the pipeline to the LoRA `adapters` (`(name, scale)` pairs) of the next batch, or to the base weights
    when empty. A no-op when the service loaded no adapter. diffusers' `set_adapters` under SP, CFG parallel and
    TeaCache gives the single-process result (tests/test_lora.py), so a switch between batches is safe.
    """
    if not served.limits.adapters:
        return
    if not adapters:
        served.pipe.disable_lora()
        return
    served.pipe.enable_lora()
    served.pipe.set_adapters([name for name, _ in adapters], [scale for _, scale in adapters])


def run_batch(
    served: ServedModel, items: list[WorkItem], on_step: Callable[..., dict] | None = None
) -> list[list[Any]]:
    r"""
    Run `items` (one batch, equal keys) with their LoRA adapters as one pipeline call; the images, one list per
    request. `on_step` becomes the pipeline's `callback_on_step_end` (the engine's heartbeat and abort check).
    """
    activate_adapters(served, items[0].adapters)
    call = pipeline_call(items)
    if on_step is not None:
        call["callback_on_step_end"] = on_step
    return split_images(items, list(served.pipe(**call).images))


def split_images(items: list[WorkItem], images: list[Any]) -> list[list[Any]]:
    r"""The pipeline's output images, in call order, split back into one list per request."""
    expected = sum(item.n for item in items)
    if len(images) != expected:
        raise RuntimeError(f"The pipeline returned {len(images)} images for a batch of {expected}.")
    out, start = [], 0
    for item in items:
        out.append(list(images[start : start + item.n]))
        start += item.n
    return out


def uses_true_cfg(item: WorkItem) -> bool:
    """The stock pipelines' rule: true CFG runs with `true_cfg_scale > 1` and a negative prompt."""
    return item.true_cfg_scale > 1 and item.negative_prompt is not None


def transformer_calls(served: ServedModel, items: list[WorkItem]) -> tuple[int, int]:
    r"""
    `(computed, skipped)` transformer forwards of the call that just ran `items`. With TeaCache they come from
    `pipe.teacache_stats()`, a collective under CFG parallel: every rank must call this after every successful batch.
    """
    if served.teacache:
        stats = served.pipe.teacache_stats()
        computed = sum(len(branch.get("computed", ())) for branch in stats.values())
        skipped = sum(len(branch.get("skipped", ())) for branch in stats.values())
        return computed, skipped
    first = items[0]
    return first.num_inference_steps * (2 if uses_true_cfg(first) else 1), 0


__all__ = [
    "FAMILY_NAMES",
    "SCENE_MODEL_NAME",
    "ServedModel",
    "activate_adapters",
    "load_adapters",
    "describe_served_model",
    "pipeline_call",
    "run_batch",
    "split_images",
    "transformer_calls",
    "uses_true_cfg",
]

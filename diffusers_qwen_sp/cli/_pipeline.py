"""Loading a pipeline on this rank's device and building the call arguments, for the commands that run one."""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

import torch

from ..scenes.model import SCENE_DEFAULT_STEPS, SCENE_IMAGE_SIZE
from ..text_encoder_placement import loads_text_encoder
from ..threads import ThreadChoice, apply_cpu_threads, choose_cpu_threads


class Prepared(NamedTuple):
    """What [`prepare`] loads and decides for a command that runs one pipeline call."""

    pipe: Any
    call: dict[str, Any]
    steps: int
    scene: bool
    """Whether the model is a scene model (see [`load_pipeline`])."""
    threads: ThreadChoice | None
    """The intra-op threads of a CPU run (None on GPU)."""


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    default = "cpu"
    if torch.cuda.is_available():  # one GPU per local rank under torchrun / accelerate launch
        default = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(args.device or default)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_pipeline(model: str | None, dtype: torch.dtype, text_encoder: bool = True) -> tuple[Any, bool]:
    r"""Load `model` into our pipeline class for its kind; `None` loads the shipped scene model. Returns
    `(pipe, scene)`, `scene` telling whether it is a scene model (the shipped one or one `train-scenes` wrote), which
    gets the scene model's sizes, steps and TeaCache coefficients. `text_encoder=False` never loads the text encoder
    (a rank that receives its prompt embeddings)."""
    from diffusers import DiffusionPipeline

    from ..pipelines import PIPELINES_BY_NAME, PIPELINES_BY_STOCK_NAME
    from ..scenes import is_scene_model

    without = {} if text_encoder else {"text_encoder": None}
    if model is None:
        from ..scenes import load_scene_pipeline

        return load_scene_pipeline(pipeline_cls=PIPELINES_BY_NAME["qwen_image"], dtype=dtype, **without), True
    config = DiffusionPipeline.load_config(model)
    stock_class = config.get("_class_name")
    pipeline_cls = PIPELINES_BY_STOCK_NAME.get(stock_class)
    if pipeline_cls is None:
        raise ValueError(
            f"{model} holds a {stock_class} pipeline; diffusers_qwen_sp runs {sorted(PIPELINES_BY_STOCK_NAME)}. "
            "Pass a Qwen-Image, Qwen-Image-Edit(-Plus) or Qwen-Image-Layered checkpoint."
        )
    return pipeline_cls.from_pretrained(model, dtype=dtype, **without), is_scene_model(model)


def check_image_size(height: int, width: int, multiple: int) -> None:
    r"""Raise a `ValueError` naming the size and the nearest valid ones unless both are multiples of `multiple`."""
    for label, value in (("height", height), ("width", width)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{label}={value} is not a multiple of {multiple} (the VAE's scale factor times the patch size); "
                f"use {lower} or {lower + multiple}."
            )


def _image_tokens(pipe: Any, call: dict[str, Any]) -> int:
    """Image tokens per sample of the call's target (2x2 patches of latent pixels); references come on top."""
    per_side = pipe.vae_scale_factor * 2
    return (call.get("height", 1024) // per_side) * (call.get("width", 1024) // per_side)


def prepare(args: argparse.Namespace, sp_config: Any = None) -> Prepared:
    r"""Load the pipeline on this rank's device, build the call arguments shared by the commands and, on CPU, set the
    intra-op threads by the size of the work (see `diffusers_qwen_sp.threads`)."""
    from PIL import Image

    device, dtype = device_and_dtype(args)
    # Under a launcher a rank that will only receive the prompt embeddings never reads the text encoder's weights.
    loads_encoder = sp_config is None or loads_text_encoder(
        sp_config.text_encoder, int(os.environ.get("RANK", "0")), sp_config.replica_size
    )
    pipe, scene = load_pipeline(args.model, dtype, text_encoder=loads_encoder)
    if sp_config is not None:
        from ..distributed import init_distributed

        # A CPU run on a GPU host needs gloo: NCCL cannot move CPU tensors.
        init_distributed(timeout=sp_config.timeout, backend="gloo" if device.type == "cpu" else None)
        pipe.enable_sequence_parallel(sp_config)  # before .to(device): it selects this rank's GPU
    pipe.to(device)
    kind = type(pipe).__name__
    layered = "Layered" in kind
    steps = args.steps or (SCENE_DEFAULT_STEPS if scene else args.default_steps)
    call: dict[str, Any] = dict(
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        num_inference_steps=steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.image:
        images = [Image.open(path).convert("RGBA" if layered else "RGB") for path in args.image]
        call["image"] = images if len(images) > 1 else images[0]
    elif "Edit" in kind or layered:
        raise ValueError(f"{kind} edits an input image: pass one with --image PATH.")
    if not layered:  # Layered sizes its output from the input image
        height = args.height or (SCENE_IMAGE_SIZE if scene else args.default_size)
        width = args.width or (SCENE_IMAGE_SIZE if scene else args.default_size)
        check_image_size(height, width, pipe.vae_scale_factor * 2)
        call.update(height=height, width=width)
    threads = None
    if device.type == "cpu":
        config = pipe.transformer.config
        threads = apply_cpu_threads(
            choose_cpu_threads(
                image_tokens=_image_tokens(pipe, call),
                width=config.num_attention_heads * config.attention_head_dim,
                requested=args.threads,
                processes_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            )
        )
    return Prepared(pipe, call, steps, scene, threads)

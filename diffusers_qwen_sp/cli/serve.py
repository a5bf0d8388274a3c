"""`diffusers-qwen-sp serve`: the Qwen-Image family as an image service with an OpenAI-compatible API."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import SimpleNamespace
from typing import Any

from diffusers.utils import logging

from ..scenes.model import SCENE_DEFAULT_STEPS, SCENE_IMAGE_SIZE, SCENE_TEACACHE_COEFFICIENTS
from ._common import add_parallel_arguments, positive_int, sequence_parallel_config, threshold
from ._pipeline import device_and_dtype, load_pipeline


logger = logging.get_logger("diffusers_qwen_sp")

API_KEY_ENV = "DIFFUSERS_QWEN_SP_API_KEY"
# What a real checkpoint gets when a request names no size or steps (as `generate`).
DEFAULT_SIZE = 1328
DEFAULT_STEPS = 50


def register(subparsers: Any) -> None:
    from ..serve.config import DEFAULT_MAX_IMAGE_PIXELS

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP with an OpenAI-compatible Images API",
        description="Serve a Qwen-Image pipeline over HTTP (POST /v1/images/generations, /v1/images/edits; GET "
        "/v1/models, /health, /metrics), compatible with OpenAI clients. Under torchrun every process joins: rank 0 "
        "listens, and the world (dp x cfg x ring x ulysses processes) forms --dp-degree replicas, each running a batch "
        "at a time with sequence parallelism over its own ranks; each batch goes to a free replica. SIGTERM drains "
        "(every replica finishes its batch, new requests get 503) and exits 0.",
    )
    parser.add_argument("--model", default=None, help="Hub id or local folder of a Qwen-Image or Qwen-Image-Edit "
                        "pipeline; default: the scene model shipped with the package")
    parser.add_argument("--served-model-name", action="append", default=None, dest="served_model_names",
                        help="a name clients may pass as `model` (repeat for several; default: the checkpoint's name "
                        "and the family's, e.g. qwen-image)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for "
                        "every interface: set an API key then)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/ (default: the "
                        f"{API_KEY_ENV} environment variable, else no key)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: this rank's GPU when CUDA is available, else cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU intra-op threads per process")
    parser.add_argument("--lora", action="append", type=lora_argument, default=None, dest="loras",
                        metavar="NAME=SOURCE", help="load a LoRA adapter that requests pick by name in `lora` (repeat "
                        "for several); SOURCE: a local file or folder, or a Hub repo id (REPO_ID::WEIGHT_NAME)")
    parser.add_argument("--teacache", type=threshold, default=None, metavar="THRESHOLD",
                        help="enable TeaCache with this threshold (0.2 is a good start)")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch-size", type=positive_int, default=None,
                        help="most images per pipeline call (default: 4; 1 with --teacache, whose skips are decided "
                        "over the whole batch)")
    limits.add_argument("--batch-wait-ms", type=float, default=50.0,
                        help="how long a batch waits for compatible requests (default: 50)")
    limits.add_argument("--max-queue", type=positive_int, default=64,
                        help="requests that may wait; more get 429 with Retry-After (default: 64)")
    limits.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest width x height of an output or input image "
                        f"(default: {DEFAULT_MAX_IMAGE_PIXELS})")
    limits.add_argument("--max-steps", type=positive_int, default=100,
                        help="largest num_inference_steps (default: 100)")
    limits.add_argument("--max-n", type=positive_int, default=4, help="largest n, images per request (default: 4)")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    add_parallel_arguments(parser)
    parser.add_argument("--dp-degree", type=positive_int, default=1,
                        help="data-parallel replicas: the world must equal dp x cfg x ring x ulysses (default: 1; "
                        "with only --dp-degree given, each replica runs Ulysses over its world/dp processes, e.g. "
                        "`torchrun --nproc-per-node 2 ... serve --dp-degree 2`: two single-process replicas)")
    parser.set_defaults(func=run)


def lora_argument(value: str) -> tuple[str, str]:
    """`--lora NAME=SOURCE` -> `(name, source)`; argparse reports a malformed value with the expected form."""
    name, separator, source = value.partition("=")
    if not separator or not name.strip() or not source.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE (e.g. ghibli=./ghibli_lora.safetensors), got {value!r}")
    return name.strip(), source.strip()


def config_from_args(args: argparse.Namespace) -> Any:
    r"""The [`~diffusers_qwen_sp.serve.ServeConfig`] the flags ask for (`ValueError` naming a bad one)."""
    from ..serve import ServeConfig

    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}.")
    return ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        served_model_names=tuple(args.served_model_names) if args.served_model_names else None,
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        cfg_parallel=args.cfg_parallel,
        dp_degree=args.dp_degree,
        attention_backend=args.attention_backend,
        shard_weights=args.shard_weights or False,
        text_encoder=args.text_encoder.replace("-", "_"),
        parallel_vae=args.parallel_vae,
        timeout=args.timeout,
        teacache=args.teacache,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        max_image_pixels=args.max_image_pixels,
        max_steps=args.max_steps,
        max_n=args.max_n,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        loras=tuple(args.loras or ()),
    )


def load_for_serving(config: Any) -> Any:
    r"""
    Load `config.model` on this rank as `generate` does (device, dtype, sequence / CFG parallelism, TeaCache, CPU
    threads) and describe it as a [`~diffusers_qwen_sp.serve.ServedModel`].
    """
    from ..serve import describe_served_model
    from ..serve.model import load_adapters
    from ..text_encoder_placement import loads_text_encoder
    from ..threads import apply_cpu_threads, choose_cpu_threads

    device, dtype = device_and_dtype(SimpleNamespace(device=config.device, dtype=config.dtype))
    sp_config = _parallel_config(config)
    # A rank that only receives the prompt embeddings never reads the text encoder's weights.
    loads_encoder = sp_config is None or loads_text_encoder(
        sp_config.text_encoder, int(os.environ.get("RANK", "0")), sp_config.replica_size
    )
    pipe, scene = load_pipeline(config.model, dtype, text_encoder=loads_encoder)
    load_adapters(pipe, config.loras)  # before sequence parallelism: sharded weights need the LoRA layers in place
    if sp_config is not None:
        from ..distributed import init_distributed

        init_distributed(timeout=sp_config.timeout, backend="gloo" if device.type == "cpu" else None)
        pipe.enable_sequence_parallel(sp_config)  # before .to(device): it selects this rank's GPU
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if config.teacache is not None:
        coefficients = list(SCENE_TEACACHE_COEFFICIENTS) if scene else None
        pipe.enable_teacache(threshold=config.teacache, coefficients=coefficients)
    default_size = SCENE_IMAGE_SIZE if scene else DEFAULT_SIZE
    if device.type == "cpu":
        width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        per_side = pipe.vae_scale_factor * 2
        apply_cpu_threads(choose_cpu_threads(
            image_tokens=(default_size // per_side) ** 2, width=width, requested=config.threads,
            processes_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        ))
    steps = SCENE_DEFAULT_STEPS if scene else DEFAULT_STEPS
    return describe_served_model(pipe, config, default_size, steps, scene=scene)


def _parallel_config(config: Any) -> Any:
    """The SequenceParallelConfig of `config` on this launch, or `None` (`ValueError` when the world does not fit)."""
    return sequence_parallel_config(SimpleNamespace(
        ulysses_degree=config.ulysses_degree, ring_degree=config.ring_degree, cfg_parallel=config.cfg_parallel,
        dp_degree=config.dp_degree, attention_backend=config.attention_backend, timeout=config.timeout,
        shard_weights=config.shard_weights, text_encoder=config.text_encoder, parallel_vae=config.parallel_vae,
    ))


def run(args: argparse.Namespace) -> None:
    r"""Run the `serve` command until SIGTERM / SIGINT drained it; exit 1 when a rank failed."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"serve needs {' and '.join(missing)}: pip install 'diffusers-qwen-sp[serve]'.")
    from ..serve import FatalServeError, run_service

    config = config_from_args(args)
    _parallel_config(config)  # a world that does not fit the degrees fails here, on every rank, before listening
    rank = int(os.environ.get("RANK", "0"))

    def listening(url: str) -> None:
        print(f"Listening on {url} (loading the model; GET {url}/health answers 200 once ready)", flush=True)

    def ready(served: Any) -> None:
        names = ", ".join(served.limits.names)
        print(f"Ready: serving {served.description} as {names}", flush=True)

    try:
        run_service(config, load_for_serving, on_listening=listening, on_ready=ready)
    except FatalServeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if rank == 0:
        print("Drained and stopped.", flush=True)

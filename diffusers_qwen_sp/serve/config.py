"""[`ServeConfig`]: what `python -m diffusers_qwen_sp serve` serves, where, and its limits, validated on creation."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, fields

from ..text_encoder_placement import TEXT_ENCODER_PLACEMENTS


# Flags a user sets on the command line; defaults chosen for a real Qwen-Image checkpoint on GPUs.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Edit requests: how many input images one request may carry (Edit-Plus takes several references).
DEFAULT_MAX_INPUT_IMAGES = 4


@dataclass(frozen=True)
class ServeConfig:
    r"""
    Configuration of the image service ([`~diffusers_qwen_sp.serve.run_service`]).

    Args:
        model (`str`, *optional*): Hub id or local folder of a Qwen-Image pipeline; `None` serves the scene model that
            ships with the package.
        host (`str`, defaults to `"127.0.0.1"`): address to listen on. `"0.0.0.0"` (or `"::"`) listens on every
            interface; without an API key that logs a warning.
        port (`int`, defaults to `8000`): TCP port; `0` lets the OS pick a free one (the URL is reported when
            listening).
        api_key (`str`, *optional*): when set, every `/v1/...` request needs `Authorization: Bearer <api_key>`.
        served_model_names (`tuple[str, ...]`, *optional*): the names clients may pass as `model`; default: the
            checkpoint's own name (`qwen-image` for `Qwen/Qwen-Image`) and the family's (`qwen-image`,
            `qwen-image-edit`, ...).
        ulysses_degree, ring_degree (`int`, *optional*): sequence-parallel degrees of each replica (as `generate`).
        cfg_parallel (`bool`, defaults to `False`): run the two true-CFG branches on two halves of each replica.
        dp_degree (`int`, defaults to `1`): data-parallel replicas (world = dp x cfg x ring x ulysses): each
            replica is an independent copy of the model with its own SP group, and each batch goes to a free one.
        attention_backend (`str`, defaults to `"auto"`): the per-block attention kernel (see `generate --help`).
        shard_weights (`bool` or `str`, defaults to `False`): shard the transformer blocks' weights (FSDP2) over the
            ranks of each replica (`True`, `"world"`) or each SP group (`"sp"`); see `SequenceParallelConfig`.
        text_encoder (`str`, defaults to `"one_rank"`): where the text encoder lives under parallelism: `"one_rank"`
            (each replica's first rank; the others never load it), `"replicated"` or `"sharded"`; see
            `SequenceParallelConfig`.
        parallel_vae (`bool`, defaults to `True`): decode in slabs over each replica's ranks (exact to fp32
            rounding); see `SequenceParallelConfig`.
        timeout (`float`, defaults to `600.0`): collective timeout in seconds: a dead or stuck rank ends the service
            after at most this long.
        teacache (`float`, *optional*): TeaCache threshold; `None` computes every step.
        max_batch_size (`int`, *optional*): most images one pipeline call runs. Default: 4, or 1 with TeaCache,
            whose skip decision is taken over the whole batch (with batching, an image would depend on its
            batch-mates).
        batch_wait_ms (`float`, defaults to `50.0`): how long a batch waits for compatible requests once the first
            one is taken.
        max_queue (`int`, defaults to `64`): requests waiting to run; beyond it requests get 429 with `Retry-After`.
        max_image_pixels (`int`, defaults to `2048 * 2048`): largest `width * height` of an output or input image.
        max_steps (`int`, defaults to `100`): largest `num_inference_steps` a request may ask for.
        max_n (`int`, defaults to `4`): largest `n` (images per request).
        max_body_bytes (`int`, defaults to 32 MiB): larger request bodies get 413.
        max_input_images (`int`, defaults to `4`): most input images of one edit request.
        dtype (`str`, defaults to `"auto"`): `"auto"` (bfloat16 on CUDA, float32 on CPU), `"float32"`, `"bfloat16"`
            or `"float16"`.
        device (`str`, *optional*): default: this rank's GPU when CUDA is available, else `"cpu"`.
        threads (`int`, *optional*): CPU intra-op threads per process (default: chosen by the size of the work).
        loras (`tuple[tuple[str, str], ...]`, defaults to `()`): LoRA adapters loaded at start as `(name, source)`;
            a source is a local file or folder, or a Hub repo id, optionally `REPO_ID::WEIGHT_NAME`. Requests pick
            them by name in `lora`; a request without one runs the base weights.
        broken_grace_s (`float`, defaults to `1.0`): after a rank failed, how long rank 0 keeps answering 503 (so
            in-flight requests and health checks see why) before it exits.
    """

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    served_model_names: tuple[str, ...] | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    cfg_parallel: bool = False
    dp_degree: int = 1
    attention_backend: str = "auto"
    shard_weights: bool | str = False
    text_encoder: str = "one_rank"
    parallel_vae: bool = True
    timeout: float = 600.0
    teacache: float | None = None
    max_batch_size: int | None = None
    batch_wait_ms: float = 50.0
    max_queue: int = 64
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_steps: int = 100
    max_n: int = 4
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_input_images: int = DEFAULT_MAX_INPUT_IMAGES
    dtype: str = "auto"
    device: str | None = None
    threads: int | None = None
    loras: tuple[tuple[str, str], ...] = ()
    broken_grace_s: float = 1.0

    def __post_init__(self) -> None:
        positive = ("max_queue", "max_image_pixels", "max_steps", "max_n", "max_body_bytes", "max_input_images",
                    "dp_degree")
        optional_positive = ("ulysses_degree", "ring_degree", "max_batch_size", "threads")
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive integer, got {value!r}.")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(
                f"ServeConfig.port must be an integer in [0, 65535] (0: any free port), got {self.port!r}."
            )
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"ServeConfig.host must be a host name or address such as 127.0.0.1, got {self.host!r}.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("ServeConfig.api_key must be a non-empty string or None (no key).")
        for name in ("timeout", "batch_wait_ms", "broken_grace_s"):
            value = getattr(self, name)
            low_ok = value >= 0 if name != "timeout" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low_ok:
                bound = "positive" if name == "timeout" else ">= 0"
                raise ValueError(f"ServeConfig.{name} must be a finite number {bound} (seconds or ms), got {value!r}.")
        if self.teacache is not None and (
            isinstance(self.teacache, bool) or not isinstance(self.teacache, (int, float)) or not self.teacache >= 0
        ):
            raise ValueError(
                f"ServeConfig.teacache must be a threshold >= 0 (e.g. 0.2) or None, got {self.teacache!r}."
            )
        if not isinstance(self.loras, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(part, str) and part.strip() for part in pair)
            and pair[0] != "none"
            for pair in self.loras
        ):
            raise ValueError(
                "ServeConfig.loras must be a tuple of (name, source) pairs of non-empty strings (name not 'none'), "
                f"got {self.loras!r}; on the command line: --lora NAME=SOURCE."
            )
        names = [name for name, _ in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"ServeConfig.loras names an adapter twice: {names}; give each --lora its own NAME.")
        if self.text_encoder not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(
                f"ServeConfig.text_encoder must be one of {TEXT_ENCODER_PLACEMENTS} (--text-encoder one-rank, "
                f"replicated or sharded), got {self.text_encoder!r}."
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"ServeConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.served_model_names is not None:
            if isinstance(self.served_model_names, str) or not all(
                isinstance(name, str) and name.strip() for name in self.served_model_names
            ) or not self.served_model_names:
                raise ValueError(
                    "ServeConfig.served_model_names must be a non-empty tuple of non-empty names, got "
                    f"{self.served_model_names!r}."
                )

    @property
    def effective_max_batch_size(self) -> int:
        """`max_batch_size`, or its default: 4, or 1 with TeaCache (see the class docstring)."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return 1 if self.teacache is not None else DEFAULT_MAX_BATCH_SIZE

    @property
    def listens_on_all_interfaces(self) -> bool:
        """Whether `host` is a wildcard address (every interface of the machine)."""
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_unspecified
        except ValueError:
            return False

    def exposure_warning(self) -> str | None:
        """The warning to log when the service listens on every interface without an API key, else `None`."""
        if not self.listens_on_all_interfaces or self.api_key is not None:
            return None
        return (
            f"Listening on all interfaces ({self.host}) without an API key: anyone who can reach this machine can use "
            "it. Pass --api-key (or set DIFFUSERS_QWEN_SP_API_KEY), or listen on 127.0.0.1."
        )

    def __repr__(self) -> str:
        shown = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "api_key":
                value = "<set>" if value else None
            if value != spec.default:
                shown.append(f"{spec.name}={value!r}")
        return f"ServeConfig({', '.join(shown)})"

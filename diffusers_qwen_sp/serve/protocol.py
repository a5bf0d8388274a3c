"""The OpenAI Images protocol: request fields validated into a plain, picklable [`WorkItem`], and OpenAI error bodies.

Everything a client sends is checked here, on rank 0, before anything reaches the other ranks: a [`WorkItem`] holds
only numbers, strings and PNG bytes that the pipeline accepts, so no request can make one rank fail where another
does not. Errors are [`APIError`]s that render as `{"error": {"message", "type", "param", "code"}}`, each naming the
field and the values allowed.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PIL.Image


MAX_PROMPT_CHARS = 8192
# Seeds of a request are seed, seed + 1, ... (one per image); all must fit a signed 64-bit generator seed.
MAX_SEED = 2**63 - 1
# Fields of the OpenAI request we accept and ignore (they describe DALL-E / gpt-image options we have no use for).
IGNORED_FIELDS = ("quality", "style", "user")
# diffusers_qwen_sp extensions (the official client sends them through `extra_body`).
EXTENSION_FIELDS = ("negative_prompt", "num_inference_steps", "true_cfg_scale", "seed", "lora")
GENERATION_FIELDS = ("prompt", "model", "n", "size", "response_format") + IGNORED_FIELDS + EXTENSION_FIELDS
EDIT_FIELDS = GENERATION_FIELDS + ("image", "image[]", "mask")
RESPONSE_FORMATS = ("b64_json",)
MAX_TRUE_CFG_SCALE = 50.0
# A request's LoRA scales: a trained adapter is meant for about 1; negative scales steer away (slider LoRAs).
MAX_LORA_SCALE = 4.0


class APIError(Exception):
    r"""An error answered to the client: HTTP `status` and OpenAI's error body (see [`APIError.body`])."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API answers errors."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ModelLimits:
    r"""What the served model accepts: its names and kind, its defaults, and the service's limits."""

    names: tuple[str, ...]
    edits: bool
    """Whether the model edits input images (`/v1/images/edits`) rather than drawing from text alone."""
    default_size: int
    default_steps: int
    size_multiple: int
    """Height and width must be multiples of this (the VAE's scale factor times the patch size)."""
    max_image_pixels: int
    max_steps: int
    max_n: int
    max_input_images: int
    adapters: tuple[str, ...] = ()
    """The LoRA adapters loaded at start (`serve --lora NAME=SOURCE`) that a request may name in `lora`."""


@dataclass(frozen=True)
class WorkItem:
    r"""
    One validated request, as every rank receives it: plain values only (picklable, compared across ranks).

    `seeds` holds one seed per image (`n` of them). `images` holds the edit inputs as PNG bytes (empty for
    generations). `key` groups requests that can run in one pipeline call.
    """

    request_id: str
    kind: str
    """`"generation"` or `"edit"`."""
    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    height: int
    width: int
    num_inference_steps: int
    true_cfg_scale: float
    images: tuple[bytes, ...] = ()
    adapters: tuple[tuple[str, float], ...] = ()
    """`(adapter name, scale)` pairs, sorted by name; empty: the base weights."""

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a pipeline call: same size, steps, guidance, negative prompt and
        adapters. Edits never share one (each carries its own input images)."""
        if self.kind == "edit":
            return ("edit", self.request_id)
        return ("generation", self.height, self.width, self.num_inference_steps, self.true_cfg_scale,
                self.negative_prompt, self.adapters)


# ---------------------------------------------------------------------------------------------------- field parsing


def _number(fields: Mapping[str, Any], name: str, from_form: bool, integer: bool) -> int | float | None:
    value = fields.get(name)
    if value is None:
        return None
    if from_form and isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise bad_request(f"'{name}' must be {kind}, got {text!r}.", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise bad_request(f"'{name}' must be {kind}, got {value!r}.", name)
    if not math.isfinite(value):
        raise bad_request(f"'{name}' must be finite, got {value!r}.", name)
    return value


def _int_in(fields: Mapping[str, Any], name: str, low: int, high: int, default: int, from_form: bool) -> int:
    value = _number(fields, name, from_form, integer=True)
    if value is None:
        return default
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}.", name)
    return int(value)


def _text(fields: Mapping[str, Any], name: str, required: bool, default: str | None = None) -> str | None:
    value = fields.get(name, default)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required.", name, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {type(value).__name__}.", name)
    if len(value) > MAX_PROMPT_CHARS:
        raise bad_request(f"'{name}' is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS}.", name)
    return value


def parse_size(value: Any, limits: ModelLimits) -> tuple[int, int]:
    r"""`"WIDTHxHEIGHT"` (or `"auto"`: the model's default) -> `(height, width)`, checked against the limits."""
    if value is None or value == "auto":
        return limits.default_size, limits.default_size
    multiple = limits.size_multiple
    example = f"'{limits.default_size}x{limits.default_size}'"
    if not isinstance(value, str):
        raise bad_request(f"'size' must be a string 'WIDTHxHEIGHT' such as {example}, got {value!r}.", "size")
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise bad_request(f"'size' must be 'WIDTHxHEIGHT' (e.g. {example}) or 'auto', got {value!r}.", "size")
    width, height = (int(part) for part in parts)
    for label, side in (("width", width), ("height", height)):
        if side < multiple or side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise bad_request(
                f"'size' {value!r}: the {label} must be a positive multiple of {multiple} for this model; use "
                f"{lower} or {lower + multiple}.", "size",
            )
    if width * height > limits.max_image_pixels:
        raise bad_request(
            f"'size' {value!r} has {width * height} pixels; this server allows at most {limits.max_image_pixels} "
            "(--max-image-pixels).", "size",
        )
    return height, width


def parse_lora(value: Any, limits: ModelLimits, from_form: bool = False) -> tuple[tuple[str, float], ...]:
    r"""
    The `lora` field -> sorted `(adapter name, scale)` pairs. Accepted: a name (`"ghibli"`, scale 1), an object
    `{"name": "ghibli", "scale": 0.8}`, or a list of these (adapters combined, as diffusers' `set_adapters`); `null`
    or `"none"` for the base weights. In a multipart form the field is a name or that JSON as text.
    """
    if value is None or value == "none":
        return ()
    if from_form and isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise bad_request(f"'lora' is not valid JSON ({error}).", "lora") from None
    entries = value if isinstance(value, list) else [value]
    if not entries:
        return ()
    available = ", ".join(map(repr, limits.adapters)) if limits.adapters else "none: start serve with --lora NAME=SOURCE"
    pairs: dict[str, float] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, scale = entry, 1.0
        elif isinstance(entry, dict) and set(entry) <= {"name", "scale"} and isinstance(entry.get("name"), str):
            name, scale = entry["name"], entry.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise bad_request(f"'lora' scale of {name!r} must be a number, got {scale!r}.", "lora")
        else:
            raise bad_request(
                f"'lora' must be an adapter name, an object {{\"name\": ..., \"scale\": ...}} or a list of them, got "
                f"{entry!r}.", "lora",
            )
        if name not in limits.adapters:
            raise bad_request(f"'lora': no adapter named {name!r} is loaded; available: {available}.", "lora",
                              code="adapter_not_found")
        if name in pairs:
            raise bad_request(f"'lora' names the adapter {name!r} more than once.", "lora")
        if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise bad_request(
                f"'lora' scale of {name!r} must be between {-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale}.",
                "lora",
            )
        pairs[name] = scale
    return tuple(sorted(pairs.items()))


def _check_fields(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise bad_request(
            f"Unrecognized request argument supplied: {', '.join(unknown)}. Accepted: {', '.join(allowed)}.",
            unknown[0], code="unknown_parameter",
        )


def parse_request(
    fields: Mapping[str, Any],
    limits: ModelLimits,
    kind: str,
    images: tuple[bytes, ...] = (),
    from_form: bool = False,
    request_id: str | None = None,
) -> WorkItem:
    r"""
    Validate the fields of an images request into a [`WorkItem`], or raise an [`APIError`] (400) naming the field.

    Args:
        fields (`Mapping[str, Any]`): the JSON body, or the multipart form's text fields (`from_form=True`: numbers
            arrive as strings).
        limits ([`ModelLimits`]): the served model and the service's limits.
        kind (`str`): `"generation"` (`/v1/images/generations`) or `"edit"` (`/v1/images/edits`).
        images (`tuple[bytes, ...]`): the edit's input files, already read (checked by [`check_input_images`]).
        from_form (`bool`): whether the fields come from a multipart form.
        request_id (`str`, *optional*): defaults to a random id.
    """
    _check_fields(fields, EDIT_FIELDS if kind == "edit" else GENERATION_FIELDS)
    model = fields.get("model")
    if model is not None and model not in limits.names:
        raise bad_request(
            f"The model {model!r} is not served here; this server serves {', '.join(map(repr, limits.names))} "
            "(or omit 'model').", "model", code="model_not_found",
        )
    if kind == "generation" and limits.edits:
        raise bad_request(
            f"{limits.names[0]} edits input images: send them to /v1/images/edits (multipart, 'image' files).",
            None, code="unsupported_endpoint",
        )
    if kind == "edit" and not limits.edits:
        raise bad_request(
            f"{limits.names[0]} draws from text alone and cannot edit images: use /v1/images/generations, or serve an "
            "edit model (Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509, Qwen/Qwen-Image-Edit-2511).", None,
            code="unsupported_endpoint",
        )
    if fields.get("mask") is not None:
        raise bad_request("'mask' is not supported: the Qwen-Image edit models edit the whole image.", "mask")
    prompt = _text(fields, "prompt", required=True)
    if not prompt.strip():
        raise bad_request("'prompt' must not be empty.", "prompt")
    response_format = fields.get("response_format") or "b64_json"
    if response_format == "url":
        raise bad_request(
            "response_format 'url' is not supported: this server hosts no files. Use response_format 'b64_json'.",
            "response_format",
        )
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(
            f"'response_format' must be 'b64_json', got {response_format!r}.", "response_format"
        )
    adapters = parse_lora(fields.get("lora"), limits, from_form)
    n = _int_in(fields, "n", 1, limits.max_n, 1, from_form)
    height, width = parse_size(fields.get("size"), limits)
    steps = _int_in(fields, "num_inference_steps", 1, limits.max_steps, limits.default_steps, from_form)
    scale = _number(fields, "true_cfg_scale", from_form, integer=False)
    scale = 4.0 if scale is None else float(scale)
    if not 0 <= scale <= MAX_TRUE_CFG_SCALE:
        raise bad_request(
            f"'true_cfg_scale' must be between 0 and {MAX_TRUE_CFG_SCALE:g} (<= 1 disables true CFG), got {scale}.",
            "true_cfg_scale",
        )
    negative_prompt = _text(fields, "negative_prompt", required=False, default=" ")
    seed = _number(fields, "seed", from_form, integer=True)
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED - (n - 1):
        raise bad_request(f"'seed' must be between 0 and {MAX_SEED - (n - 1)} (seeds seed..seed+n-1), got {seed}.",
                          "seed")
    if kind == "edit" and not images:
        raise bad_request("An edit needs at least one 'image' file.", "image", code="missing_required_parameter")
    return WorkItem(
        request_id=request_id or secrets.token_hex(8),
        kind=kind,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seeds=tuple(int(seed) + index for index in range(n)),
        height=height,
        width=width,
        num_inference_steps=steps,
        true_cfg_scale=scale,
        images=tuple(images),
        adapters=adapters,
    )


def check_input_images(files: list[tuple[str, bytes]], limits: ModelLimits) -> tuple[bytes, ...]:
    r"""
    Check edit inputs `(field name, bytes)`: a readable image each, at most `max_input_images` of them and
    `max_image_pixels` pixels each. Returns the bytes as PNG (every rank decodes the same lossless data).
    """
    if len(files) > limits.max_input_images:
        raise bad_request(
            f"Got {len(files)} 'image' files; this server takes at most {limits.max_input_images} per request.", "image"
        )
    checked = []
    for index, (name, data) in enumerate(files):
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header: refuse a decompression bomb before decoding it
                if width * height > limits.max_image_pixels:
                    raise bad_request(
                        f"Input image {index} ({name}) is {width}x{height}, {width * height} pixels; this server "
                        f"allows at most {limits.max_image_pixels} (--max-image-pixels).", "image",
                    )
                rgb = image.convert("RGB")
        except APIError:
            raise
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            raise bad_request(
                f"Input image {index} ({name}) is not a readable image ({type(error).__name__}: {error}); send PNG, "
                "JPEG or WebP files.", "image",
            ) from None
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        checked.append(buffer.getvalue())
    return tuple(checked)


__all__ = [
    "APIError",
    "ModelLimits",
    "WorkItem",
    "bad_request",
    "check_input_images",
    "parse_lora",
    "parse_request",
    "parse_size",
]

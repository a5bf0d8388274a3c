"""The HTTP side on rank 0: a FastAPI app with OpenAI's Images endpoints, health and metrics.

The handlers validate each request ([`parse_request`]), queue it, await the engine's result and encode the PNGs in a
worker thread; they never touch torch.distributed. A pure ASGI guard in front of the app checks the API key (401) and
the body size (413) before a body is read, and counts every answer in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import RequestQueue
from .config import ServeConfig
from .metrics import ServeMetrics
from .model import ServedModel
from .protocol import MAX_PROMPT_CHARS, APIError, check_input_images, parse_request
from .state import READY, ServiceState


GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
ENDPOINTS = (GENERATIONS, EDITS, "/v1/models", "/health", "/metrics")
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "not_found",
            413: "too_large", 429: "queue_full", 500: "failed", 503: "unavailable"}


class BodyTooLarge(Exception):
    """Raised while reading a body that grows past the limit (no Content-Length, or a wrong one)."""


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _too_large(limit: int, size: int | None = None) -> APIError:
    got = f"of {size} bytes " if size is not None else ""
    return APIError(413, f"The request body {got}exceeds the limit of {limit} bytes (--max-body-mb).",
                    code="request_too_large")


class RequestGuard:
    r"""ASGI middleware: API key (401), body size (413) and per-endpoint counts and latencies in the metrics."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, metrics: ServeMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start = time.monotonic()
        status: list[int] = []

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        async def reply(error: APIError) -> None:
            await _error_response(error)(scope, receive, send_counted)

        try:
            if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
                await reply(APIError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the server "
                    "was started with (--api-key or DIFFUSERS_QWEN_SP_API_KEY).", code="invalid_api_key",
                ))
                return
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None:
                if not length.isdigit():
                    await reply(APIError(400, f"Invalid Content-Length {length!r}.", code="invalid_header"))
                    return
                if int(length) > self.max_body_bytes:
                    await reply(_too_large(self.max_body_bytes, int(length)))
                    return
            received = 0

            async def receive_counted() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_counted, send_counted)
        finally:
            code = status[0] if status else 500
            self.metrics.requests.inc(endpoint=endpoint, outcome=OUTCOMES.get(code, str(code)))
            if endpoint in (GENERATIONS, EDITS):
                self.metrics.latency.observe(time.monotonic() - start, endpoint=endpoint)


def encode_images(images: list[Any], seeds: tuple[int, ...]) -> dict[str, Any]:
    r"""OpenAI's Images response: `{"created", "data": [{"b64_json", "seed"}, ...]}` (PNG; `seed` is ours)."""
    data = []
    for image, seed in zip(images, seeds):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "seed": seed})
    return {"created": int(time.time()), "data": data}


def build_app(
    config: ServeConfig,
    queue: RequestQueue,
    state: ServiceState,
    metrics: ServeMetrics,
    served: Callable[[], ServedModel | None],
) -> Any:
    r"""
    The ASGI application of the service (the FastAPI app behind a [`RequestGuard`]).

    Args:
        config ([`ServeConfig`]): limits and the API key.
        queue, state, metrics: shared with the engine.
        served (`Callable`): returns the [`ServedModel`] once loaded, `None` before.
    """
    app = FastAPI(title="diffusers_qwen_sp image service", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return _error_response(_too_large(config.max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return _error_response(APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}",
                                        code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug on the HTTP side (the engine's own failures arrive as APIErrors): still OpenAI's error body.
        return _error_response(APIError(500, f"Internal error: {type(error).__name__}: {error}", code="internal_error"))

    def ready_model() -> ServedModel:
        refusal = state.refusal()
        model = served()
        if refusal is not None or model is None:
            raise refusal or APIError(503, "The model is still loading.", code="service_unavailable")
        return model

    async def run(item: Any) -> JSONResponse:
        pending = queue.submit(item, refuse=state.refusal())
        images = await asyncio.wrap_future(pending.future)
        return JSONResponse(await run_in_threadpool(encode_images, images, item.seeds))

    @app.post(GENERATIONS)
    async def generations(request: Request) -> JSONResponse:
        model = ready_model()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"The body must be a JSON object ({error}).", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"The body must be a JSON object, got {type(body).__name__}.", code="invalid_json")
        return await run(parse_request(body, model.limits, "generation"))

    @app.post(EDITS)
    async def edits(request: Request) -> JSONResponse:
        model = ready_model()
        limits = model.limits
        try:
            form = await request.form(max_files=limits.max_input_images + 2, max_fields=64,
                                      max_part_size=4 * MAX_PROMPT_CHARS + 1024)
        except (BodyTooLarge, APIError):
            raise
        except Exception as error:  # noqa: BLE001 - the multipart parser's errors
            raise APIError(400, f"The body must be multipart/form-data ({error}).", code="invalid_body") from None
        fields: dict[str, Any] = {}
        files: list[tuple[str, bytes]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "image[]", "mask"):
                    raise APIError(400, f"Unexpected file field {name!r}; send images as 'image'.", param=name)
                if name == "mask":
                    fields["mask"] = value.filename or "mask"
                else:
                    files.append((value.filename or name, await value.read()))
            elif name in fields:
                raise APIError(400, f"The field {name!r} is given more than once.", param=name)
            elif name in ("image", "image[]"):
                raise APIError(400, "'image' must be a file (multipart file upload).", param="image")
            else:
                fields[name] = value
        await form.close()
        if limits.edits and fields.get("mask") is None and fields.get("prompt"):
            images = await run_in_threadpool(check_input_images, files, limits)
        else:  # parse_request says what is wrong first (wrong endpoint, mask, no prompt)
            images = ()
        return await run(parse_request(fields, limits, "edit", images=images, from_form=True))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        model = served()
        if model is None:
            raise state.refusal() or APIError(503, "The model is still loading.", code="service_unavailable")
        data = [{"id": name, "object": "model", "created": started, "owned_by": "diffusers_qwen_sp",
                 "description": model.description, "adapters": list(model.limits.adapters)}
                for name in model.limits.names]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        status = state.status
        return JSONResponse({"status": status, "reason": state.reason}, status_code=200 if status == READY else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return RequestGuard(app, config.api_key, config.max_body_bytes, metrics)


__all__ = ["BodyTooLarge", "RequestGuard", "build_app", "encode_images"]

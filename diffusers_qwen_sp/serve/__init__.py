"""`python -m diffusers_qwen_sp serve`: the Qwen-Image family as a multi-process image service with an
OpenAI-compatible API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`, `/health`, `/metrics`).

Split by concern:

- `config`: [`ServeConfig`], the flags, validated on creation.
- `protocol`: request fields validated into a picklable [`WorkItem`]; OpenAI error bodies ([`APIError`]).
- `batching`: the bounded queue between the HTTP thread and the engine, and the grouping of compatible requests.
- `model`: [`ServedModel`] and how a batch becomes one pipeline call (one generator per image).
- `engine`: the rank loop (rank 0 hands work to the group, every rank runs the pipeline, failures agreed on).
- `app`: the FastAPI app and its guard (API key, body size, metrics).
- `metrics`: Prometheus text exposition. `state`: the service status behind `/health`.
- `service`: [`Service`] / [`run_service`], which tie them together on each rank.

Loading the pipeline is the caller's (the CLI's `load_for_serving`), so the library never imports the CLI.
"""

from .batching import Batch, Pending, RequestQueue
from .config import ServeConfig
from .engine import Engine, FatalServeError
from .metrics import ServeMetrics
from .model import ServedModel, describe_served_model, pipeline_call
from .protocol import APIError, ModelLimits, WorkItem, parse_request
from .service import Service, run_service
from .state import ServiceState


__all__ = [
    "APIError",
    "Batch",
    "Engine",
    "FatalServeError",
    "ModelLimits",
    "Pending",
    "RequestQueue",
    "ServeConfig",
    "ServeMetrics",
    "ServedModel",
    "Service",
    "ServiceState",
    "WorkItem",
    "describe_served_model",
    "parse_request",
    "pipeline_call",
    "run_service",
]

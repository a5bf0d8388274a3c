"""Where the text encoder lives under parallelism, and the prompt and negative prompt encoded in one encoder call.

Qwen-Image's text encoder is Qwen2.5-VL 7B: 16.6 GB in bf16, as much as 40 % of the transformer, and it runs once per
call, before the denoising loop. The pipelines already broadcast the replica leader's prompt embeddings to every rank,
so the other ranks need no encoder of their own. [`apply_text_encoder_placement`] chooses where it lives:

| placement      | encoder weights per rank                      | encode (prompt + negative)                    |
|----------------|-----------------------------------------------|-----------------------------------------------|
| `"one_rank"`   | whole on the replica leader, none elsewhere   | the leader encodes, then one broadcast        |
| `"replicated"` | whole on every rank (stock diffusers)         | every rank encodes, the leader's is broadcast |
| `"sharded"`    | `1/N` of each decoder layer, the rest whole   | every rank encodes, one all-gather per layer  |

**The default is `"one_rank"`**: it fits best (every other rank of the replica frees the whole encoder, and can load
the pipeline without it: `from_pretrained(..., text_encoder=None)`, as the CLI does) and costs least: no more time
than `"replicated"` (the other ranks wait for the broadcast instead of computing the same embeddings; on CPU, where
the ranks share cores, less), and far less than `"sharded"`, whose all-gathers come on top of the same compute.
Measured on CPU (gloo, world 2, Ulysses 2, a Qwen2.5-VL scaled to 154 MiB whose decoder layers hold 90 % of the
weights, as in the 7B; 1 thread per rank on 2 cores shared with other jobs, best of 2 runs of 7 interleaved calls):
encoder MiB held per rank (rank 0 / rank 1), process RSS of rank 1, and the time of one call's prompt + negative
encoding, broadcast included, with the one batched forward and with the stock two forwards:

| placement      | MiB held      | rank 1 RSS | encode, 1 forward | encode, 2 forwards |
|----------------|---------------|------------|-------------------|--------------------|
| `"one_rank"`   | 154.3 / 0.0   | 377 MiB    | 0.24 s            | 0.24 s             |
| `"replicated"` | 154.3 / 154.3 | 513 MiB    | 0.45 s            | 0.52 s             |
| `"sharded"`    | 78.3 / 78.3   | -          | 0.58 s            | 0.83 s             |

`"replicated"` is slower here only because its two ranks compute at once on shared cores; with a device per rank it
takes the time of `"one_rank"`. One forward instead of two halves `"sharded"`'s all-gathers; on CPU, compute-bound,
one forward costs what two did otherwise.

Choose `"sharded"` when the leader cannot hold the whole encoder next to its part of the transformer.

The prompt and negative prompt of a true-CFG call share one encoder forward: see `diffusers_qwen_sp.prompt_batching`.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.utils import logging

from .distributed import ParallelGroups
from .prompt_batching import PromptPairPlan
from .weight_sharding import fully_shard_modules, parameter_bytes, shard_process_group


logger = logging.get_logger(__name__)

TEXT_ENCODER_PLACEMENTS = ("one_rank", "replicated", "sharded")
DEFAULT_TEXT_ENCODER_PLACEMENT = "one_rank"

_NOT_REMOVABLE = (
    "The text encoder's placement 'sharded' cannot be removed: FSDP2's fully_shard replaced every decoder-layer "
    "parameter with this rank's DTensor shard, and torch offers no way back. Load the pipeline again to run the text "
    "encoder unsharded, or keep calling it on every rank of the replica."
)


@dataclass
class TextEncoderPlacementConfig:
    r"""
    Where the text encoder lives under sequence/CFG parallelism (see the module docstring for the measurements).

    Args:
        placement (`str`, defaults to `"one_rank"`):
            `"one_rank"`: only the replica leader (`groups.replica_ranks[0]`) keeps it; the other ranks drop theirs
            and receive the prompt embeddings by broadcast. `"replicated"`: every rank keeps it (stock behaviour).
            `"sharded"`: every rank keeps `1/N` of each decoder layer (FSDP2 over the replica's ranks) and all ranks
            encode together.
        prefetch (`bool`, defaults to `True`):
            `"sharded"` only: all-gather the next decoder layer while the current one computes.
    """

    placement: str = DEFAULT_TEXT_ENCODER_PLACEMENT
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.placement not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(
                f"TextEncoderPlacementConfig.placement must be one of {TEXT_ENCODER_PLACEMENTS}, got "
                f"{self.placement!r}: 'one_rank' keeps the text encoder on the replica leader only, 'replicated' on "
                "every rank, 'sharded' splits its decoder layers over the replica's ranks."
            )
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"TextEncoderPlacementConfig.prefetch must be a bool, got {self.prefetch!r}.")


@dataclass
class TextEncoderPlacementRuntime:
    r"""What [`apply_text_encoder_placement`] set up on a pipeline (fixed while it is on)."""

    config: TextEncoderPlacementConfig
    rank: int
    replica_ranks: list[int]  # global ranks of this rank's replica; the first is the leader
    mesh: Any = None  # "sharded" over several ranks: the 1D DeviceMesh of the decoder layers
    all_gather: Any = None  # "sharded" on CPU: the layers' point-to-point all-gather
    bytes_held: int = 0  # this rank's text-encoder parameter bytes once placed
    bytes_whole: int = 0  # the whole encoder's
    dropped: bool = False  # "one_rank": this rank dropped its encoder

    @property
    def leader(self) -> int:
        """The global rank that holds the text encoder under `"one_rank"`, and whose embeddings every rank uses."""
        return self.replica_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def __repr__(self) -> str:
        return (
            f"TextEncoderPlacementRuntime(placement={self.config.placement!r}, rank={self.rank}, "
            f"leader={self.leader}, replica_ranks={self.replica_ranks}, "
            f"held={self.bytes_held / 2**20:.1f} of {self.bytes_whole / 2**20:.1f} MiB)"
        )


class AbsentTextEncoder:
    r"""
    Stands in for `pipe.text_encoder` during a pipeline call on a rank that holds no text encoder, so that stock code
    reading `text_encoder.dtype` runs; any use of the model raises.

    Its dtype is float32: the one stock read (Qwen-Image-Layered casts the preprocessed float32 image to it before
    `prepare_latents` casts it to the prompt embeddings' dtype, the leader's encoder dtype) is then a no-op, and the
    image reaching the VAE is the leader's, bit for bit.
    """

    dtype = torch.float32

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "This rank holds no text encoder (placement 'one_rank' dropped it, or the pipeline was loaded with "
            "text_encoder=None): it receives the prompt embeddings from its replica's leader. Encode on the leader, "
            "or choose placement 'replicated'."
        )

    generate = __call__

    def __repr__(self) -> str:
        return "AbsentTextEncoder()"


def text_encoder_absent(pipe: Any) -> bool:
    """Whether this rank's pipeline has no text encoder (`None`, or the stand-in of a running call)."""
    encoder = getattr(pipe, "text_encoder", None)
    return encoder is None or isinstance(encoder, AbsentTextEncoder)


def loads_text_encoder(placement: str, rank: int, replica_size: int) -> bool:
    r"""
    Whether a rank needs the text encoder at all, before the process groups exist: for loaders, which can then pass
    `text_encoder=None` to `from_pretrained` and never read its weights. Replicas are contiguous blocks of
    `replica_size` ranks (see `diffusers_qwen_sp.distributed.groups`) and each one's leader is its first rank.

    Example:

    ```py
    >>> loads_text_encoder("one_rank", rank=1, replica_size=2)
    False
    >>> pipe = QwenImageSPPipeline.from_pretrained("Qwen/Qwen-Image", text_encoder=None)  # on rank 1
    ```
    """
    TextEncoderPlacementConfig(placement=placement)  # validates
    return placement != "one_rank" or rank % replica_size == 0


# ---------------------------------------------------------------------------------------------------- placement


def get_text_encoder_placement(pipe: Any) -> TextEncoderPlacementRuntime | None:
    r"""The [`TextEncoderPlacementRuntime`] applied to `pipe`, or `None`."""
    return getattr(pipe, "_text_encoder_placement", None)


def _decoder_layers(text_encoder: nn.Module) -> nn.ModuleList:
    model = getattr(text_encoder, "model", None)
    for owner in (getattr(model, "language_model", None), model):  # transformers 5, then 4
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise TypeError(
        f"Sharding the text encoder needs a Qwen2.5-VL model with decoder layers at `model.language_model.layers`, "
        f"got {type(text_encoder).__name__}. Use placement 'one_rank' or 'replicated' for this encoder."
    )


def _check_shardable(text_encoder: nn.Module) -> nn.ModuleList:
    layers = _decoder_layers(text_encoder)
    offloaded = getattr(text_encoder, "_hf_hook", None) is not None or any(
        "group_offloading" in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
        for module in text_encoder.modules()
    )
    if offloaded:
        raise ValueError(
            "The text encoder placement 'sharded' does not compose with offloading the text encoder "
            "(enable_model_cpu_offload, enable_group_offload): offloading moves whole parameters, FSDP2 holds a shard "
            "of each. Remove the offloading first (pipe.remove_all_hooks()), or use placement 'one_rank'."
        )
    for name, parameter in layers.named_parameters():
        if type(parameter.data) is not torch.Tensor:
            raise ValueError(
                f"text_encoder layer parameter {name} is a {type(parameter.data).__name__} (quantized?): FSDP2 shards "
                "plain tensors only. Use placement 'one_rank' for a quantized text encoder."
            )
    return layers


def _holders(pipe: Any, groups: ParallelGroups) -> list[bool]:
    """Whether each rank of the replica (in replica order) holds a text encoder: one all-gather over the replica."""
    holds = not text_encoder_absent(pipe)
    if groups.replica_group is None:
        return [holds]
    gathered: list[Any] = [None] * len(groups.replica_ranks)
    dist.all_gather_object(gathered, holds, group=groups.replica_group)
    return [bool(value) for value in gathered]


def apply_text_encoder_placement(
    pipe: Any, config: TextEncoderPlacementConfig | None = None, groups: ParallelGroups | None = None
) -> TextEncoderPlacementRuntime:
    r"""
    Place the text encoder of `pipe` on the ranks of its replica (see [`TextEncoderPlacementConfig`]).

    Call it on every rank at the same point, after sequence/CFG parallelism (it gathers which ranks hold an encoder
    over the replica, and `"sharded"` builds FSDP2 on the replica group), outside model CPU offload
    (`pipe.set_text_encoder_placement` takes care of that). Every rank raises the same error when the placement cannot
    be applied: `"one_rank"` needs the encoder on the leader, the others need it on every rank. `"one_rank"` frees
    the other ranks' encoder (once nothing else refers to it) and cannot give it back; `"sharded"` cannot be undone.

    Args:
        pipe ([`QwenImageSPPipelineMixin`]): one of our pipelines, with sequence parallelism enabled.
        config ([`TextEncoderPlacementConfig`], *optional*): default `"one_rank"`.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`], *optional*): default: the SP runtime's groups.

    Returns:
        [`TextEncoderPlacementRuntime`]

    Example:

    ```py
    >>> # torchrun --nproc-per-node 2 script.py
    >>> from diffusers_qwen_sp.text_encoder_placement import TextEncoderPlacementConfig, apply_text_encoder_placement

    >>> pipe.enable_sequence_parallel(ulysses_degree=2)
    >>> apply_text_encoder_placement(pipe, TextEncoderPlacementConfig("one_rank"))
    >>> pipe.text_encoder is None  # on rank 1; rank 0 encodes every prompt and broadcasts the embeddings
    True
    ```
    """
    config = config if config is not None else TextEncoderPlacementConfig()
    if not isinstance(config, TextEncoderPlacementConfig):
        raise TypeError(f"`config` must be a TextEncoderPlacementConfig, got {type(config).__name__}.")
    if groups is None:
        from .hooks.sequence_parallel import get_sequence_parallel_runtime

        runtime = get_sequence_parallel_runtime(pipe.transformer)
        if runtime is None:
            raise RuntimeError(
                "The text encoder's placement applies under parallelism: call pipe.enable_sequence_parallel(...) "
                "first (in one process the pipeline keeps its text encoder)."
            )
        groups = runtime.groups
    current = get_text_encoder_placement(pipe)
    if current is not None:
        if current.config.placement == config.placement:
            return current
        if current.mesh is not None:
            raise RuntimeError(_NOT_REMOVABLE)
        if current.config.placement == "one_rank" and len(current.replica_ranks) > 1:
            raise ValueError(
                f"Cannot change the text encoder placement from 'one_rank' to {config.placement!r}: the ranks other "
                f"than the leader (rank {current.leader}) dropped their text encoder. Load the pipeline again."
            )

    ranks = list(groups.replica_ranks)
    holders = _holders(pipe, groups)  # the same list on every rank: the checks below raise alike
    whole = 0
    if not any(holders):  # no rank loaded one (the caller passes prompt embeddings): nothing to place
        pass
    elif config.placement == "one_rank":
        if not holders[0]:
            raise ValueError(
                f"Text encoder placement 'one_rank' keeps the text encoder on the replica leader, rank {ranks[0]}, "
                "which has none (loaded with text_encoder=None?). Load it on that rank (only there)."
            )
    else:
        missing = [rank for rank, holds in zip(ranks, holders) if not holds]
        if missing:
            raise ValueError(
                f"Text encoder placement {config.placement!r} needs the text encoder on every rank of the replica "
                f"{ranks}; ranks {missing} have none (loaded with text_encoder=None?). Use placement 'one_rank', or "
                "load the text encoder on every rank."
            )
    if not text_encoder_absent(pipe):
        whole = parameter_bytes(pipe.text_encoder)[1]

    runtime = TextEncoderPlacementRuntime(config=config, rank=groups.rank, replica_ranks=ranks, bytes_whole=whole)
    if config.placement == "one_rank" and not runtime.is_leader and not text_encoder_absent(pipe):
        if getattr(pipe.text_encoder, "_hf_hook", None) is not None:
            raise ValueError(
                "The text encoder is under model CPU offload: dropping it would leave it in the offload chain. Use "
                "pipe.set_text_encoder_placement(...), which takes model offload off around the change."
            )
        pipe.text_encoder = None  # the pipeline's reference; the weights go once nothing else holds them
        gc.collect()  # hooks leave reference cycles (a module's forward bound to itself)
        runtime.dropped = True
    elif config.placement == "sharded" and len(ranks) > 1:
        encoder = pipe.text_encoder
        layers = _check_shardable(encoder)
        _, process_group = shard_process_group(groups, "world")  # the replica's ranks, in a group of their own
        runtime.mesh, runtime.all_gather = fully_shard_modules(
            encoder, list(layers), process_group, prefetch=config.prefetch
        )
    if not text_encoder_absent(pipe):
        runtime.bytes_held = parameter_bytes(pipe.text_encoder)[0]
    pipe._text_encoder_placement = runtime
    if runtime.is_leader:
        logger.info(f"Text encoder placement: {runtime}")
    return runtime


def remove_text_encoder_placement(pipe: Any) -> None:
    r"""
    Forget the placement: a no-op without one; raises a `RuntimeError` for `"sharded"` over several ranks (FSDP2
    cannot be undone: load the pipeline again). After `"one_rank"` the ranks that dropped their encoder stay without
    one (set `pipe.text_encoder`, or load again, to encode prompts in one process).
    """
    runtime = get_text_encoder_placement(pipe)
    if runtime is None:
        return
    if runtime.mesh is not None:
        raise RuntimeError(_NOT_REMOVABLE)
    if runtime.dropped:
        logger.warning(
            f"Rank {runtime.rank} dropped its text encoder (placement 'one_rank') and stays without one: pass "
            "prompt_embeds, or set pipe.text_encoder, to encode prompts without parallelism."
        )
    del pipe._text_encoder_placement


def receives_embeddings(groups: ParallelGroups | None) -> bool:
    """Whether this rank, under parallelism, gets its prompt embeddings from a leader instead of encoding them."""
    return groups is not None and len(groups.replica_ranks) > 1 and groups.rank != groups.replica_ranks[0]


@contextlib.contextmanager
def prompt_encoding(pipe: Any, plan: PromptPairPlan | None) -> Iterator[None]:
    r"""
    For the duration of one pipeline call: the call's [`PromptPairPlan`] on the pipeline, and on a rank without a text
    encoder an [`AbsentTextEncoder`] in its place (restored to `None` afterwards, whatever happens).
    """
    absent = pipe.text_encoder is None
    pipe.__dict__["_prompt_pair_plan"] = plan
    if absent:
        pipe.__dict__["text_encoder"] = AbsentTextEncoder()  # not through setattr: model_index stays as it is
    try:
        yield
    finally:
        pipe.__dict__["_prompt_pair_plan"] = None
        if absent:
            pipe.__dict__["text_encoder"] = None


def encode_prompt_on_this_rank(
    pipe: Any, stock_encode: Callable[..., Any], args: tuple, kwargs: dict[str, Any], groups: ParallelGroups | None
) -> Any:
    r"""
    This rank's `encode_prompt` result before the broadcast: the stock one (sharing an encoder forward with the
    negative prompt when the running call planned it), or `None` on a rank that has no text encoder and receives the
    embeddings from its replica's leader.
    """
    bound = inspect.signature(stock_encode).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if arguments.get("prompt_embeds") is not None:
        return stock_encode(*args, **kwargs)
    if text_encoder_absent(pipe):
        if receives_embeddings(groups):
            return None
        leader = f" (this rank is its replica's leader, rank {groups.rank})" if groups is not None else ""
        raise ValueError(
            f"This pipeline has no text encoder{leader}: it was loaded with text_encoder=None or dropped it (text "
            "encoder placement 'one_rank' keeps it on the replica leader only). Pass prompt_embeds (and "
            "negative_prompt_embeds), or set pipe.text_encoder."
        )
    plan = pipe.__dict__.get("_prompt_pair_plan")
    if plan is None:
        return stock_encode(*args, **kwargs)
    return plan.encode(pipe, stock_encode, arguments)


__all__ = [
    "DEFAULT_TEXT_ENCODER_PLACEMENT",
    "TEXT_ENCODER_PLACEMENTS",
    "AbsentTextEncoder",
    "TextEncoderPlacementConfig",
    "TextEncoderPlacementRuntime",
    "apply_text_encoder_placement",
    "encode_prompt_on_this_rank",
    "get_text_encoder_placement",
    "loads_text_encoder",
    "prompt_encoding",
    "receives_embeddings",
    "remove_text_encoder_placement",
    "text_encoder_absent",
]

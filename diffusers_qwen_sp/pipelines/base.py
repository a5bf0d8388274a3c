"""What every diffusers_qwen_sp pipeline adds to its stock diffusers parent."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from diffusers.utils import logging

from ..distributed import broadcast_from_rank0, check_same_across_ranks, collective_timeout, is_collective_failure
from ..hooks.cfg_parallel import apply_cfg_parallel, get_cfg_parallel_hook, remove_cfg_parallel
from ..hooks.sequence_parallel import (
    SequenceParallelConfig,
    apply_sequence_parallel,
    get_sequence_parallel_runtime,
    remove_sequence_parallel,
)
from ..hooks.teacache import TeaCacheConfig, remove_teacache
from ..hooks.teacache import teacache_stats as transformer_teacache_stats
from ..hooks.vae_patch_parallel import (
    PatchParallelVAEConfig,
    apply_patch_parallel_vae,
    get_patch_parallel_vae,
    remove_patch_parallel_vae,
)
from ..models import DenoisingStep, QwenImageSPTransformer2DModel
from .call_arguments import COMPARED_BY_VALUE, SAME_ACROSS_RANKS, describe_argument
from .offload import SEQUENTIAL_OFFLOAD_UNSUPPORTED, ParallelOffloadMixin
from ..prompt_batching import plan_prompt_pair
from ..text_encoder_placement import (
    TextEncoderPlacementConfig,
    apply_text_encoder_placement,
    encode_prompt_on_this_rank,
    get_text_encoder_placement,
    prompt_encoding,
    remove_text_encoder_placement,
    text_encoder_absent,
)
from ..weight_sharding import (
    WeightShardingConfig,
    apply_weight_sharding,
    check_weight_sharding,
    remove_weight_sharding,
)


# What model_index.json names for the transformer (see `QwenImageSPPipelineMixin.__setattr__`).
STOCK_TRANSFORMER_CLASS_NAME = "QwenImageTransformer2DModel"


logger = logging.get_logger(__name__)


def stock_parent(pipeline_cls: type) -> type:
    r"""The stock diffusers pipeline class that one of our pipeline classes extends."""
    return next(cls for cls in pipeline_cls.__mro__ if cls.__module__.startswith("diffusers.pipelines."))


class QwenImageSPPipelineMixin(ParallelOffloadMixin):
    r"""
    Mixin for the thin subclasses of diffusers' Qwen-Image pipelines.

    - The transformer is always a [`QwenImageSPTransformer2DModel`]: a stock one (e.g. loaded from a stock repo) is
      converted when it is set on the pipeline, sharing its weights. `model_index.json` keeps naming the stock
      classes (pipeline and transformer), however the pipeline was built, so a saved pipeline loads with plain
      diffusers as well as with ours.
    - `__call__` has the stock signature and docstring (`inspect.signature`, `help`, IDE completion).
    - While the pipeline runs, the transformer's `cache_context` carries the step index, the step count and the
      timestep of the denoising loop, so cache hooks know where they are without forking `__call__`.
    - `enable_sequence_parallel` / `disable_sequence_parallel` (Ulysses, Ring, both, and CFG parallel) and
      `enable_teacache` / `disable_teacache` / `teacache_stats`. Under parallelism every rank denoises rank 0's noise
      and prompt embeddings, the call arguments are checked to agree across ranks before the first step, and a failed
      peer ends every rank with an error that says so.
    - `enable_model_cpu_offload` and group offloading compose with sequence and CFG parallelism in either order, each
      rank offloading to its own device; `enable_sequential_cpu_offload` under parallelism is refused.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        stock_call = stock_parent(cls).__call__

        # The stock signature and docstring for `inspect.signature`, `help` and IDEs (via `__wrapped__`); the body is
        # the mixin's, which calls the stock `__call__` itself.
        @functools.wraps(stock_call)
        def __call__(self: QwenImageSPPipelineMixin, *args: Any, **kwargs: Any) -> Any:
            return self._parallel_call(*args, **kwargs)

        cls.__call__ = __call__

    def __setattr__(self, name: str, value: Any) -> None:
        # The stock constructors set the transformer through `register_modules` -> `setattr`: one place converts it.
        if name == "transformer" and value is not None and not isinstance(value, QwenImageSPTransformer2DModel):
            value = QwenImageSPTransformer2DModel.from_transformer(value)
        super().__setattr__(name, value)
        if name == "transformer" and value is not None and "transformer" in getattr(self, "_internal_dict", {}):
            # Ours is the stock model with a staged forward (same config and weights): record the stock class, which
            # every loader knows, instead of our module path, which diffusers cannot load a component from.
            self.register_to_config(transformer=("diffusers", STOCK_TRANSFORMER_CLASS_NAME))

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        r"""
        Like diffusers' `save_pretrained`, with `model_index.json` naming the stock pipeline class, so the folder
        loads with plain diffusers as well as with our classes (or `custom_pipeline`).
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):  # already uploaded as is
            logger.warning(
                "push_to_hub uploaded a model_index.json naming %s: plain diffusers needs custom_pipeline to load it.",
                type(self).__name__,
            )
        stock = stock_parent(type(self))
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = stock.__name__
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ sequence parallelism

    def enable_sequence_parallel(self, config: SequenceParallelConfig | None = None, **kwargs: Any) -> None:
        r"""
        Shard the transformer's image sequence over the processes of a `torchrun` / `accelerate launch` job.

        Initialises torch.distributed from the launcher's environment if needed (NCCL and one GPU per local rank on
        CUDA, gloo on CPU), moves a CUDA pipeline to this rank's GPU, and makes every rank denoise the same inputs:
        the initial noise and the prompt embeddings of rank 0 are broadcast, whatever seeds the ranks were given.

        Composes with `enable_model_cpu_offload` and group offloading, called before or after it: each rank offloads
        to its own GPU (see [`~QwenImageSPPipelineMixin.enable_model_cpu_offload`]). `enable_sequential_cpu_offload`
        is refused (`ValueError`): use leaf-level group offloading instead.

        With `shard_weights=True` (or `"sp"`) every rank also keeps only its shard of each transformer block (FSDP2,
        see `diffusers_qwen_sp.weight_sharding`): load LoRA adapters before, do not offload, and expect no way back
        (`disable_sequence_parallel` then raises; load the pipeline again to run unsharded).

        The rest of the pipeline is distributed too (each a field of the config): the text encoder lives on the
        first rank of each replica only (`text_encoder="one_rank"`, the default: the others drop it, or load the
        pipeline with `text_encoder=None` to never read it; `"replicated"`, `"sharded"`), and the VAE decodes (and
        encodes reference images) in slabs over the ranks (`parallel_vae=True`, the default; exact to fp32 rounding).

        Args:
            config ([`SequenceParallelConfig`], *optional*): the degrees; or pass its fields as keyword arguments
                (`ulysses_degree`, `ring_degree`, `cfg_degree`, `dp_degree`, `shard_weights`, `text_encoder`,
                `parallel_vae`, ...). Default: Ulysses over all processes.

        Example:

        ```py
        >>> # torchrun --nproc-per-node 4 script.py
        >>> pipe = QwenImageSPPipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16)
        >>> pipe.enable_sequence_parallel(ulysses_degree=2, ring_degree=2)
        >>> pipe.to("cuda")  # this rank's GPU, set by enable_sequence_parallel
        >>> image = pipe("a red fox in the snow", negative_prompt=" ", true_cfg_scale=4.0).images[0]
        ```
        """
        if config is not None and kwargs:
            raise ValueError(f"Pass either `config` or keyword arguments, not both (got config and {sorted(kwargs)}).")
        if config is None and kwargs:
            config = SequenceParallelConfig(**kwargs)
        if self._accelerate_offload() == "sequential":  # raised alike on every rank, before any collective
            raise ValueError(SEQUENTIAL_OFFLOAD_UNSUPPORTED)
        offloaded = self._accelerate_offload() == "model"
        with self._model_offload_outside():
            runtime = apply_sequence_parallel(self.transformer, config)
            if runtime.config.cfg_degree > 1:
                try:
                    apply_cfg_parallel(self.transformer, runtime.groups)
                except Exception:
                    remove_sequence_parallel(self.transformer)  # all or nothing
                    raise
        try:
            self._check_offload_devices()
            if self.vae is not None and runtime.config.parallel_vae:
                apply_patch_parallel_vae(self.vae, PatchParallelVAEConfig(), runtime.groups)
            sharding = None
            if runtime.config.weight_sharding_group is not None:
                sharding = WeightShardingConfig(group=runtime.config.weight_sharding_group)
                # Offloaded or quantized blocks are refused alike on every rank before anything cannot be undone.
                check_weight_sharding(self.transformer, sharding, runtime.groups)
            with self._model_offload_outside():  # its checks raise alike on every rank, before any change
                apply_text_encoder_placement(self, TextEncoderPlacementConfig(runtime.config.text_encoder))
            if sharding is not None:
                apply_weight_sharding(self.transformer, sharding, runtime.groups)
        except (ValueError, TypeError, RuntimeError):
            # All or nothing: every refusal above comes before the first step that cannot be undone (a sharded text
            # encoder, sharded weights). The error that stopped us is raised.
            with contextlib.suppress(RuntimeError):
                self.disable_sequence_parallel()
            raise
        # Not under model offload, whose hooks place the models; group-offloaded models are left alone by `to`.
        if not offloaded and self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            self.to(f"cuda:{torch.cuda.current_device()}")
        logger.info(f"Sequence parallelism enabled: {runtime.groups}")

    def disable_sequence_parallel(self) -> None:
        r"""
        Remove sequence (and CFG) parallelism and the parallel VAE; the pipeline runs unsharded again (process groups
        stay initialised). Raises a `RuntimeError`, changing nothing, when the weights or the text encoder are sharded
        (`shard_weights`, `text_encoder="sharded"`): FSDP2 cannot be undone; load the pipeline again instead. Ranks
        that dropped their text encoder (`text_encoder="one_rank"`) stay without one: set `pipe.text_encoder` or pass
        `prompt_embeds`.
        """
        # Each raises if its part is sharded, before anything is removed.
        remove_weight_sharding(self.transformer)
        remove_text_encoder_placement(self)
        if self.vae is not None:  # a pipeline built without one (e.g. the bench's, from prompt embeddings to latents)
            remove_patch_parallel_vae(self.vae)
        with self._model_offload_outside():
            if get_cfg_parallel_hook(self.transformer) is not None:
                remove_cfg_parallel(self.transformer)
            remove_sequence_parallel(self.transformer)

    @property
    def sequence_parallel_enabled(self) -> bool:
        """Whether sequence parallelism is attached to the transformer."""
        return get_sequence_parallel_runtime(self.transformer) is not None

    def _sync_across_ranks(self, produce: Callable[[], Any], what: str) -> Any:
        # Every rank of a replica must denoise the same inputs, or the sharded results mix different images: every
        # rank runs `produce` (a rank without the text encoder gets None), and the replica's leader (group rank 0)
        # broadcasts its value over the replica (with dp_degree > 1 each replica over its own group; a replica of one
        # process has nothing to sync). An exception on the leader is broadcast in its place and raised on every rank
        # alike: the others never wait in a broadcast the leader does not reach (in `serve`, one failed batch).
        runtime = get_sequence_parallel_runtime(self.transformer)
        if runtime is None or runtime.groups.replica_size == 1:
            return produce()
        failure: Exception | None = None
        try:
            value = produce()
        except Exception as error:  # noqa: BLE001 - sent to every rank, raised below
            if is_collective_failure(error):
                raise
            value, failure = None, error
        description = None if failure is None else f"{type(failure).__name__}: {failure}"
        groups = runtime.groups
        # (error or None, value) on the leader -> the same pair on every rank of the replica
        description, value = broadcast_from_rank0(
            (description, value), group=groups.replica_group if groups.dp_degree > 1 else None
        )
        if description is None:
            return value  # a follower's own failure is moot: it takes the leader's value
        if failure is not None and groups.replica_rank == 0:
            raise failure
        leader = groups.replica_ranks[0]
        raise RuntimeError(f"Rank {leader}, the replica's leader, failed to compute {what}: {description}")

    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        r"""
        The stock `encode_prompt`; under parallelism every rank gets its replica leader's embeddings, and a rank
        without a text encoder (placement `"one_rank"`) only receives them. In a true-CFG call the first call encodes
        the negative prompt too, in the same encoder forward, and the second returns it (see
        `diffusers_qwen_sp.prompt_batching` and `diffusers_qwen_sp.text_encoder_placement`).
        """
        runtime = get_sequence_parallel_runtime(self.transformer)
        groups = runtime.groups if runtime is not None else None
        encode = super().encode_prompt
        return self._sync_across_ranks(
            lambda: encode_prompt_on_this_rank(self, encode, args, kwargs, groups), "the prompt embeddings"
        )

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        r"""The stock `prepare_latents`; under parallelism every rank gets rank 0's noise."""
        prepare = super().prepare_latents
        return self._sync_across_ranks(lambda: prepare(*args, **kwargs), "the initial latents")

    # ------------------------------------------------------------------ TeaCache

    def enable_teacache(self, config: TeaCacheConfig | None = None, **kwargs: Any) -> None:
        r"""
        Skip the transformer blocks on steps whose input barely changed (TeaCache).

        Composes with sequence and CFG parallelism: the skip decision is taken from statistics all-reduced over the
        SP group, so every rank skips the same steps; each CFG branch keeps its own cache.

        Args:
            config ([`TeaCacheConfig`], *optional*): or its fields as keyword arguments, e.g. `threshold=0.2`.

        Example:

        ```py
        >>> pipe.enable_teacache(threshold=0.2)
        >>> image = pipe("a red fox in the snow", negative_prompt=" ", true_cfg_scale=4.0).images[0]
        >>> pipe.teacache_stats()["cond"]["skipped"]
        ```
        """
        if config is not None and kwargs:
            raise ValueError(f"Pass either `config` or keyword arguments, not both (got config and {sorted(kwargs)}).")
        self.transformer.enable_cache(config if config is not None else TeaCacheConfig(**kwargs))

    def disable_teacache(self) -> None:
        r"""Remove TeaCache: every step computes the blocks again."""
        remove_teacache(self.transformer)

    def teacache_stats(self) -> dict[str, dict[str, Any]]:
        r"""
        Which steps each CFG branch computed and skipped in the most recent call:
        `{"cond": {"computed": [...], "skipped": [...], "rel_l1": {...}}, "uncond": {...}}`.

        Under CFG parallel each branch runs on its own ranks: the stats are gathered over the CFG group, so this is a
        collective that every rank must call.
        """
        stats = transformer_teacache_stats(self.transformer)
        cfg_hook = get_cfg_parallel_hook(self.transformer)
        if cfg_hook is None:
            return stats
        gathered: list[Any] = [None] * cfg_hook.groups.cfg_degree
        torch.distributed.all_gather_object(gathered, stats, group=cfg_hook.groups.cfg_group)
        merged: dict[str, dict[str, Any]] = {}
        for rank_stats in gathered:
            merged.update(rank_stats)
        return merged

    # ------------------------------------------------------------------ text encoder

    def set_text_encoder_placement(self, placement: str | TextEncoderPlacementConfig) -> None:
        r"""
        Choose where the text encoder lives under parallelism: `"one_rank"` (the replica leader only; the others drop
        theirs and receive the embeddings), `"replicated"` (every rank) or `"sharded"` (its decoder layers over the
        replica's ranks, FSDP2). Call it on every rank after `enable_sequence_parallel`; model CPU offload is taken
        off and put back around the change. `"one_rank"` cannot give the dropped encoders back and `"sharded"` cannot
        be undone: load the pipeline again to change them.

        Args:
            placement (`str` or [`TextEncoderPlacementConfig`]): `"one_rank"`, `"replicated"` or `"sharded"`.

        Example:

        ```py
        >>> # torchrun --nproc-per-node 2 script.py; rank 1 never loads the encoder
        >>> pipe = QwenImageSPPipeline.from_pretrained(
        ...     "Qwen/Qwen-Image", dtype=torch.bfloat16, **({} if rank == 0 else {"text_encoder": None})
        ... )
        >>> pipe.enable_sequence_parallel(ulysses_degree=2)
        >>> pipe.set_text_encoder_placement("one_rank")
        ```
        """
        if not isinstance(placement, TextEncoderPlacementConfig):
            placement = TextEncoderPlacementConfig(placement=placement)
        with self._model_offload_outside():
            apply_text_encoder_placement(self, placement)

    @property
    def text_encoder_placement(self) -> str | None:
        """The text encoder's placement (`"one_rank"`, `"replicated"`, `"sharded"`), or `None` when none was set."""
        runtime = get_text_encoder_placement(self)
        return None if runtime is None else runtime.config.placement

    def get_image_caption(self, *args: Any, **kwargs: Any) -> str:
        r"""Qwen-Image-Layered's caption of the input image for an empty prompt; under parallelism every rank gets the
        replica leader's (a rank without a text encoder only receives it)."""
        caption = super().get_image_caption
        absent = text_encoder_absent(self) and self.sequence_parallel_enabled
        return self._sync_across_ranks(lambda: None if absent else caption(*args, **kwargs), "the image caption")

    def _prompt_encoding(self, args: tuple, kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
        # This call's plan to encode the prompt and the negative prompt in one encoder forward.
        call = self._call_arguments(args, kwargs)
        return prompt_encoding(self, plan_prompt_pair(call, self._uses_true_cfg(call)))

    # ------------------------------------------------------------------ parallel VAE

    def enable_parallel_vae(self, config: PatchParallelVAEConfig | None = None, **kwargs: Any) -> None:
        r"""
        Split the VAE decode (and the encode of reference images) spatially over the ranks that run one image.
        `enable_sequence_parallel` does it by default (`parallel_vae=True`); call this to choose another config.

        Each rank runs the VAE's low-resolution middle (with its global attention) whole and its own slab of rows,
        with halos, through the rest; the rows are all-gathered, so every rank gets the image of one process, to fp32
        rounding (see `diffusers_qwen_sp.hooks.vae_patch_parallel`). Needs sequence parallelism: the decode group is
        its replica (every `cfg x ring x ulysses` rank of one image), whose ranks all hold the same latents.

        Args:
            config ([`PatchParallelVAEConfig`], *optional*): or its fields as keyword arguments (`decode`, `encode`,
                `split_dim`). Default: decode and encode, along the longer side.

        Example:

        ```py
        >>> # torchrun --nproc-per-node 4 script.py
        >>> pipe.enable_sequence_parallel(ulysses_degree=4)  # each rank decodes a quarter of the image
        >>> pipe.enable_parallel_vae(encode=False)  # reference images encoded whole on every rank
        >>> image = pipe("a red fox in the snow", negative_prompt=" ", true_cfg_scale=4.0).images[0]
        ```
        """
        if config is not None and kwargs:
            raise ValueError(f"Pass either `config` or keyword arguments, not both (got config and {sorted(kwargs)}).")
        runtime = get_sequence_parallel_runtime(self.transformer)
        if runtime is None:
            raise RuntimeError(
                "enable_parallel_vae splits the VAE over the ranks of the sequence parallelism, which is not enabled: "
                "call pipe.enable_sequence_parallel(...) first (on every rank), then pipe.enable_parallel_vae()."
            )
        config = config if config is not None else PatchParallelVAEConfig(**kwargs)
        remove_patch_parallel_vae(self.vae)  # enable_sequence_parallel applies the default config (parallel_vae)
        apply_patch_parallel_vae(self.vae, config, runtime.groups)

    def disable_parallel_vae(self) -> None:
        r"""Remove the parallel VAE (a no-op when it is off): every rank decodes and encodes whole again."""
        if self.vae is not None:
            remove_patch_parallel_vae(self.vae)

    @property
    def parallel_vae_enabled(self) -> bool:
        """Whether the VAE's decode / encode is split over the ranks ([`enable_parallel_vae`])."""
        return self.vae is not None and get_patch_parallel_vae(self.vae) is not None

    # ------------------------------------------------------------------ denoising progress

    def _denoising_step(self) -> DenoisingStep:
        scheduler = self.scheduler
        step_index = scheduler.step_index
        if step_index is None:  # set by the scheduler's first `step()`; the pipelines begin at index 0
            step_index = scheduler.begin_index or 0
        timesteps = getattr(scheduler, "timesteps", None)
        return DenoisingStep(
            step_index=step_index,
            num_inference_steps=None if timesteps is None else len(timesteps),
            timestep=getattr(self, "_current_timestep", None),
        )

    def _call_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, defaults included."""
        bound = inspect.signature(super().__call__).bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    @staticmethod
    def _uses_true_cfg(call: dict[str, Any]) -> bool:
        # The stock rule of every Qwen-Image pipeline: true CFG runs when true_cfg_scale > 1 and a negative prompt or
        # its embeddings are given (the mask may be None: encode_prompt returns None for an unpadded prompt).
        has_negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        return call.get("true_cfg_scale", 1.0) > 1 and has_negative

    @staticmethod
    def _arguments_to_agree_on(call: dict[str, Any]) -> dict[str, Any]:
        return {
            name: describe_argument(call[name], by_value=name in COMPARED_BY_VALUE)
            for name in SAME_ACROSS_RANKS
            if name in call
        }

    def _peer_failure_message(self, error: BaseException) -> str:
        runtime = get_sequence_parallel_runtime(self.transformer)
        timeout = collective_timeout()  # the subgroups are created with the world's timeout
        if timeout is None and runtime is not None:
            timeout = runtime.config.timeout
        lines = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        rank = f"Rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "This rank"
        limit = "the collective timeout" if timeout is None else f"the collective timeout of {timeout:g} s"
        return (
            f"{rank} stopped: a torch.distributed collective failed during the pipeline call under sequence/CFG "
            f"parallelism ({detail}). Another rank most likely raised an exception, died or was interrupted, or did "
            f"not reach the same collective within {limit}. Look at the other ranks' errors for the cause."
        )

    def _parallel_call(self, *args: Any, **kwargs: Any) -> Any:
        parallel = self.sequence_parallel_enabled
        cfg_hook = get_cfg_parallel_hook(self.transformer)
        try:
            if parallel:
                call = self._call_arguments(args, kwargs)
                self._check_offload_devices()
                # Different inputs on different ranks would run different collectives and hang far from the cause.
                groups = get_sequence_parallel_runtime(self.transformer).groups
                if groups.dp_degree == 1 or groups.replica_size > 1:  # over the replica (dp > 1: one request each)
                    check_same_across_ranks(
                        self._arguments_to_agree_on(call), group=groups.replica_group if groups.dp_degree > 1 else None
                    )
                if cfg_hook is not None:
                    cfg_hook.true_cfg = self._uses_true_cfg(call)
            with self.transformer.denoising_progress(self._denoising_step), self._prompt_encoding(args, kwargs):
                return super().__call__(*args, **kwargs)
        except Exception as error:
            if not (parallel and is_collective_failure(error)):
                raise
            # This rank's error only says that a socket closed or a wait timed out; the cause is on another rank.
            raise RuntimeError(self._peer_failure_message(error)) from error
        finally:
            if cfg_hook is not None:  # this call's CFG state ends with it, whether it returned or raised
                cfg_hook.reset_state(self.transformer)

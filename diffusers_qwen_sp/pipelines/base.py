"""What every diffusers_qwen_sp pipeline adds to its stock diffusers parent."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.group_offloading import _get_group_onload_device
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_device

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
from ..models import DenoisingStep, QwenImageSPTransformer2DModel
from ..weight_sharding import (
    WeightShardingConfig,
    apply_weight_sharding,
    get_weight_sharding,
    remove_weight_sharding,
)


# What model_index.json names for the transformer (see `QwenImageSPPipelineMixin.__setattr__`).
STOCK_TRANSFORMER_CLASS_NAME = "QwenImageTransformer2DModel"


logger = logging.get_logger(__name__)

# Why sequential offload is refused under parallelism, and what to use instead (README "what composes with what").
SEQUENTIAL_OFFLOAD_UNSUPPORTED = (
    "enable_sequential_cpu_offload (or a device_map that spreads the transformer: accelerate hooks that move every "
    "layer's weights in from the CPU or meta device on each call) is not supported together with sequence/CFG "
    "parallelism in diffusers_qwen_sp. For the same memory profile use leaf-level group offloading, which composes "
    "with it: pipe.enable_group_offload(onload_device=torch.device('cuda'), offload_type='leaf_level') (add "
    "use_stream=True to overlap transfers), or pipe.enable_model_cpu_offload() for whole-model offloading. Remove "
    "the sequential offload first with pipe.remove_all_hooks()."
)


# Call arguments every rank must pass alike under SP / CFG parallel: they decide the sequence of collectives (steps,
# sizes, CFG on or off) or what the image shows. Not the generator: rank 0's noise is broadcast to every rank.
SAME_ACROSS_RANKS = (
    "prompt",
    "negative_prompt",
    "true_cfg_scale",
    "guidance_scale",
    "height",
    "width",
    "num_inference_steps",
    "sigmas",
    "num_images_per_prompt",
    "max_sequence_length",
    "image",
    "layers",
    "resolution",
    "cfg_normalize",
    "use_en_prompt",
    "prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
    "latents",
)
# Compared by value even when given as an array or a tensor (the others by shape: their values are broadcast).
_COMPARED_BY_VALUE = ("sigmas",)


def describe_argument(value: Any, by_value: bool = False) -> Any:
    r"""
    A small, picklable summary of a pipeline call argument that two ranks can compare: numbers and strings as they
    are, tensors and arrays by shape (by value with `by_value`), images by mode and size, lists item by item.
    """
    if value is None or isinstance(value, (str, bool, numbers.Real)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe_argument(item, by_value) for item in value]
    if isinstance(value, dict):
        return {key: describe_argument(item, by_value) for key, item in value.items()}
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "tolist"):  # a tensor or an array
        return value.tolist() if by_value else f"{type(value).__name__} of shape {tuple(shape)}"
    size, mode = getattr(value, "size", None), getattr(value, "mode", None)
    if isinstance(size, tuple) and isinstance(mode, str):  # a PIL image
        return f"{mode} image of {size[0]}x{size[1]}"
    return type(value).__name__  # never a default repr: it holds a memory address that differs per rank


def stock_parent(pipeline_cls: type) -> type:
    r"""The stock diffusers pipeline class that one of our pipeline classes extends."""
    return next(cls for cls in pipeline_cls.__mro__ if cls.__module__.startswith("diffusers.pipelines."))


class QwenImageSPPipelineMixin:
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

        Args:
            config ([`SequenceParallelConfig`], *optional*): the degrees; or pass its fields as keyword arguments
                (`ulysses_degree`, `ring_degree`, `cfg_degree`, `shard_weights`, ...). Default: Ulysses over all
                processes.

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
            if runtime.config.weight_sharding_group is not None:
                # Its checks (offloading, quantized weights) raise alike on every rank, before any collective.
                apply_weight_sharding(
                    self.transformer, WeightShardingConfig(group=runtime.config.weight_sharding_group), runtime.groups
                )
        except (ValueError, TypeError, RuntimeError):
            self.disable_sequence_parallel()  # all or nothing (the sharding, applied last, is not applied on error)
            raise
        # Not under model offload, whose hooks place the models; group-offloaded models are left alone by `to`.
        if not offloaded and self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            self.to(f"cuda:{torch.cuda.current_device()}")
        logger.info(f"Sequence parallelism enabled: {runtime.groups}")

    def disable_sequence_parallel(self) -> None:
        r"""
        Remove sequence (and CFG) parallelism; the pipeline runs unsharded again (process groups stay initialised).
        Raises a `RuntimeError`, changing nothing, when the weights are sharded (`shard_weights`): FSDP2 cannot be
        undone; load the pipeline again instead.
        """
        remove_weight_sharding(self.transformer)  # raises if the weights are sharded, before anything is removed
        with self._model_offload_outside():
            if get_cfg_parallel_hook(self.transformer) is not None:
                remove_cfg_parallel(self.transformer)
            remove_sequence_parallel(self.transformer)

    @property
    def sequence_parallel_enabled(self) -> bool:
        """Whether sequence parallelism is attached to the transformer."""
        return get_sequence_parallel_runtime(self.transformer) is not None

    def _sync_across_ranks(self, value: Any) -> Any:
        # Every rank must denoise the same inputs, or the sharded results mix different images.
        return broadcast_from_rank0(value) if self.sequence_parallel_enabled else value

    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        r"""The stock `encode_prompt`; under parallelism every rank gets rank 0's embeddings."""
        return self._sync_across_ranks(super().encode_prompt(*args, **kwargs))

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        r"""The stock `prepare_latents`; under parallelism every rank gets rank 0's noise."""
        return self._sync_across_ranks(super().prepare_latents(*args, **kwargs))

    # ------------------------------------------------------------------ offloading

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        r"""
        diffusers' `enable_model_cpu_offload`, with the accelerator defaulting to this rank's own device.

        diffusers defaults to `gpu_id=0`: under `torchrun` every rank would compute on GPU 0. Once torch.distributed
        is initialised, the default is this process's current device (`torch.cuda.current_device()`, which
        `enable_sequence_parallel` sets from `LOCAL_RANK`). The order of the calls does not matter:
        `enable_sequence_parallel` moves an offload chosen before it to this rank's device. One process without
        torch.distributed keeps diffusers' default.

        Args:
            gpu_id (`int`, *optional*): the accelerator index; under sequence parallelism it must be this rank's.
            device (`torch.device` or `str`, *optional*): the accelerator (type, optionally with an index).

        Example:

        ```py
        >>> # torchrun --nproc-per-node 2 script.py
        >>> pipe.enable_sequence_parallel(ulysses_degree=2)
        >>> pipe.enable_model_cpu_offload()  # rank 0 computes on cuda:0, rank 1 on cuda:1
        ```
        """
        self._refuse_offload_of_sharded_weights("enable_model_cpu_offload")
        target = self._offload_target_of_this_rank("enable_model_cpu_offload", gpu_id, device)
        super().enable_model_cpu_offload(**target)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        r"""
        diffusers' `enable_sequential_cpu_offload`; refused (`ValueError`) under sequence/CFG parallelism, where
        leaf-level group offloading gives the same memory profile:
        `pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_type="leaf_level")`.
        """
        if self.sequence_parallel_enabled:
            raise ValueError(SEQUENTIAL_OFFLOAD_UNSUPPORTED)
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def _refuse_offload_of_sharded_weights(self, method: str) -> None:
        if get_weight_sharding(self.transformer) is not None:
            raise ValueError(
                f"{method}: the transformer's weights are sharded across ranks (shard_weights); offloading would move "
                "FSDP's shards behind its back. Sharding already divides the weights by the world size: use one or "
                "the other (load the pipeline again without shard_weights to offload)."
            )

    def _offload_target_of_this_rank(
        self, method: str, gpu_id: int | None, device: torch.device | str | None
    ) -> dict[str, Any]:
        # The arguments for diffusers' offload method: this rank's accelerator unless one was named.
        if not dist.is_initialized():
            return {"gpu_id": gpu_id, "device": device}
        device_type = torch.device(device).type if device is not None else get_device()
        if device_type == "cpu":  # diffusers refuses it without a device, and runs it (for tests) with one
            return {"gpu_id": gpu_id, "device": device}
        current_device = getattr(torch.get_device_module(device_type), "current_device", None)
        if current_device is None:
            return {"gpu_id": gpu_id, "device": device}
        requested = gpu_id if gpu_id is not None else torch.device(device).index if device is not None else None
        index = current_device() if requested is None else requested
        if self.sequence_parallel_enabled and index != current_device():
            raise ValueError(
                f"{method}: got gpu_id/device index {index}, but under sequence parallelism rank {dist.get_rank()} "
                f"computes on {device_type}:{current_device()} (set from LOCAL_RANK by enable_sequence_parallel). "
                f"Leave gpu_id and the device index out: each rank then offloads to its own device."
            )
        # diffusers takes `gpu_id or device index or its previous id`, which drops an index of 0: set the previous.
        self._offload_gpu_id = index
        return {"gpu_id": None, "device": torch.device(device_type)}

    def _accelerate_offload(self) -> str | None:
        # "model" (enable_model_cpu_offload), "sequential" (any other accelerate hook on the transformer root:
        # enable_sequential_cpu_offload or a device map), or None.
        hook = getattr(self.transformer, "_hf_hook", None)
        if hook is None:
            return None
        from accelerate.hooks import CpuOffload

        return "model" if isinstance(hook, CpuOffload) else "sequential"

    @contextlib.contextmanager
    def _model_offload_outside(self) -> Iterator[None]:
        # accelerate puts its model-offload hook on the transformer root by replacing `forward`, and removes and
        # re-adds it after every call (`maybe_free_model_hooks`) by restoring the `forward` it replaced. Registered
        # after it, the CFG-parallel hook (also on the root) would be dropped from the forward after the first call,
        # and removing it would drop accelerate's hook: take model offload off while the root's hooks change, and put
        # it back around them, on this rank's device.
        if self._accelerate_offload() != "model":
            yield
            return
        previous = torch.device(self.transformer._hf_hook.execution_device)
        self.remove_all_hooks()
        try:
            yield
        finally:
            self.enable_model_cpu_offload(device=previous.type)
            if torch.device(self.transformer._hf_hook.execution_device) != previous:
                logger.info(f"Model CPU offload moved from {previous} to this rank's {self._offload_device}.")

    def _check_offload_devices(self) -> None:
        # Group offloading onto an explicit device index other than this rank's would put two ranks on one device.
        if not self.sequence_parallel_enabled:
            return
        for name, component in self.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            try:
                onload = torch.device(_get_group_onload_device(component))
            except ValueError:  # no group offloading on this component
                continue
            if onload.index is None or onload.type == "cpu":
                continue
            current_device = getattr(torch.get_device_module(onload.type), "current_device", None)
            if current_device is None:
                continue
            if onload.index != current_device():
                raise ValueError(
                    f"Group offloading of `{name}` onloads to {onload}, but under sequence parallelism rank "
                    f"{dist.get_rank()} computes on {onload.type}:{current_device()}. Enable group offloading with "
                    f"onload_device=torch.device({onload.type!r}) (no index: each rank's current device)."
                )

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
            name: describe_argument(call[name], by_value=name in _COMPARED_BY_VALUE)
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
                check_same_across_ranks(self._arguments_to_agree_on(call))
                if cfg_hook is not None:
                    cfg_hook.true_cfg = self._uses_true_cfg(call)
            with self.transformer.denoising_progress(self._denoising_step):
                return super().__call__(*args, **kwargs)
        except Exception as error:
            if not (parallel and is_collective_failure(error)):
                raise
            # This rank's error only says that a socket closed or a wait timed out; the cause is on another rank.
            raise RuntimeError(self._peer_failure_message(error)) from error
        finally:
            if cfg_hook is not None:  # this call's CFG state ends with it, whether it returned or raised
                cfg_hook.reset_state(self.transformer)

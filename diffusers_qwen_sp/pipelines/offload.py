"""Offloading under sequence / CFG parallelism: what [`QwenImageSPPipelineMixin`] adds to diffusers' offload methods.

Each rank offloads to its own accelerator (diffusers defaults to GPU 0), model offload stays outside the CFG-parallel
hook on the transformer root, group offloading onto another rank's device is refused on every rank alike, and
sequential offload (or a device map) is refused with what to use instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.group_offloading import _get_group_onload_device
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_device

from ..hooks.sequence_parallel import get_sequence_parallel_runtime
from ..weight_sharding import get_weight_sharding


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


class ParallelOffloadMixin:
    r"""diffusers' offload methods made rank-aware; mixed into [`QwenImageSPPipelineMixin`]."""

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
        # Wrong for one rank only, it is raised on every rank of the replica alike: the others would otherwise go on
        # into the next collective and wait for the rank that raised.
        runtime = get_sequence_parallel_runtime(self.transformer)
        if runtime is None:
            return
        problem, groups = self._offload_device_problem(), runtime.groups
        if groups.replica_size > 1:
            gathered: list[str | None] = [None] * groups.replica_size
            dist.all_gather_object(gathered, problem, group=groups.replica_group)  # one message or None per rank
            problem = next((message for message in gathered if message is not None), None)
        if problem is not None:
            raise ValueError(problem)

    def _offload_device_problem(self) -> str | None:
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
                return (
                    f"Group offloading of `{name}` onloads to {onload}, but under sequence parallelism rank "
                    f"{dist.get_rank()} computes on {onload.type}:{current_device()}. Enable group offloading with "
                    f"onload_device=torch.device({onload.type!r}) (no index: each rank's current device)."
                )
        return None

"""Patch-parallel VAE decode and encode for diffusers' `AutoencoderKLQwenImage`, exact to fp32 rounding.

**Decode.** The decoder is `conv_in -> mid_block -> up_blocks -> head (RMS norm, SiLU, conv_out)`. The mid block holds
a spatial self-attention whose receptive field is the whole latent, so no halo can cover it: every rank runs the cheap
low-resolution part (conv_in and the mid block) on the whole latent. Then the features are cut along one spatial
dimension (height, or width when it is longer) into one slab per rank, with halos that cover the receptive field of
everything after (13 latent rows per side for the real VAE: see `vae_halo` for the arithmetic); each resnet and
upsampler of the up path crops its output to the rows the rest still needs (the halo shrinks as it goes), the
decoder's output is cropped to the rank's own rows, and the rows are all-gathered. Ranks own balanced runs of latent
rows; with fewer latent rows than ranks every rank runs the call whole.

**Encode.** The mirror image: every rank encodes a slab of the image rows, with halos, through conv_in and the down
blocks (each cropping its output), the slabs are all-gathered before the mid block, and the mid block (attention) and
head run on the whole latent on every rank.

Both hold for every frame of a video (the causal feature cache keeps each conv's slab input; the temporal convs are 1x1
in space) and every item of a batch (the layers of `QwenImageLayeredPipeline`). Every rank of the group must call
`decode` / `encode` with the same input, as our pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageDecoder3d, QwenImageEncoder3d
from diffusers.utils import logging

from ..distributed import ParallelGroups, all_gather_dim0
from .registration import register_hooks
from .vae_halo import SlabPlan, StageOp, build_plan, conv_radius, decoder_stages, encoder_stages, stage_op


logger = logging.get_logger(__name__)

# On `vae.decoder` / `vae.encoder`: plans the call, splits (encoder input) or crops and gathers (decoder output).
PATCH_PARALLEL_VAE_HOOK = "diffusers_qwen_sp.vae_patch_parallel"
# On every stage after the split (decoder: mid_block, up-path resnets and upsamplers; encoder: conv_in, down blocks):
# crops the stage's output to the rows the rest needs.
PATCH_PARALLEL_VAE_CROP_HOOK = "diffusers_qwen_sp.vae_patch_parallel.crop"
# On `vae.encoder.mid_block`: all-gathers the slabs before the (global) attention.
PATCH_PARALLEL_VAE_GATHER_HOOK = "diffusers_qwen_sp.vae_patch_parallel.gather"

_SPLIT_DIMS = {"height": 3, "width": 4}  # (B, C, T, H, W)


@dataclass
class PatchParallelVAEConfig:
    r"""
    Configuration of the patch-parallel VAE (see the module docstring).

    Args:
        decode (`bool`, defaults to `True`):
            Split the decode over the ranks.
        encode (`bool`, defaults to `True`):
            Split the encode (reference images of the edit pipelines) over the ranks.
        split_dim (`str`, defaults to `"auto"`):
            `"height"`, `"width"`, or `"auto"`: the longer of the two at each call (height on a tie), which keeps the
            halos small next to the slabs.
    """

    decode: bool = True
    encode: bool = True
    split_dim: str = "auto"

    def __post_init__(self) -> None:
        for name in ("decode", "encode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PatchParallelVAEConfig.{name} must be a bool, got {getattr(self, name)!r}.")
        if not (self.decode or self.encode):
            raise ValueError(
                "PatchParallelVAEConfig with decode=False and encode=False splits nothing; leave one on, or do not "
                "apply the patch-parallel VAE."
            )
        if self.split_dim not in ("auto", *_SPLIT_DIMS):
            raise ValueError(
                f"PatchParallelVAEConfig.split_dim must be 'auto', 'height' or 'width', got {self.split_dim!r}."
            )


# ---------------------------------------------------------------------------------------------------- runtime and hooks


class PatchParallelVAERuntime:
    r"""What the hooks of one VAE share: the group, the stages' halo rules, and the plan of the running call."""

    def __init__(self, config: PatchParallelVAEConfig, group: dist.ProcessGroup | None, vae: nn.Module) -> None:
        self.config = config
        self.group = group
        self.degree = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        # (side, dim) -> ops of the stages after the split; the decoder's head conv_out is its last op
        self.ops: dict[tuple[str, int], list[StageOp]] = {}
        for dim in _SPLIT_DIMS.values():
            if config.decode:
                ops = [stage_op(module, dim, name) for name, module in decoder_stages(vae.decoder)]
                self.ops["decode", dim] = ops + [StageOp("conv", conv_radius(vae.decoder.conv_out, dim, "conv_out"))]
            if config.encode:
                self.ops["encode", dim] = [stage_op(module, dim, name) for name, module in encoder_stages(vae.encoder)]
        self.active: dict[str, SlabPlan | None] = {"decode": None, "encode": None}
        self._told_whole = False

    def plan(self, side: str, x: torch.Tensor) -> SlabPlan | None:
        """This rank's plan for a call whose split-point tensor (decode: latent, encode: image) is `x`."""
        if self.degree == 1:
            return None
        height, width = x.shape[3], x.shape[4]
        name = self.config.split_dim
        if name == "auto":
            name = "width" if width > height else "height"
        dim = _SPLIT_DIMS[name]
        ops = self.ops[side, dim]
        # The ranks own runs of latent rows: the decoder's input rows, or the rows the encoder's stages end with.
        units = n_in = x.shape[dim]
        for op in ops if side == "encode" else ():
            units = op.out_len(units)
        plan = build_plan(ops, n_in, self.degree, self.rank, units, dim)
        if plan is None and not self._told_whole and self.rank == 0:
            logger.info(
                f"Patch-parallel VAE: {units} latent rows along the {name} do not split over {self.degree} ranks; "
                "every rank runs such calls whole."
            )
            self._told_whole = True
        return plan

    def gather(self, local: torch.Tensor, plan: SlabPlan) -> torch.Tensor:
        """Every rank's rows along the split dimension, concatenated in rank order."""
        dim, longest = plan.dim, max(plan.lengths)
        if local.shape[dim] < longest:  # gloo's all-gather needs equal shapes: pad the shorter slabs, crop after
            pad = [0, 0] * (local.ndim - 1 - dim) + [0, longest - local.shape[dim]]
            local = nn.functional.pad(local, pad)
        # (B, C, T, L, W) per rank -> (P, B, C, T, L, W)
        gathered = all_gather_dim0(local.unsqueeze(0), self.group, self.degree)
        # P x (B, C, T, L_r, W) -> (B, C, T, sum L_r, W)
        return torch.cat([gathered[r].narrow(dim, 0, length) for r, length in enumerate(plan.lengths)], dim=dim)

    def __repr__(self) -> str:
        return f"PatchParallelVAERuntime(rank={self.rank}/{self.degree}, {self.config})"


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


def _replace_first(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "x": value}


class _RuntimeHook(ModelHook):
    def __init__(self, runtime: PatchParallelVAERuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.runtime})"


class PatchParallelDecoderHook(_RuntimeHook):
    r"""On `vae.decoder`: plans the call, runs the decoder (whose stage hooks split and crop), gathers the rows."""

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.runtime.plan("decode", _first_tensor(args, kwargs))
        if plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        self.runtime.active["decode"] = plan
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.runtime.active["decode"] = None
        output = plan.crops[-1].apply(output, plan.dim, "decoder")  # (.., slab + halo, ..) -> (.., own rows, ..)
        return self.runtime.gather(output, plan)


class PatchParallelEncoderHook(_RuntimeHook):
    r"""On `vae.encoder`: plans the call and hands the encoder this rank's slab of the image (with its halo)."""

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = _first_tensor(args, kwargs)
        plan = self.runtime.plan("encode", x)
        if plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        args, kwargs = _replace_first(args, kwargs, plan.crops[0].apply(x, plan.dim, "the encoder's input"))
        self.runtime.active["encode"] = plan
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.runtime.active["encode"] = None


class PatchParallelCropHook(ModelHook):
    r"""Crops a stage's output to the rows the rest of the decoder / encoder needs (`crops[index]` of the plan)."""

    def __init__(self, runtime: PatchParallelVAERuntime, side: str, index: int, name: str) -> None:
        super().__init__()
        self.runtime, self.side, self.index, self.name = runtime, side, index, name

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        plan = self.runtime.active[self.side]
        if plan is None:
            return output
        return plan.crops[self.index].apply(output, plan.dim, self.name)

    def __repr__(self) -> str:
        return f"PatchParallelCropHook({self.name}, crop {self.index})"


class PatchParallelGatherHook(_RuntimeHook):
    r"""On `vae.encoder.mid_block`: all-gathers the ranks' latent rows before the mid block's global attention."""

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        plan = self.runtime.active["encode"]
        if plan is None:
            return args, kwargs
        return _replace_first(args, kwargs, self.runtime.gather(_first_tensor(args, kwargs), plan))


# ---------------------------------------------------------------------------------------------------- apply / remove


def _resolve_group(group_or_groups: Any) -> dist.ProcessGroup | None:
    if isinstance(group_or_groups, ParallelGroups):
        return group_or_groups.replica_group  # None: a one-rank replica
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "apply_patch_parallel_vae: torch.distributed is not initialised. Start the ranks with torchrun (or "
            "init_process_group) first, or pass the ParallelGroups of an enabled sequence parallelism."
        )
    if group_or_groups is None:
        return dist.group.WORLD
    if isinstance(group_or_groups, dist.ProcessGroup):
        return group_or_groups
    raise TypeError(
        "apply_patch_parallel_vae: group_or_groups must be a ParallelGroups, a torch.distributed ProcessGroup or None "
        f"(the world), got {type(group_or_groups).__name__}."
    )


def get_patch_parallel_vae(vae: nn.Module) -> PatchParallelVAERuntime | None:
    r"""The runtime of the patch-parallel VAE applied to `vae`, or `None`."""
    for part in ("decoder", "encoder"):
        registry = getattr(getattr(vae, part, None), "_diffusers_hook", None)
        hook = registry.get_hook(PATCH_PARALLEL_VAE_HOOK) if registry is not None else None
        if hook is not None:
            return hook.runtime
    return None


def apply_patch_parallel_vae(
    vae: nn.Module,
    config: PatchParallelVAEConfig | None = None,
    group_or_groups: ParallelGroups | dist.ProcessGroup | None = None,
) -> PatchParallelVAERuntime:
    r"""
    Split the VAE's decode (and encode) spatially over the ranks of a group; every rank gets the whole result.

    Equal to the stock decode / encode to fp32 rounding (see the module docstring for the design and the halo
    arithmetic). Every rank of the group must call `vae.decode` / `vae.encode` with the same input.

    Args:
        vae (`AutoencoderKLQwenImage`): the VAE, patched in place through diffusers hooks on its decoder and encoder.
        config ([`PatchParallelVAEConfig`], *optional*): what to split; default: decode and encode, along the longer
            side.
        group_or_groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`] or `ProcessGroup`, *optional*): the ranks
            to split over: a `ParallelGroups` means its replica (every rank that runs one image), a process group
            itself, `None` the world.

    Returns:
        `PatchParallelVAERuntime`: the state the hooks share.

    Example:

    ```py
    >>> # torchrun --nproc-per-node 4 script.py
    >>> import torch.distributed as dist
    >>> from diffusers import AutoencoderKLQwenImage
    >>> from diffusers_qwen_sp.hooks import PatchParallelVAEConfig, apply_patch_parallel_vae, remove_patch_parallel_vae

    >>> dist.init_process_group("nccl")
    >>> vae = AutoencoderKLQwenImage.from_pretrained("Qwen/Qwen-Image", subfolder="vae").to(f"cuda:{dist.get_rank()}")
    >>> apply_patch_parallel_vae(vae, PatchParallelVAEConfig())
    >>> image = vae.decode(latents).sample  # the same latents on every rank; each decodes a quarter
    >>> remove_patch_parallel_vae(vae)
    ```
    """
    config = config if config is not None else PatchParallelVAEConfig()
    if not isinstance(config, PatchParallelVAEConfig):
        raise TypeError(f"config must be a PatchParallelVAEConfig, got {type(config).__name__}.")
    decoder, encoder = getattr(vae, "decoder", None), getattr(vae, "encoder", None)
    if not isinstance(decoder, QwenImageDecoder3d) or not isinstance(encoder, QwenImageEncoder3d):
        raise TypeError(
            f"apply_patch_parallel_vae supports diffusers' AutoencoderKLQwenImage, got {type(vae).__name__}; "
            "decode other VAEs whole."
        )
    if get_patch_parallel_vae(vae) is not None:
        raise RuntimeError("The patch-parallel VAE is already applied; call remove_patch_parallel_vae(vae) first.")
    runtime = PatchParallelVAERuntime(config, _resolve_group(group_or_groups), vae)  # validates before hooking

    targets: list[tuple[nn.Module, ModelHook, str]] = []
    if config.decode:
        # crops[0] on the mid block's output (the split), crops[i] on up-path stage i; the last on the decoder's output
        targets.append((decoder.mid_block, PatchParallelCropHook(runtime, "decode", 0, "decoder.mid_block"), ""))
        for index, (name, module) in enumerate(decoder_stages(decoder), start=1):
            targets.append((module, PatchParallelCropHook(runtime, "decode", index, name), ""))
        targets.append((decoder, PatchParallelDecoderHook(runtime), PATCH_PARALLEL_VAE_HOOK))
    if config.encode:
        for index, (name, module) in enumerate(encoder_stages(encoder), start=1):
            targets.append((module, PatchParallelCropHook(runtime, "encode", index, name), ""))
        targets.append((encoder.mid_block, PatchParallelGatherHook(runtime), PATCH_PARALLEL_VAE_GATHER_HOOK))
        targets.append((encoder, PatchParallelEncoderHook(runtime), PATCH_PARALLEL_VAE_HOOK))
    register_hooks(vae, [(module, hook, name or PATCH_PARALLEL_VAE_CROP_HOOK) for module, hook, name in targets])
    logger.info(f"Patch-parallel VAE applied: {runtime}")
    return runtime


def remove_patch_parallel_vae(vae: nn.Module) -> None:
    r"""Undo [`apply_patch_parallel_vae`] (a no-op when it is not applied): the VAE decodes and encodes whole again."""
    names = (PATCH_PARALLEL_VAE_HOOK, PATCH_PARALLEL_VAE_GATHER_HOOK, PATCH_PARALLEL_VAE_CROP_HOOK)
    for module in vae.modules():  # each module holds at most one of our hooks
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in names:
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(vae).invalidate_child_registries_cache()

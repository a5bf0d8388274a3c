"""The halo arithmetic of the patch-parallel VAE (`vae_patch_parallel`): which rows each stage of the Qwen-Image VAE
reads, derived from its modules, and the crops of one rank's slab.

Rows are half-open intervals `[lo, hi)` along the split dimension. Backwards from the rows a rank owns at the end,
each stage's input interval is the rows its output interval reads; forwards, each stage's output is cropped to what
the next stage reads. At the image border a slab has the stock zero padding; inside the image the zero padding of a
slab edge only corrupts rows the next crop drops. Every norm on the way is an RMS norm over channels (local).

**Decode**, for the real Qwen-Image VAE (`dim_mult=(1, 2, 4, 4)`, 2 + 1 resnets of two 3x3 convs per up block, three
nearest x2 upsamplers each followed by a 3x3 conv), counting backwards from a slab edge of the output (rows per side,
at the resolution named):

    head conv_out:                        1 row at 8x
    up_blocks[3]: 6 convs                 1 + 6 = 7 rows at 8x
    up_blocks[2]: upsampler conv at 8x    7 + 1 = 8 at 8x -> 8 / 2 = 4 at 4x;  + 6 convs = 10 at 4x
    up_blocks[1]: upsampler conv at 4x    10 + 1 = 11 at 4x -> ceil(11 / 2) = 6 at 2x;  + 6 = 12 at 2x
    up_blocks[0]: upsampler conv at 2x    12 + 1 = 13 at 2x -> ceil(13 / 2) = 7 at 1x;  + 6 = 13 latent rows

so a slab is its latent rows plus 13 on each side (clipped at the image border), and enters the last up block with 7
output rows per side. A slab smaller than the halo is still exact (the halo reaches over the neighbours' rows).

**Encode.** A stride-2 downsampler pads one zero row after the end only, so the halo is asymmetric. For the real VAE,
from the latent rows `[A, B)` backwards: 4 convs at 8x `[A-4, B+4)`; downsample `[2A-8, 2B+9)`, + 4 convs
`[2A-12, 2B+13)` at 4x; downsample `[4A-24, 4B+27)`, + 4 `[4A-28, 4B+31)` at 2x; downsample `[8A-56, 8B+63)`, + 4
`[8A-60, 8B+67)`, conv_in `[8A-61, 8B+68)` image rows: 61 rows above, 68 below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
    QwenImageAttentionBlock,
    QwenImageResample,
    QwenImageResidualBlock,
)


@dataclass(frozen=True)
class StageOp:
    r"""
    What one stage does along the split dimension, for the halo arithmetic. Rows are half-open intervals `[lo, hi)`.

    - `conv`: stride-1 convolutions with "same" zero padding, `radius` rows in all (a resnet: 1 + 1).
    - `up`: nearest x2 (output row `r` is input row `r // 2`), then a conv of `radius`.
    - `down`: one zero row padded after the end, then a 3-tap conv of stride 2 (output row `r` reads `2r .. 2r + 2`).
    """

    kind: str
    radius: int = 0

    def out_len(self, n: int) -> int:
        if self.kind == "conv":
            return n
        if self.kind == "up":
            return 2 * n
        return max(0, (n + 1 - 3) // 2 + 1)

    def needed_input(self, lo: int, hi: int, n_in: int) -> tuple[int, int]:
        """The input rows that output rows `[lo, hi)` read (clipped to the `n_in` rows there are)."""
        if self.kind == "conv":
            return max(lo - self.radius, 0), min(hi + self.radius, n_in)
        if self.kind == "up":
            up_lo, up_hi = max(lo - self.radius, 0), min(hi + self.radius, 2 * n_in)
            return up_lo // 2, (up_hi - 1) // 2 + 1
        return 2 * lo, min(2 * hi + 1, n_in)

    def computed_output(self, lo: int, hi: int) -> tuple[int, int]:
        """The output rows a slab holding input rows `[lo, hi)` yields (edge rows may be wrong: the halo drops them)."""
        if self.kind == "conv":
            return lo, hi
        if self.kind == "up":
            return 2 * lo, 2 * hi
        if lo % 2:
            raise RuntimeError(f"A stride-2 stage got a slab starting at odd row {lo}: the halo plan is inconsistent.")
        return lo // 2, lo // 2 + self.out_len(hi - lo)


@dataclass(frozen=True)
class Crop:
    """Keep `length` rows from `start` of a tensor that must have `expected` rows along the split dimension."""

    start: int
    length: int
    expected: int

    def apply(self, tensor: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        if tensor.shape[dim] != self.expected:
            raise RuntimeError(
                f"Patch-parallel VAE: {where} yielded {tensor.shape[dim]} rows along dim {dim} of "
                f"{tuple(tensor.shape)}, the halo plan expected {self.expected}. The VAE's architecture differs from "
                "the one the plan was derived from; remove_patch_parallel_vae(vae) and decode/encode whole."
            )
        if self.start == 0 and self.length == self.expected:
            return tensor
        # (B, C, T, N, W) -> (B, C, T, length, W) (or along W); contiguous so that the larger slab is freed now
        return tensor.narrow(dim, self.start, self.length).contiguous()


@dataclass(frozen=True)
class SlabPlan:
    r"""
    One call's split: `crops[0]` cuts the slab (decoder: the mid block's output; encoder: the image), `crops[i]` is
    applied to stage `i`'s output (decoder: the last one to the decoder's output), `lengths` are every rank's rows
    at the gather.
    """

    dim: int
    crops: tuple[Crop, ...]
    lengths: tuple[int, ...]


def balanced_runs(n: int, degree: int) -> list[tuple[int, int]]:
    """`degree` runs of consecutive units covering `[0, n)`, lengths differing by at most one."""
    quotient, remainder = divmod(n, degree)
    bounds, start = [], 0
    for rank in range(degree):
        length = quotient + (rank < remainder)
        bounds.append((start, start + length))
        start += length
    return bounds


def build_plan(ops: list[StageOp], n_in: int, degree: int, rank: int, units: int, dim: int = 3) -> SlabPlan | None:
    r"""
    The crops of rank `rank` of `degree` for stages `ops` applied to `n_in` rows, or `None` when not every rank
    gets one of the `units` (latent rows) the output is split into.

    Backwards from the rank's output rows, each stage's input interval is the rows its output interval reads
    ([`StageOp.needed_input`]); forwards, each stage's output is cropped to what the next stage needs.
    """
    lengths = [n_in]
    for op in ops:
        lengths.append(op.out_len(lengths[-1]))
    n_out = lengths[-1]
    if units < degree or n_out % units:
        return None
    scale = n_out // units
    cores = [(lo * scale, hi * scale) for lo, hi in balanced_runs(units, degree)]
    needed = [cores[rank]]
    for op, n in zip(reversed(ops), reversed(lengths[:-1])):
        needed.append(op.needed_input(*needed[-1], n))
    needed.reverse()
    crops = [Crop(needed[0][0], needed[0][1] - needed[0][0], n_in)]
    for op, (lo, hi), (want_lo, want_hi) in zip(ops, needed[:-1], needed[1:]):
        got_lo, got_hi = op.computed_output(lo, hi)
        if not got_lo <= want_lo <= want_hi <= got_hi:
            raise RuntimeError(f"Patch-parallel VAE: the halo plan does not cover rows {want_lo}..{want_hi}.")
        crops.append(Crop(want_lo - got_lo, want_hi - want_lo, got_hi - got_lo))
    return SlabPlan(dim=dim, crops=tuple(crops), lengths=tuple(hi - lo for lo, hi in cores))


# ---------------------------------------------------------------------------------------------------- from the modules


def conv_radius(conv: nn.Module, dim: int, owner: str) -> int:
    """Rows a stride-1 "same" conv reads on each side along `dim` (3: height, 4: width of a 5D tensor)."""
    kernel = conv.kernel_size[-2 if dim == 3 else -1]
    stride = conv.stride[-2 if dim == 3 else -1]
    # QwenImageCausalConv3d pads in forward: `_padding` = (w, w, h, h, 2t, 0); a Conv2d keeps `padding` = (h, w)
    padding = conv._padding[2 if dim == 3 else 0] if hasattr(conv, "_padding") else conv.padding[-2 if dim == 3 else -1]
    if stride != 1 or kernel != 2 * padding + 1:
        raise ValueError(
            f"Patch-parallel VAE: {owner} has kernel {kernel}, stride {stride}, padding {padding} along the split "
            "dimension; only stride-1 'same' convolutions are supported. Decode/encode this VAE whole."
        )
    return padding


def stage_op(module: nn.Module, dim: int, owner: str) -> StageOp:
    """The halo rule of one stage of the up or down path; a `ValueError` for a stage no halo can cover."""
    if isinstance(module, QwenImageResidualBlock):
        shortcut = module.conv_shortcut
        if not isinstance(shortcut, nn.Identity):
            conv_radius(shortcut, dim, f"{owner}.conv_shortcut")  # 1x1: reads no neighbour
        radius = conv_radius(module.conv1, dim, f"{owner}.conv1") + conv_radius(module.conv2, dim, f"{owner}.conv2")
        return StageOp("conv", radius)
    if isinstance(module, QwenImageResample) and module.mode in ("upsample2d", "upsample3d"):
        upsample, conv = module.resample
        if tuple(upsample.scale_factor) != (2.0, 2.0) or upsample.mode not in ("nearest", "nearest-exact"):
            raise ValueError(f"Patch-parallel VAE: {owner} upsamples by {upsample.scale_factor} ({upsample.mode}).")
        return StageOp("up", conv_radius(conv, dim, f"{owner}.resample.1"))
    if isinstance(module, QwenImageResample) and module.mode in ("downsample2d", "downsample3d"):
        pad, conv = module.resample
        kernel, stride = conv.kernel_size[dim - 3], conv.stride[dim - 3]
        if tuple(pad.padding) != (0, 1, 0, 1) or kernel != 3 or stride != 2 or tuple(conv.padding) != (0, 0):
            raise ValueError(f"Patch-parallel VAE: {owner} is not a zero-pad (0, 1) + 3x3 stride-2 downsampler.")
        return StageOp("down")
    if isinstance(module, QwenImageAttentionBlock):
        raise ValueError(
            f"Patch-parallel VAE: {owner} is a spatial attention (global receptive field) outside the mid block, so "
            "no halo covers it. Use PatchParallelVAEConfig(encode=False) for this VAE."
        )
    if isinstance(module, nn.Conv3d):
        return StageOp("conv", conv_radius(module, dim, owner))
    raise ValueError(f"Patch-parallel VAE: no halo rule for {owner} ({type(module).__name__}).")


def decoder_stages(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the up path in forward order: every resnet, then the upsampler, of every up block."""
    stages = []
    for i, block in enumerate(decoder.up_blocks):
        stages += [(f"decoder.up_blocks.{i}.resnets.{j}", resnet) for j, resnet in enumerate(block.resnets)]
        if block.upsamplers is not None:
            stages.append((f"decoder.up_blocks.{i}.upsamplers.0", block.upsamplers[0]))
    return stages


def encoder_stages(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the down path in forward order: conv_in, then every layer of `down_blocks`."""
    return [("encoder.conv_in", encoder.conv_in)] + [
        (f"encoder.down_blocks.{i}", layer) for i, layer in enumerate(encoder.down_blocks)
    ]

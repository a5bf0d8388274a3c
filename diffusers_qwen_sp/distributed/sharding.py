"""The layout of a sequence sharded over a sequence-parallel group, computed in one place.

A sequence of `seq_len` tokens is zero-padded to a multiple of the group size `P` and split into `P` equal chunks;
chunk `r` (the SP rank) holds global positions `[r * L, (r + 1) * L)` with `L = ceil(seq_len / P)`. The padding is a
suffix of the last chunks: the attention never uses it as a key and the gather cuts it off, so any length works.
[`sp_shard_bounds`] computes that layout; the split, the gather, the attention and TeaCache all read it from the
[`ShardBounds`] that travels with the forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ShardBounds(NamedTuple):
    """Where one rank's chunk of a zero-padded, evenly split sequence lies."""

    start: int
    """First global position of the chunk (in the padded sequence)."""
    end: int
    """One past the last global position of the chunk."""
    local_len: int
    """Chunk length, the same on every rank: `ceil(seq_len / world_size)`."""
    padded_len: int
    """`local_len * world_size`."""
    valid_len: int
    """How many positions of the chunk are real tokens (`< seq_len`); the rest is padding."""
    seq_len: int
    """Real tokens of the whole sequence."""

    @property
    def is_sharded(self) -> bool:
        """Whether the sequence is split over more than one rank (this chunk is not the whole sequence)."""
        return self.padded_len != self.local_len


def sp_shard_bounds(seq_len: int, world_size: int, rank: int) -> ShardBounds:
    r"""
    Bounds of chunk `rank` when a sequence of `seq_len` tokens is zero-padded to a multiple of `world_size` and split
    into `world_size` equal chunks (the layout [`~diffusers_qwen_sp.attention.joint_attention`] expects).

    Args:
        seq_len (`int`): number of real tokens.
        world_size (`int`): number of chunks (the SP world size).
        rank (`int`): chunk index (the SP rank).

    Example:

    ```py
    >>> sp_shard_bounds(5, 4, 2)  # chunks of 2: [0, 2) [2, 4) [4, 6) [6, 8); positions 5.. are padding
    ShardBounds(start=4, end=6, local_len=2, padded_len=8, valid_len=1, seq_len=5)
    ```
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need world_size >= 1 and 0 <= rank < world_size, got world_size={world_size}, rank={rank}.")
    if seq_len < 0:
        raise ValueError(f"`seq_len` must be >= 0, got {seq_len}.")
    local_len = -(-seq_len // world_size)  # ceil(S / P)
    start = rank * local_len
    end = start + local_len
    valid_len = max(0, min(end, seq_len) - start)
    return ShardBounds(start, end, local_len, local_len * world_size, valid_len, seq_len)


def take_shard(tensor: torch.Tensor, dim: int, bounds: ShardBounds) -> torch.Tensor:
    r"""
    This rank's chunk of `tensor` along `dim`: `(.., seq_len, ..) -> (.., local_len, ..)`, zero-padded past the end.

    Args:
        tensor (`torch.Tensor`): the whole sequence; `tensor.shape[dim]` must be `bounds.seq_len`.
        dim (`int`): the sequence dimension.
        bounds ([`ShardBounds`]): from [`sp_shard_bounds`].
    """
    if tensor.shape[dim] != bounds.seq_len:
        raise ValueError(
            f"Cannot shard a sequence of {tensor.shape[dim]} tokens (dim {dim} of {tuple(tensor.shape)}) with bounds for "
            f"{bounds.seq_len}: every tensor split in one forward must have the same sequence length."
        )
    if not bounds.is_sharded:
        return tensor
    padding = bounds.padded_len - bounds.seq_len
    if padding:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = padding
        # (.., S, ..) -> (.., P * ceil(S/P), ..): zero tokens at the end, never keys in attention, cut by the gather
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    # (.., P * L, ..) -> (.., L, ..): the chunk of this rank, in storage of its own (a contiguous narrow, e.g. of a
    # batch of 1, would be a view that keeps the whole sequence alive through every block)
    return tensor.narrow(dim, bounds.start, bounds.local_len).clone(memory_format=torch.contiguous_format)


__all__ = ["ShardBounds", "sp_shard_bounds", "take_shard"]

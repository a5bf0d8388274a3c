"""All attention of diffusers_qwen_sp in one place.

- [`attention_with_lse`]: one attention block returning its output and its log-sum-exp (LSE), on several kernels.
- [`merge_attention_blocks`]: exact merge of two blocks computed over disjoint key sets.
- [`joint_attention`]: Qwen-Image's joint `[text, image]` attention with the image sequence sharded over a
  sequence-parallel group: Ulysses (all-to-all over heads), Ring (K/V blocks passed around), or both (USP).
- [`SequenceParallelAttnProcessor`]: the diffusers attention processor that runs `joint_attention` in every block
  while sequence parallelism is on.

The collectives are `diffusers_qwen_sp.distributed`'s; nothing here counts or records anything, so `torch.compile`
traces a block whole (benchmarks count bytes from outside, with `distributed.count_communication`).

Layouts: tensors are `(B, S, H, D)` (batch, sequence, heads, head dim), as diffusers' attention dispatch uses. The
LSE is `(B, H, S)` in float32 (the layout every PyTorch and flash-attn kernel returns it in, so no copy is needed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from diffusers.utils import logging

from .distributed import all_to_all_dim0, drain, ring_exchange, wait_all


if TYPE_CHECKING:
    from .distributed import ParallelGroups, ShardBounds


logger = logging.get_logger(__name__)

__all__ = [
    "ATTENTION_BACKENDS",
    "check_attention_backend",
    "attention_with_lse",
    "joint_attention",
    "merge_attention_blocks",
    "SequenceParallelAttnProcessor",
]

# Named as diffusers names the same kernels (`diffusers.models.attention_dispatch.AttentionBackendName`); `math` is ours.
ATTENTION_BACKENDS = ("auto", "_native_flash", "_native_efficient", "flash", "math")
# Names of earlier releases -> today's.
_RENAMED_BACKENDS = {"cpu_flash": "_native_flash", "efficient": "_native_efficient", "flash_attn": "flash"}

# The efficient (xformers-style) CUDA kernel wants the bias rows aligned to 16 elements.
_MEM_EFFICIENT_ALIGNMENT = 16


# ---------------------------------------------------------------------------------------------------------------------
# Per-block kernels
# ---------------------------------------------------------------------------------------------------------------------


def check_attention_backend(backend: str, owner: str = "attention backend") -> None:
    r"""Raise a `ValueError` naming `owner` unless `backend` is one of [`ATTENTION_BACKENDS`]."""
    if backend in ATTENTION_BACKENDS:
        return
    if backend in _RENAMED_BACKENDS:
        raise ValueError(
            f"{owner}={backend!r} is now called {_RENAMED_BACKENDS[backend]!r}, the name diffusers gives the same "
            "kernel; pass that instead."
        )
    raise ValueError(f"{owner}={backend!r} is unknown; choose one of {list(ATTENTION_BACKENDS)}.")


def _resolve_backend(backend: str, query: torch.Tensor, key_mask: torch.Tensor | None) -> str:
    check_attention_backend(backend)
    if backend != "auto":
        return backend
    if query.device.type == "cpu":
        return "_native_flash"
    if query.device.type == "cuda":
        head_dim = query.shape[-1]
        if (
            key_mask is None
            and query.dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0
            and head_dim <= 256
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(query.device)[0] >= 8  # flash kernels need Ampere or newer
        ):
            return "_native_flash"
        return "_native_efficient"
    return "math"


def _attention_math(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, Sq, H, D) x (B, Sk, H, D) -> (B, H, Sq, Sk), float32
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * scale
    if key_mask is not None:
        # (B, Sk) -> (B, 1, 1, Sk)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq); -inf where every key is masked
    # A fully masked row has lse = -inf; subtracting 0 instead keeps exp(-inf) = 0 rather than exp(nan).
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, value.float())  # (B, H, Sq, Sk) x (B, Sk, H, D) -> (B, Sq, H, D)
    return out, lse


def _additive_bias(key_mask: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """(B, Sk) bool -> (B, 1, 1, Sk) additive bias (0 keep, -inf drop), rows allocated with a multiple of `align`."""
    batch, seq_k = key_mask.shape
    padded = -(-seq_k // align) * align
    bias = torch.zeros(batch, 1, 1, padded, dtype=dtype, device=key_mask.device)[..., :seq_k]
    bias.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return bias


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Non-causal attention of one block that also returns the log-sum-exp of the scores, so that blocks computed over
    disjoint key sets can be merged exactly with [`merge_attention_blocks`].

    Args:
        query (`torch.Tensor`): `(B, Sq, H, D)`.
        key (`torch.Tensor`): `(B, Sk, H, D)`.
        value (`torch.Tensor`): `(B, Sk, H, D)`.
        key_mask (`torch.Tensor`, *optional*):
            `(B, Sk)` bool, `True` for keys to attend to. A query whose keys are all masked gets output 0 and LSE
            `-inf` (never NaN), so that merging it with other blocks is a no-op.
        scale (`float`, *optional*): softmax scale; defaults to `D ** -0.5`.
        backend (`str`, defaults to `"auto"`):
            Named as diffusers names the same kernels:
            - `"_native_flash"`: PyTorch's flash kernel: on CPU `aten._scaled_dot_product_flash_attention_for_cpu`
              (takes an additive mask), on CUDA `aten._scaled_dot_product_flash_attention` (fp16/bf16, no mask).
            - `"_native_efficient"`: CUDA `aten._scaled_dot_product_efficient_attention` (takes an additive bias).
            - `"flash"`: the `flash-attn` package (`flash_attn_func`); fp16/bf16, no mask.
            - `"math"`: explicit float32 softmax; any device, any mask.
            - `"auto"`: `_native_flash` on CPU; on CUDA `_native_flash` when there is no mask and the dtype and head
              size allow it, else `_native_efficient`; `math` elsewhere.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the output `(B, Sq, H, D)` in `query.dtype` and the LSE `(B, H, Sq)` in
        float32.
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"Expected (B, S, H, D) tensors, got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}."
        )
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(
            f"Incompatible shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}."
        )
    batch, seq_q, heads, head_dim = query.shape
    seq_k = key.shape[1]
    if key_mask is not None:
        if key_mask.shape != (batch, seq_k):
            raise ValueError(f"`key_mask` must have shape (B, Sk) = {(batch, seq_k)}, got {tuple(key_mask.shape)}.")
        key_mask = key_mask.to(device=query.device, dtype=torch.bool)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if seq_k == 0:
        out = query.new_zeros(query.shape)
        lse = torch.full((batch, heads, seq_q), float("-inf"), dtype=torch.float32, device=query.device)
        return out, lse

    backend = _resolve_backend(backend, query, key_mask)
    if backend == "_native_flash" and query.device.type == "cpu":
        bias = None if key_mask is None else _additive_bias(key_mask, query.dtype)
        # (B, S, H, D) -> (B, H, S, D): views, the kernel takes strided inputs.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.0, False, attn_mask=bias, scale=scale
        )
        out = out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)
    elif backend == "math":
        out, lse = _attention_math(query, key, value, key_mask, scale)
    elif backend == "_native_flash":
        if key_mask is not None:
            raise ValueError(
                "The `_native_flash` backend takes no mask on CUDA; use `_native_efficient`, `math` or `auto` with a "
                "key_mask."
            )
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.0, False, False, scale=scale
        )[:2]
        out = out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)
    elif backend == "_native_efficient":
        bias = None
        if key_mask is not None:
            # (B, 1, 1, Sk) -> (B, H, Sq, Sk) broadcast view (stride 0), rows 16-aligned as the kernel requires.
            bias = _additive_bias(key_mask, query.dtype, _MEM_EFFICIENT_ALIGNMENT).expand(batch, heads, seq_q, seq_k)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bias, True, 0.0, False, scale=scale
        )[:2]
        out = out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)
        lse = lse[:, :, :seq_q]  # the kernel may pad the LSE rows to a multiple of 32
    elif backend == "flash":
        if key_mask is not None:
            raise ValueError(
                "The `flash` backend (flash-attn) takes no mask; use `_native_efficient`, `math` or `auto` with a "
                "key_mask."
            )
        try:
            from flash_attn import flash_attn_func
        except ImportError as error:
            raise ImportError(
                "The `flash` backend needs the `flash-attn` package: `pip install flash-attn` (or use `auto`)."
            ) from error
        out, lse, _ = flash_attn_func(
            query, key, value, dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True
        )  # (B, Sq, H, D), (B, H, Sq)
    else:  # pragma: no cover - _resolve_backend validated the name
        raise AssertionError(backend)

    out = out.to(query.dtype)
    lse = lse.float()
    if key_mask is not None:
        # Kernels disagree on rows with no key (0/0, or lse 0); define them as out 0, lse -inf.
        empty = ~key_mask.any(dim=1)  # (B,)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, lse


def merge_attention_blocks(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Merge the attention of the same queries over two disjoint key sets, in float32.

    `lse = logaddexp(lse_a, lse_b)`, `out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)`. Rows where both
    LSEs are `-inf` (no key in either block) give out 0 and LSE `-inf`, without NaN.

    Args:
        out_a, out_b (`torch.Tensor`): `(B, S, H, D)` outputs.
        lse_a, lse_b (`torch.Tensor`): `(B, H, S)` log-sum-exps.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the merged output `(B, S, H, D)` and LSE `(B, H, S)`, both float32.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, S)
    safe_lse = torch.where(torch.isneginf(lse), 0.0, lse)
    # (B, H, S) -> (B, S, H, 1) to scale (B, S, H, D)
    weight_a = torch.exp(lse_a - safe_lse).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe_lse).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out, lse


# ---------------------------------------------------------------------------------------------------------------------
# Joint attention
# ---------------------------------------------------------------------------------------------------------------------


def _ring_attention(
    query: torch.Tensor,
    img_kv: torch.Tensor,
    txt_key: torch.Tensor,
    txt_value: torch.Tensor,
    txt_mask: torch.Tensor | None,
    img_valid_len: int,
    groups: ParallelGroups,
    backend: str,
) -> torch.Tensor:
    r"""
    Attention of `query` (B, Sq, h, D) over the text keys plus the image K/V blocks of every ring rank.

    `img_kv` is this rank's `(2, B, L, h, D)` stacked image key/value block, global (padded) positions
    `[ring_rank * L, (ring_rank + 1) * L)`. At step `i` the rank holds the block of ring rank `ring_rank - i`; the
    next block travels while the current one is computed. Padding keys (positions `>= img_valid_len`) are a suffix of
    a block and are sliced off; text keys are joined once, at step 0. Returns the float32 output `(B, Sq, h, D)`.
    """
    ring_degree = groups.ring_degree
    block_len = img_kv.shape[2]
    out = lse = None
    requests: list[dist.Work] = []
    try:
        for step in range(ring_degree):
            next_kv = None
            if step + 1 < ring_degree:
                # Overlap: the next block is in flight while this one is computed.
                requests, next_kv = ring_exchange(img_kv, groups)
            source = (groups.ring_rank - step) % ring_degree
            n_valid = min(max(img_valid_len - source * block_len, 0), block_len)
            key, value = img_kv[0, :, :n_valid], img_kv[1, :, :n_valid]  # (B, n_valid, h, D)
            key_mask = None
            if step == 0:
                key = torch.cat([txt_key, key], dim=1)  # (B, S_txt + n_valid, h, D)
                value = torch.cat([txt_value, value], dim=1)
                if txt_mask is not None:
                    image_mask = txt_mask.new_ones(txt_mask.shape[0], n_valid)
                    key_mask = torch.cat([txt_mask, image_mask], dim=1)  # (B, S_txt + n_valid)
            if key.shape[1] > 0:
                block_out, block_lse = attention_with_lse(query, key, value, key_mask=key_mask, backend=backend)
                if out is None:
                    out, lse = block_out.float(), block_lse
                else:
                    out, lse = merge_attention_blocks(out, lse, block_out, block_lse)
            if next_kv is not None:
                wait_all(requests)
                requests = []
                img_kv = next_kv
    finally:
        # A pending P2P request would make the next collective hang: drain them, without hiding the real error.
        drain(requests)
    if out is None:  # no key at all (no valid image token and every text token masked)
        out = query.new_zeros(query.shape, dtype=torch.float32)
    return out


def joint_attention(
    txt_q: torch.Tensor,
    txt_k: torch.Tensor,
    txt_v: torch.Tensor,
    img_q: torch.Tensor,
    img_k: torch.Tensor,
    img_v: torch.Tensor,
    *,
    txt_mask: torch.Tensor | None,
    img_valid_len: int,
    groups: ParallelGroups | None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Qwen-Image joint attention with the image sequence sharded over the sequence-parallel (SP) group.

    Mathematically equal to single-process attention of the queries `[text, image]` over the keys/values
    `[text (masked by txt_mask), valid image]` — the stock `QwenDoubleStreamAttnProcessor2_0`. The text is replicated
    on every SP rank; the image was zero-padded to a multiple of `sp_world_size` and split in equal chunks, SP rank
    `r = ring_rank * ulysses_degree + ulysses_rank` holding global image positions `[r * S_local, (r + 1) * S_local)`.

    - Ulysses (degree U): one fused all-to-all takes image Q/K/V from sequence-sharded to head-sharded, the text is
      sliced to the same H/U heads; one fused all-to-all brings back the image output and gathers the text heads.
    - Ring (degree R): image K/V blocks go around the ring (point-to-point, overlapped with compute), text K/V are
      joined once, blocks are merged in float32 by log-sum-exp.
    - Both (USP): Ulysses inside the ulysses group, Ring across the ring group on the head-sharded tensors.

    Args:
        txt_q, txt_k, txt_v (`torch.Tensor`): text `(B, S_txt, H, D)`, full on every SP rank.
        img_q, img_k, img_v (`torch.Tensor`): this rank's image shard `(B, S_local, H, D)`.
        txt_mask (`torch.Tensor` or `None`):
            `(B, S_txt)`, `True`/nonzero for real text tokens; `False` tokens are not attended to as keys (they are
            still computed as queries). `None` means no text padding.
        img_valid_len (`int`): number of real image tokens; positions `>= img_valid_len` are padding, never keys.
        groups ([`~diffusers_qwen_sp.distributed.ParallelGroups`] or `None`): the process groups; `None` or an SP
            world of 1 runs plain attention without collectives.
        backend (`str`, defaults to `"auto"`): kernel of [`attention_with_lse`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `txt_out` `(B, S_txt, H, D)`, full on every rank, and `img_out`
        `(B, S_local, H, D)` for this rank's shard (rows of padding positions are finite but meaningless), both in
        `img_q.dtype`.
    """
    batch, seq_txt, heads, head_dim = txt_q.shape
    seq_local = img_q.shape[1]
    if txt_k.shape != txt_q.shape or txt_v.shape != txt_q.shape:
        raise ValueError(
            f"Text q/k/v must share one shape, got {tuple(txt_q.shape)}, {tuple(txt_k.shape)}, {tuple(txt_v.shape)}."
        )
    if img_k.shape != img_q.shape or img_v.shape != img_q.shape:
        raise ValueError(
            f"Image q/k/v must share one shape, got {tuple(img_q.shape)}, {tuple(img_k.shape)}, {tuple(img_v.shape)}."
        )
    if img_q.ndim != 4 or (img_q.shape[0], img_q.shape[2], img_q.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"Text and image tensors must be (B, S, H, D) with the same B, H, D; got text {tuple(txt_q.shape)} and "
            f"image {tuple(img_q.shape)}."
        )
    if txt_mask is not None:
        if txt_mask.shape != (batch, seq_txt):
            raise ValueError(
                f"`txt_mask` must have shape (B, S_txt) = {(batch, seq_txt)}, got {tuple(txt_mask.shape)}."
            )
        txt_mask = txt_mask.to(device=txt_q.device, dtype=torch.bool)

    sp_world_size = 1 if groups is None else groups.sp_world_size
    ulysses_degree = 1 if groups is None else groups.ulysses_degree
    ring_degree = 1 if groups is None else groups.ring_degree
    img_valid_len = int(img_valid_len)
    if not 0 <= img_valid_len <= seq_local * sp_world_size:
        raise ValueError(
            f"`img_valid_len` must be in [0, S_local * sp_world_size] = [0, {seq_local} * {sp_world_size}], got "
            f"{img_valid_len}."
        )
    if heads % ulysses_degree != 0:
        raise ValueError(
            f"The number of attention heads ({heads}) is not divisible by ulysses_degree ({ulysses_degree}). Choose a "
            f"ulysses_degree that divides {heads} and put the remaining parallelism in ring_degree."
        )

    dtype = img_q.dtype
    heads_local = heads // ulysses_degree
    seq_block = seq_local * ulysses_degree  # image positions per ring block

    if ulysses_degree == 1:
        query = torch.cat([txt_q, img_q], dim=1)  # (B, S_txt + S_local, H, D)
        img_key, img_value = img_k, img_v
        img_kv = None
        txt_k_heads, txt_v_heads = txt_k, txt_v
    else:
        u_rank = groups.ulysses_rank
        head_slice = slice(u_rank * heads_local, (u_rank + 1) * heads_local)
        # One all-to-all for Q, K and V. Chunk i of dim 0 carries heads [i*h, (i+1)*h) of our positions.
        send = img_q.new_empty(ulysses_degree, 3, batch, seq_local, heads_local, head_dim)
        for index, tensor in enumerate((img_q, img_k, img_v)):
            # (B, S/U, H, D) -> (B, S/U, U, H/U, D) -> (U, B, S/U, H/U, D)
            send[:, index].copy_(
                tensor.reshape(batch, seq_local, ulysses_degree, heads_local, head_dim).permute(2, 0, 1, 3, 4)
            )
        # (U, 3, B, S/U, H/U, D) -> (U, 3, B, S/U, H/U, D); dim 0 of the result: the position chunk of each source rank
        recv = all_to_all_dim0(send, groups.ulysses_group)
        del send
        query = img_q.new_empty(batch, seq_txt + seq_block, heads_local, head_dim)  # (B, S_txt + S/R, H/U, D)
        query[:, :seq_txt] = txt_q[:, :, head_slice]
        # (U, B, S/U, H/U, D) -> (B, U, S/U, H/U, D) into the (B, S/R, H/U, D) image rows
        query[:, seq_txt:].unflatten(1, (ulysses_degree, seq_local)).copy_(recv[:, 0].permute(1, 0, 2, 3, 4))
        img_kv = img_q.new_empty(2, batch, seq_block, heads_local, head_dim)  # (2, B, S/R, H/U, D)
        # (U, 2, B, S/U, H/U, D) -> (2, B, U, S/U, H/U, D)
        img_kv.unflatten(2, (ulysses_degree, seq_local)).copy_(recv[:, 1:].permute(1, 2, 0, 3, 4, 5))
        del recv
        img_key, img_value = img_kv[0], img_kv[1]  # (B, S/R, H/U, D)
        txt_k_heads, txt_v_heads = txt_k[:, :, head_slice], txt_v[:, :, head_slice]  # (B, S_txt, H/U, D)

    if ring_degree == 1:
        # Padding is a suffix of the (only) image block: slice it off instead of masking it.
        key = torch.cat([txt_k_heads, img_key[:, :img_valid_len]], dim=1)  # (B, S_txt + valid, h, D)
        value = torch.cat([txt_v_heads, img_value[:, :img_valid_len]], dim=1)
        key_mask = None
        if txt_mask is not None:
            key_mask = torch.cat([txt_mask, txt_mask.new_ones(batch, img_valid_len)], dim=1)  # (B, S_txt + valid)
        out, _ = attention_with_lse(query, key, value, key_mask=key_mask, backend=backend)
    else:
        # K and V travel together: one P2P message per ring step.
        if img_kv is None:
            img_kv = torch.stack([img_key, img_value])  # 2 x (B, S/R, H, D) -> (2, B, S/R, H, D)
        out = _ring_attention(query, img_kv, txt_k_heads, txt_v_heads, txt_mask, img_valid_len, groups, backend)
    out = out.to(dtype)  # (B, S_txt + S/R, h, D)

    if ulysses_degree == 1:
        return out[:, :seq_txt], out[:, seq_txt:]

    # One all-to-all brings the image rows home and gathers the text heads: chunk j = [text (all), image chunk j].
    send = out.new_empty(ulysses_degree, batch, seq_txt + seq_local, heads_local, head_dim)
    send[:, :, :seq_txt] = out[:, :seq_txt]  # (B, S_txt, H/U, D) broadcast to (U, B, S_txt, H/U, D)
    # (B, S/R, H/U, D) -> (B, U, S/U, H/U, D) -> (U, B, S/U, H/U, D)
    send[:, :, seq_txt:] = out[:, seq_txt:].unflatten(1, (ulysses_degree, seq_local)).transpose(0, 1)
    # (U, B, S_txt + S/U, H/U, D) -> (U, B, S_txt + S/U, H/U, D); dim 0 of the result: the head chunk of each source
    recv = all_to_all_dim0(send, groups.ulysses_group)
    # (U, B, S_txt, H/U, D) -> (B, S_txt, U, H/U, D) -> (B, S_txt, H, D)
    txt_out = recv[:, :, :seq_txt].permute(1, 2, 0, 3, 4).reshape(batch, seq_txt, heads, head_dim)
    # (U, B, S/U, H/U, D) -> (B, S/U, U, H/U, D) -> (B, S/U, H, D)
    img_out = recv[:, :, seq_txt:].permute(1, 2, 0, 3, 4).reshape(batch, seq_local, heads, head_dim)
    return txt_out, img_out


# ---------------------------------------------------------------------------------------------------------------------
# The attention processor set on every block while sequence parallelism is on
# ---------------------------------------------------------------------------------------------------------------------


class SequenceParallelAttnProcessor:
    r"""
    Qwen-Image double-stream attention with the image sequence sharded across ranks.

    The projections, QK norms and rotary embeddings are the stock `QwenDoubleStreamAttnProcessor2_0` steps (a test pins
    this processor to the stock one); the attention itself is [`joint_attention`], which masks the image padding and
    the text padding, and runs Ulysses, Ring or both over the runtime's process groups.

    Args:
        runtime (`SequenceParallelRuntime`): shared with the split and gather hooks; gives the process groups and the
            kernel backend. The layout of the current forward's image sequence comes with each call (`image_shard`).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_shard: ShardBounds | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The stock processor's arguments, plus `image_shard`: where this rank's image tokens lie in the whole
        zero-padded sequence (passed by the blocks stage when the sequence is sharded; without it the tokens are the
        whole sequence).
        """
        if encoder_hidden_states is None:
            raise ValueError("SequenceParallelAttnProcessor needs encoder_hidden_states (the text stream).")
        if attention_mask is not None:
            raise ValueError(
                "SequenceParallelAttnProcessor takes no external attention_mask: pass encoder_hidden_states_mask and "
                "let it build the joint mask, as the stock processor does."
            )
        runtime = self.runtime
        if image_shard is None:
            if runtime.groups.sp_world_size > 1:
                raise RuntimeError(
                    "Sequence-parallel attention ran without the layout of a sharded image sequence: call the "
                    "transformer itself, whose `image_rope_prepare` stage shards the image sequence and whose blocks "
                    "stage passes the layout on."
                )
            image_seq_len = hidden_states.shape[1]
        else:
            image_seq_len = image_shard.seq_len
        head_dim = attn.inner_dim // attn.heads
        # (B, S, H*D) -> (B, S, H, D) for the image shard and the (whole) text
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # image freqs: this rank's shard, split with the tokens
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        txt_out, img_out = joint_attention(
            txt_q,
            txt_k,
            txt_v,
            img_q,
            img_k,
            img_v,
            txt_mask=encoder_hidden_states_mask,
            img_valid_len=image_seq_len,
            groups=runtime.groups,
            backend=runtime.config.attention_backend,
        )
        img_out = img_out.flatten(2, 3).to(img_q.dtype)  # (B, S_local, H, D) -> (B, S_local, H*D)
        txt_out = txt_out.flatten(2, 3).to(txt_q.dtype)  # (B, S_txt, H, D) -> (B, S_txt, H*D)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out

    def __repr__(self) -> str:
        return (
            f"SequenceParallelAttnProcessor(groups={self.runtime.groups}, "
            f"backend={self.runtime.config.attention_backend!r})"
        )

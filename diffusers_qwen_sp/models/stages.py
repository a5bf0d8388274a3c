"""The parameter-free stages of the staged Qwen-Image transformer, and the block inputs that travel between them.

Each stage is a place for a hook: sequence parallelism splits the outputs of `ImageRopePrepare` and
`ModulateIndexPrepare` and gathers the input of `ImageOutput`; TeaCache wraps `BlocksStage`. None holds a parameter
(the module tree and the state dict stay those of the stock model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.nn as nn

from ..distributed.sharding import ShardBounds, sp_shard_bounds


@dataclass
class QwenImageBlockInputs:
    r"""
    Everything the transformer blocks consume, as produced by [`QwenImageSPTransformer2DModel.preprocess`].

    Under sequence parallelism the image tensors are this rank's shard of the (padded) image sequence.

    Args:
        hidden_states (`torch.Tensor` of shape `(B, S_img, D)`): the embedded image stream.
        encoder_hidden_states (`torch.Tensor` of shape `(B, S_txt, D)`): the embedded text stream.
        encoder_hidden_states_mask (`torch.Tensor` of shape `(B, S_txt)`, *optional*): bool, `False` on padding.
        temb (`torch.Tensor` of shape `(B, D)`, or `(2B, D)` for `zero_cond_t` models): the conditioning embedding.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`): complex image `(S_img, R)` and text `(S_txt, R)`
            rotary frequencies.
        modulate_index (`torch.Tensor` of shape `(B, S_img)`, *optional*): 0 for generated tokens, 1 for reference
            tokens (modulated at t = 0); `None` unless the model is `zero_cond_t`.
        image_shard ([`~diffusers_qwen_sp.distributed.ShardBounds`]): where this rank's image tokens lie in the
            whole (zero-padded) image sequence; the whole sequence without sequence parallelism.
        attention_kwargs (`dict`, *optional*): passed to every block's attention processor.
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_mask: torch.Tensor | None
    temb: torch.Tensor
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor]
    modulate_index: torch.Tensor | None
    image_shard: ShardBounds
    attention_kwargs: dict[str, Any] | None = None

    def block_attention_kwargs(self) -> dict[str, Any] | None:
        r"""
        The `joint_attention_kwargs` of every block: `attention_kwargs`, plus `image_shard` when the image sequence is
        sharded (only the sequence-parallel attention processor is then in place, and it needs the layout).
        """
        if not self.image_shard.is_sharded:
            return self.attention_kwargs
        return {**(self.attention_kwargs or {}), "image_shard": self.image_shard}


class ImageRopePrepare(nn.Module):
    r"""
    Parameter-free stage that yields the embedded image sequence with its rotary frequencies and its layout.

    It computes the frequencies with the transformer's own `pos_embed` (held as a plain reference, so the module tree
    and the state dict stay those of the stock model). Sequence parallelism splits its outputs along the sequence and
    replaces the layout (the whole sequence here) with this rank's shard.
    """

    def __init__(self, pos_embed: nn.Module) -> None:
        super().__init__()
        # A plain attribute, not a submodule: `pos_embed` stays registered once, under the transformer.
        object.__setattr__(self, "_pos_embed", pos_embed)

    def forward(
        self, hidden_states: torch.Tensor, img_shapes: list, text_seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ShardBounds]:
        """Returns `(hidden_states (B, S_img, D), image_freqs (S_img, R), text_freqs (S_txt, R), layout)`."""
        # By keyword, as the stock forward calls it: QwenEmbedRope and QwenEmbedLayer3DRope order them differently.
        image_freqs, text_freqs = self._pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)
        whole = sp_shard_bounds(hidden_states.shape[1], world_size=1, rank=0)
        return hidden_states, image_freqs, text_freqs, whole


class ModulateIndexPrepare(nn.Module):
    r"""
    Parameter-free stage that yields the timestep and the per-token modulate index.

    For `zero_cond_t` models (Qwen-Image-Edit-2511) the timestep is doubled to `[t, 0]` and every image token gets an
    index: 0 for the generated target (`img_shapes[b][0]`), 1 for the reference images after it, which are modulated
    at t = 0. Sequence parallelism splits the index along the sequence together with the image tokens.
    """

    def __init__(self, zero_cond_t: bool) -> None:
        super().__init__()
        self.zero_cond_t = zero_cond_t

    def forward(self, timestep: torch.Tensor, img_shapes: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns `(timestep (B,) or (2B,), modulate_index (B, S_img) int32 or None)`."""
        if not self.zero_cond_t:
            return timestep, None
        timestep = torch.cat([timestep, timestep * 0], dim=0)  # (B,) -> (2B,)
        rows = []
        for shapes in img_shapes:
            target = prod(shapes[0])
            references = sum(prod(shape) for shape in shapes[1:])
            rows.append([0] * target + [1] * references)
        modulate_index = torch.tensor(rows, device=timestep.device, dtype=torch.int)  # (B, S_img)
        return timestep, modulate_index

    def extra_repr(self) -> str:
        return f"zero_cond_t={self.zero_cond_t}"


class BlocksStage(nn.Module):
    r"""
    Parameter-free stage that runs the transformer blocks: `(QwenImageBlockInputs) -> (text, image)` streams.

    It holds the transformer's `transformer_blocks` as a plain reference (the module tree and the state dict stay
    those of the stock model). Caches that skip the blocks (TeaCache) hook this stage: they receive the block inputs
    exactly as `preprocess` produced them, already sharded by sequence parallelism, and never touch preprocessing.
    """

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        object.__setattr__(self, "_blocks", blocks)
        # Set together with the transformer's by diffusers' `enable_gradient_checkpointing`.
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks this stage runs."""
        return self._blocks

    def forward(
        self, inputs: QwenImageBlockInputs, controlnet_block_samples: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(encoder_hidden_states (B, S_txt, D), hidden_states (B, S_img, D))`."""
        hidden_states, encoder_hidden_states = inputs.hidden_states, inputs.encoder_hidden_states
        interval = None
        if controlnet_block_samples is not None:
            interval = int(math.ceil(len(self._blocks) / len(controlnet_block_samples)))
            if controlnet_block_samples[0].shape[1] != hidden_states.shape[1]:
                raise ValueError(
                    f"controlnet_block_samples have {controlnet_block_samples[0].shape[1]} image tokens but the blocks "
                    f"see {hidden_states.shape[1]}: sequence parallelism shards the image sequence and does not shard "
                    "controlnet residuals. Run controlnet pipelines without sequence parallelism."
                )
        attention_kwargs = inputs.block_attention_kwargs()
        for index, block in enumerate(self._blocks):
            args = (
                hidden_states,
                encoder_hidden_states,
                inputs.encoder_hidden_states_mask,
                inputs.temb,
                inputs.image_rotary_emb,
                attention_kwargs,
                inputs.modulate_index,
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                encoder_hidden_states, hidden_states = block(*args)
            if interval is not None:
                hidden_states = hidden_states + controlnet_block_samples[index // interval]
        return encoder_hidden_states, hidden_states


class ImageOutput(nn.Module):
    r"""
    Parameter-free stage that yields the projected image tokens `(B, S_img, p*p*C_out)` given with their layout.

    Sequence parallelism gathers the image sequence here, after `proj_out` and whatever wraps it (a LoRA layer), and
    cuts the padding off with the layout that travelled with the forward.
    """

    def forward(self, output: torch.Tensor, image_shard: ShardBounds) -> torch.Tensor:
        """Returns `output` (the whole sequence once sequence parallelism gathered it)."""
        if image_shard.is_sharded:
            raise RuntimeError(
                f"The image sequence reached the output still sharded ({image_shard}): the sequence-parallel gather "
                "is missing. Remove sequence parallelism with remove_sequence_parallel (or "
                "pipe.disable_sequence_parallel()), not by removing single hooks."
            )
        return output


__all__ = ["BlocksStage", "ImageOutput", "ImageRopePrepare", "ModulateIndexPrepare", "QwenImageBlockInputs"]

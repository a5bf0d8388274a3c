"""The real Qwen-Image family's configs, their parameter counts, and their eager activation peaks traced on the meta
device (no download, no GPU, no compute).

Parameter counts build the stock diffusers / transformers classes on the meta device from the configs below and count
their parameters. Activation peaks run the stock forward (transformer, VAE decode and encode, text encoder) on meta
tensors of the real sizes under [`LiveBytes`]: the peak of the bytes held by tensors allocated during the call, in the
order eager PyTorch frees them, the same count `LiveBytes` makes on CPU and `torch.cuda.max_memory_allocated` makes on
a GPU. Attention allocates what a flash kernel allocates ([`FlashAttentionOnMeta`]): the output and the log-sum-exp,
no `S x S` scores. A trace takes well under a second.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .counter import FlashAttentionOnMeta, LiveBytes


# Qwen/Qwen-Image transformer/config.json (diffusers' `QwenImageTransformer2DModel` defaults are this config).
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
# Qwen/Qwen-Image-Edit-2511 transformer/config.json adds `zero_cond_t` (reference tokens modulated at t = 0);
# Qwen/Qwen-Image-Layered's adds `use_additional_t_cond` and `use_layer3d_rope`. The same 60 blocks otherwise.
EDIT_2511_FLAGS: dict[str, Any] = dict(zero_cond_t=True)
LAYERED_FLAGS: dict[str, Any] = dict(use_additional_t_cond=True, use_layer3d_rope=True)

# Qwen/Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct (`Qwen2_5_VLForConditionalGeneration`).
QWEN25_VL_7B: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3,
    ),
    tie_word_embeddings=False,
)

# Qwen/Qwen-Image vae/config.json (diffusers' `AutoencoderKLQwenImage` defaults); Qwen-Image-Layered's VAE is RGBA.
QWEN_IMAGE_VAE: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], input_channels=3,
)
LAYERED_VAE: dict[str, Any] = dict(QWEN_IMAGE_VAE, input_channels=4)

# Published sizes, to check the counts against: the Hub's model cards (transformer 20.4 B; Qwen2.5-VL-7B-Instruct
# 8.29 B) and the size of Qwen-Image's vae/diffusion_pytorch_model.safetensors (254 MB in bf16: 127 M).
PUBLISHED_PARAMETERS: dict[str, float] = {"transformer": 20.4e9, "text_encoder": 8.29e9, "vae": 127e6}

# Vision tower of Qwen2.5-VL: pixels per merged token side (14 px patches merged 2 x 2).
VISION_TOKEN_PIXELS = 28


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=list)


# ---------------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TransformerParameters:
    r"""Parameter counts of a Qwen-Image transformer: `blocks` blocks of `block` parameters, and the rest."""

    total: int
    block: int
    blocks: int
    outside_blocks: int  # img_in, txt_norm, txt_in, time_text_embed, norm_out, proj_out
    kept_whole: int  # what weight sharding keeps whole on every rank: outside_blocks + block 0's img_mod
    block_dim0: tuple[tuple[int, int], ...]  # (rows, numel) of each block parameter: FSDP2 shards dim 0

    def sharded(self, degree: int) -> int:
        r"""Parameters one rank holds with the blocks sharded over `degree` ranks (FSDP2 pads dim 0 to a multiple)."""
        per_block = sum(math.ceil(rows / degree) * (numel // rows) for rows, numel in self.block_dim0)
        indicator = self.kept_whole - self.outside_blocks  # block 0's img_mod, whole rather than sharded
        indicator_shard = math.ceil(indicator / degree)
        return self.kept_whole + self.blocks * per_block - indicator_shard


@dataclass(frozen=True)
class TextEncoderParameters:
    r"""Parameter counts of a Qwen2.5-VL text encoder: `layers` decoder layers of `layer` parameters, and the rest
    (embeddings, LM head, vision tower, final norm), which the `"sharded"` placement keeps whole."""

    total: int
    layer: int
    layers: int
    vision: int

    @property
    def kept_whole(self) -> int:
        return self.total - self.layer * self.layers

    def sharded(self, degree: int) -> int:
        return self.kept_whole + math.ceil(self.layer * self.layers / degree)


@functools.lru_cache(maxsize=None)
def _transformer_parameters(key: str) -> TransformerParameters:
    from diffusers import QwenImageTransformer2DModel

    config = json.loads(key)
    blocks = config["num_layers"]
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**{**config, "num_layers": 1})
    block = model.transformer_blocks[0]
    block_count = sum(p.numel() for p in block.parameters())
    outside = sum(p.numel() for p in model.parameters()) - block_count
    indicator = sum(p.numel() for p in block.img_mod.parameters())
    return TransformerParameters(
        total=outside + blocks * block_count,
        block=block_count,
        blocks=blocks,
        outside_blocks=outside,
        kept_whole=outside + indicator,
        block_dim0=tuple((p.shape[0], p.numel()) for p in block.parameters()),
    )


def transformer_parameters(config: dict[str, Any] = QWEN_IMAGE_TRANSFORMER) -> TransformerParameters:
    r"""Parameter counts of the transformer `config` (one block built on the meta device; the blocks are equal)."""
    return _transformer_parameters(_key(config))


@functools.lru_cache(maxsize=None)
def _text_encoder(key: str) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**json.loads(key))).eval()


def text_encoder_parameters(config: dict[str, Any] = QWEN25_VL_7B) -> TextEncoderParameters:
    r"""Parameter counts of the Qwen2.5-VL text encoder `config` (built on the meta device)."""
    model = _text_encoder(_key(config))
    layers = model.model.language_model.layers
    return TextEncoderParameters(
        total=sum(p.numel() for p in model.parameters()),
        layer=sum(p.numel() for p in layers[0].parameters()),
        layers=len(layers),
        vision=sum(p.numel() for p in model.model.visual.parameters()),
    )


@functools.lru_cache(maxsize=None)
def _vae(key: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        return AutoencoderKLQwenImage(**json.loads(key)).to(dtype).eval()


def vae_parameters(config: dict[str, Any] = QWEN_IMAGE_VAE) -> int:
    r"""Parameter count of the `AutoencoderKLQwenImage` `config`."""
    return sum(p.numel() for p in _vae(_key(config), torch.float32).parameters())


# ---------------------------------------------------------------------------------------------------- traced peaks


def trace_peak(fn: Any) -> int:
    r"""Peak bytes of the tensors `fn()` allocates and holds at once, traced on the meta device (see `LiveBytes`)."""
    with torch.no_grad(), FlashAttentionOnMeta(), LiveBytes("meta") as counter:
        fn()
    return counter.peak_bytes


def _grid(tokens: int, row_tokens: int) -> tuple[int, int, int]:
    # A (frame, rows, columns) grid of at least `tokens` tokens, `row_tokens` wide (the image's width in tokens).
    return (1, max(1, math.ceil(tokens / row_tokens)), row_tokens)


@functools.lru_cache(maxsize=None)
def _transformer_peak(key: str, image_tokens: tuple[int, ...], text_tokens: int, row_tokens: int,
                      dtype: torch.dtype) -> int:
    from diffusers import QwenImageTransformer2DModel

    config = json.loads(key)
    # Two blocks: the peak is inside a block, and every block leaves the same tensors behind. The Layered flags add
    # a 3D rope table and one embedding (per-token tables of 64 complex numbers, no d-wide tensor): traced without.
    config.update(num_layers=2, use_additional_t_cond=False, use_layer3d_rope=False)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config).to(dtype).eval()
    shapes = [_grid(tokens, row_tokens) for tokens in image_tokens if tokens]
    tokens = sum(math.prod(shape) for shape in shapes)
    inputs = dict(
        hidden_states=torch.empty(1, tokens, config["in_channels"], device="meta", dtype=dtype),
        encoder_hidden_states=torch.empty(1, text_tokens, config["joint_attention_dim"], device="meta", dtype=dtype),
        encoder_hidden_states_mask=None,
        timestep=torch.ones(1, device="meta", dtype=dtype),
        img_shapes=[shapes],
        return_dict=False,
    )
    return trace_peak(lambda: model(**inputs))


def transformer_forward_peak(
    config: dict[str, Any],
    image_tokens: tuple[int, ...],
    text_tokens: int,
    row_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    r"""
    Activation peak of one stock transformer forward (batch 1) over image segments of `image_tokens` tokens each
    (the generated image first, then references; under `zero_cond_t` they get different modulation), each laid out
    `row_tokens` tokens wide, and `text_tokens` text tokens.
    """
    return _transformer_peak(_key(config), tuple(image_tokens), text_tokens, row_tokens, dtype)


@functools.lru_cache(maxsize=None)
def _vae_peak(key: str, operation: str, height: int, width: int, batch: int, dtype: torch.dtype) -> int:
    vae = _vae(key, dtype)
    if operation == "decode":
        factor = 2 ** (len(vae.config.dim_mult) - 1)
        latents = torch.empty(batch, vae.config.z_dim, 1, height // factor, width // factor, device="meta",
                              dtype=dtype)
        return trace_peak(lambda: vae.decode(latents, return_dict=False))
    pixels = torch.empty(batch, vae.config.input_channels, 1, height, width, device="meta", dtype=dtype)
    return trace_peak(lambda: vae.encode(pixels).latent_dist.mode())


def vae_decode_peak(config: dict[str, Any], height: int, width: int, batch: int = 1,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    r"""Activation peak of the stock `AutoencoderKLQwenImage.decode` of `batch` images of `height x width` pixels."""
    return _vae_peak(_key(config), "decode", height, width, batch, dtype)


def vae_encode_peak(config: dict[str, Any], height: int, width: int, batch: int = 1,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    r"""Activation peak of the stock `AutoencoderKLQwenImage.encode` of `batch` images of `height x width` pixels."""
    return _vae_peak(_key(config), "encode", height, width, batch, dtype)


@functools.lru_cache(maxsize=None)
def _text_encode_peak(key: str, tokens: int, batch: int, dtype: torch.dtype) -> int:
    model = _text_encoder(key).to(dtype)
    input_ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    # Explicit (3, B, S) multimodal positions: computing them from the ids reads data the meta device has not got.
    position_ids = torch.zeros(3, batch, tokens, dtype=torch.long, device="meta")
    return trace_peak(lambda: model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=True))


def text_encode_peak(config: dict[str, Any], tokens: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    r"""
    Activation peak of the text encoder's forward as the pipelines call it (`output_hidden_states=True`, logits over
    the vocabulary for every token) on `batch` sequences of `tokens` tokens. The vision tower is not traced (its
    positions come from data); [`vision_tower_peak`] estimates it.
    """
    return _text_encode_peak(_key(config), tokens, batch, dtype)


def vision_tower_peak(config: dict[str, Any], patches: int, dtype: torch.dtype = torch.bfloat16) -> int:
    r"""
    Estimated activation peak of the vision tower over `patches` 14 px patches: per layer the residual stream, its
    norm, Q, K, V and the attention output (6 x hidden) and the gated MLP's two intermediate tensors
    (2 x intermediate), per patch. A few tens of MB for the Edit pipelines' 384 x 384 condition images.
    """
    vision = config["vision_config"]
    return patches * (6 * vision["hidden_size"] + 2 * vision["intermediate_size"]) * dtype_bytes(dtype)


__all__ = [
    "EDIT_2511_FLAGS",
    "LAYERED_FLAGS",
    "LAYERED_VAE",
    "PUBLISHED_PARAMETERS",
    "QWEN25_VL_7B",
    "QWEN_IMAGE_TRANSFORMER",
    "QWEN_IMAGE_VAE",
    "TextEncoderParameters",
    "TransformerParameters",
    "VISION_TOKEN_PIXELS",
    "dtype_bytes",
    "text_encode_peak",
    "text_encoder_parameters",
    "trace_peak",
    "transformer_forward_peak",
    "transformer_parameters",
    "vae_decode_peak",
    "vae_encode_peak",
    "vae_parameters",
    "vision_tower_peak",
]

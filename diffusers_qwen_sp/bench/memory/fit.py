"""Per-GPU peak memory of the Qwen-Image family on N GPUs, computed from the real configs, and which cards it fits
([`fit_table`]).

The model of one rank's peak (bf16 weights and activations, batch 1, true CFG run as two sequential calls):

    peak = resident weights + the largest stage's activations (+ that stage's transient weights)

- **Resident weights**: the transformer (whole, or its blocks sharded over N: `1/N` of each block plus the 0.5 %
  kept whole), the text encoder (whole on every rank, whole on rank 0 only, or its decoder layers sharded over N plus
  the embeddings, LM head and vision tower whole) and the VAE (whole everywhere: 254 MB). Nothing is offloaded.
- **Prompt encode**: the traced text-encoder forward (`output_hidden_states=True`, logits for every token) over the
  prompt and the negative prompt in one batch of 2 (template + 512 prompt tokens, + 196 vision tokens per Edit
  reference), plus the vision tower's estimate; sharded: + 3 decoder layers whole (the running one, the prefetched
  one in flight and its copy). Runs on every rank (replicated, sharded) or on rank 0 only (one rank).
- **Reference encode** (Edit: each 1024x1024-area reference; Layered: the input image): the traced VAE encode, or
  with the parallel VAE a slab of `H/N` rows plus its halo (61 + 68 image rows).
- **Denoising forward**: the traced stock transformer forward over this rank's `ceil(S_img / N)` image tokens and the
  whole text (our SP keeps the text on every rank); under SP (N > 1) plus the whole embedded image, which stays
  alive while the blocks run (the rank's shard is taken from it), and the Ulysses all-to-all buffers beyond the stock
  joint Q/K/V (2 x local tokens x inner); sharded: + 3 blocks whole (the running one, the prefetched one's all-gather
  buffer and its copy-out). Checked against CPU: `bench-memory` prints measured / computed for each stage.
- **Decode**: the traced VAE decode of the whole latent (every rank decodes), or with the parallel VAE a slab of
  `ceil(h / N)` latent rows plus 2 rows per side (the plan's 13-row latent halo shrinks to 7 pixel rows at full
  resolution, where the memory is: 1.5 latent rows per side measured) and the gathered image (x 3).
- **The models**: Qwen-Image; Edit-2509 and Edit-2511 (the Edit-Plus pipeline: each reference resized to 1024 x 1024
  pixels, 4096 more image tokens, and to 392 x 392 for the vision tower, 196 more text tokens; 2511 modulates the
  reference tokens apart, `zero_cond_t`); Layered (4 layers: 6 frames of image tokens, the layers decoded as one
  batch by its RGBA VAE; resolution buckets 640 and 1024 only; the prompt given, no captioning).
- **Overhead**: a fixed 1.5 GiB per GPU (CUDA context ~0.5, NCCL communicators ~0.5, cuBLAS/cuDNN workspaces
  ~0.5), and a margin of 10 % of the card for the caching allocator's fragmentation: a configuration fits a card of
  `C` GiB when `peak + 1.5 GiB <= 0.9 * C`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .model_sizes import (
    EDIT_2511_FLAGS,
    LAYERED_FLAGS,
    LAYERED_VAE,
    QWEN25_VL_7B,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
    VISION_TOKEN_PIXELS,
    dtype_bytes,
    text_encode_peak,
    text_encoder_parameters,
    transformer_forward_peak,
    transformer_parameters,
    vae_decode_peak,
    vae_encode_peak,
    vae_parameters,
    vision_tower_peak,
)


GIB = 2**30
CUDA_OVERHEAD_BYTES = int(1.5 * GIB)
CARD_MARGIN = 0.10
CARDS_GIB: tuple[int, ...] = (24, 48, 80)
DEGREES: tuple[int, ...] = (2, 4, 8)
RESOLUTIONS: tuple[int, ...] = (1024, 1328)
PROMPT_TOKENS = 512  # the pipelines' max_sequence_length
REFERENCE_SIDE = 1024  # Edit-Plus resizes every reference to VAE_IMAGE_SIZE = 1024 * 1024 pixels
CONDITION_SIDE = 392  # ... and to CONDITION_IMAGE_SIZE = 384 * 384 for the vision tower (28 px multiples: 392)
PIXELS_PER_TOKEN = 16  # 8x VAE, 2x2 patches
# Halos of the patch-parallel VAE (hooks/vae_patch_parallel.py). Decode: the halo shrinks stage by stage (13 latent
# rows at the latent's resolution, 7 pixel rows at full resolution), so a slab costs about 2 latent rows per side more
# than its own rows. Encode: the full halo (61 + 68 image rows) is at full resolution, where the memory is.
DECODE_EFFECTIVE_HALO_LATENT_ROWS = 2
ENCODE_HALO_ROWS = 61 + 68
TRANSIENT_BLOCKS = 3  # FSDP2: the running block, the prefetched one's all-gather buffer and its copy-out
ULYSSES_BUFFERS = 2  # all-to-all buffers beyond the stock joint Q/K/V, in units of local tokens x inner dim


@dataclass(frozen=True)
class FamilyModel:
    r"""One model of the family as the table sizes it."""

    key: str
    name: str
    transformer_flags: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=lambda: dict(QWEN_IMAGE_VAE))
    references: int = 0  # Edit-Plus: reference images, each resized to 1024 x 1024 pixels
    layers: int = 0  # Layered: output layers (its latent holds layers + 1 frames, plus the input image's tokens)
    template_tokens: int = 34  # the prompt template's prefix, dropped from the embeddings
    resolutions: tuple[int, ...] = RESOLUTIONS
    note: str = ""

    def image_segments(self, side: int) -> tuple[int, ...]:
        r"""Image tokens of the transformer's sequence: the generated image, then the references / layers."""
        tokens = (side // PIXELS_PER_TOKEN) ** 2
        if self.layers:  # layers + 1 generated frames and the input image at the same resolution
            return (tokens, self.layers * tokens + tokens)
        if self.references:
            return (tokens, self.references * (REFERENCE_SIDE // PIXELS_PER_TOKEN) ** 2)
        return (tokens,)

    @property
    def vision_tokens(self) -> int:
        return self.references * (CONDITION_SIDE // VISION_TOKEN_PIXELS) ** 2

    @property
    def text_tokens(self) -> int:
        r"""Text tokens of the transformer: the prompt and, for Edit, the vision tokens of the references."""
        return PROMPT_TOKENS + self.vision_tokens


MODELS: tuple[FamilyModel, ...] = (
    FamilyModel("qwen-image", "Qwen-Image"),
    FamilyModel("edit-2509", "Qwen-Image-Edit-2509, 1 reference", references=1, template_tokens=64),
    FamilyModel("edit-2511", "Qwen-Image-Edit-2511, 1 reference", dict(EDIT_2511_FLAGS), references=1,
                template_tokens=64),
    FamilyModel("edit-2511-3refs", "Qwen-Image-Edit-2511, 3 references", dict(EDIT_2511_FLAGS), references=3,
                template_tokens=64),
    FamilyModel("layered", "Qwen-Image-Layered, 4 layers", dict(LAYERED_FLAGS), vae=dict(LAYERED_VAE), layers=4,
                resolutions=(1024,), note="resolution buckets 640 and 1024 only"),
)

# The `--quick` table: Qwen-Image at 1024x1024 only.
QUICK_MODELS: tuple[FamilyModel, ...] = (replace(MODELS[0], resolutions=(1024,)),)


@dataclass(frozen=True)
class Configuration:
    key: str
    name: str
    transformer: str  # "replicated" | "sharded"
    text_encoder: str  # "replicated" | "one_rank" | "sharded"
    parallel_vae: bool


CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration("replicated", "everything replicated", "replicated", "replicated", False),
    Configuration("sharded-te-one-rank", "sharded transformer, TE on one rank", "sharded", "one_rank", False),
    Configuration("sharded-te-one-rank-pvae", "sharded transformer, TE on one rank, parallel VAE", "sharded",
                  "one_rank", True),
    Configuration("all-sharded-pvae", "sharded transformer and TE, parallel VAE", "sharded", "sharded", True),
)


def _slab_rows(rows: int, degree: int, halo: int) -> int:
    # A rank's rows and its halo (both sides together), never more than the whole image.
    return min(rows, math.ceil(rows / degree) + halo)


def forward_activation(transformer_config: dict[str, Any], segments: tuple[int, ...], text_tokens: int,
                       row_tokens: int, degree: int, sharded: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    r"""
    One rank's activation peak in a transformer forward under Ulysses `degree`: the traced stock forward over the
    rank's `ceil(tokens / degree)` tokens of each image segment and the whole text; for degree > 1 plus the whole
    embedded image and the all-to-all buffers; plus 3 blocks of transient weights when `sharded`.
    """
    b = dtype_bytes(dtype)
    local = tuple(math.ceil(tokens / degree) for tokens in segments)
    peak = transformer_forward_peak(transformer_config, local, text_tokens, row_tokens, dtype)
    if degree > 1:
        inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
        peak += (sum(segments) + ULYSSES_BUFFERS * sum(local)) * inner * b
    if sharded:
        peak += TRANSIENT_BLOCKS * transformer_parameters(transformer_config).block * b
    return peak


def decode_activation(vae_config: dict[str, Any], height: int, width: int, degree: int, parallel: bool,
                      batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    r"""One rank's activation peak decoding `batch` images: whole, or (`parallel`) a slab of `ceil(h / degree)`
    latent rows with 2 halo rows per side, plus the gathered image (3 copies: the gather, its concatenation, the
    clamp)."""
    factor = 2 ** (len(vae_config["dim_mult"]) - 1)
    if not parallel or degree == 1:
        return vae_decode_peak(vae_config, height, width, batch, dtype)
    rows = _slab_rows(height // factor, degree, 2 * DECODE_EFFECTIVE_HALO_LATENT_ROWS) * factor
    image = batch * vae_config.get("input_channels", 3) * height * width * dtype_bytes(dtype)
    return vae_decode_peak(vae_config, rows, width, batch, dtype) + 3 * image


def encode_image_activation(vae_config: dict[str, Any], height: int, width: int, degree: int, parallel: bool,
                            dtype: torch.dtype = torch.bfloat16) -> int:
    r"""One rank's activation peak encoding one image: whole, or (`parallel`) a slab of `ceil(H / degree)` rows plus
    the halo (61 + 68 rows)."""
    factor = 2 ** (len(vae_config["dim_mult"]) - 1)
    if parallel and degree > 1:
        height = math.ceil(_slab_rows(height, degree, ENCODE_HALO_ROWS) / factor) * factor
    return vae_encode_peak(vae_config, height, width, 1, dtype)


def rank_peaks(model: FamilyModel, side: int, degree: int, config: Configuration,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    r"""
    The per-rank bytes of `model` at `side x side` pixels on `degree` GPUs in `config`, for rank 0 (which holds the
    text encoder under `"one_rank"`) and the other ranks: resident weights, each stage's activations and the peak.
    """
    b = dtype_bytes(dtype)
    transformer_config = {**QWEN_IMAGE_TRANSFORMER, **model.transformer_flags}
    tp = transformer_parameters(transformer_config)
    te = text_encoder_parameters(QWEN25_VL_7B)
    sharded = config.transformer == "sharded"
    transformer_held = (tp.sharded(degree) if sharded else tp.total) * b
    te_whole = te.total * b
    te_held = {"replicated": (te_whole, te_whole), "one_rank": (te_whole, 0),
               "sharded": (te.sharded(degree) * b,) * 2}[config.text_encoder]
    vae_held = vae_parameters(model.vae) * b

    # Prompt encode: the prompt and the negative prompt in one batch of 2.
    encode = text_encode_peak(QWEN25_VL_7B, model.template_tokens + model.text_tokens, 2, dtype)
    encode += vision_tower_peak(QWEN25_VL_7B, 2 * model.references * (CONDITION_SIDE // 14) ** 2, dtype)
    if config.text_encoder == "sharded":
        encode += TRANSIENT_BLOCKS * te.layer * b
    encode_on = (True, config.text_encoder != "one_rank")  # (rank 0, other ranks)

    # Reference images (Edit) or the input image (Layered) through the VAE encoder.
    reference = 0
    if model.references or model.layers:
        ref_side = REFERENCE_SIDE if model.references else side
        reference = encode_image_activation(model.vae, ref_side, ref_side, degree, config.parallel_vae, dtype)

    forward = forward_activation(transformer_config, model.image_segments(side), model.text_tokens,
                                 side // PIXELS_PER_TOKEN, degree, sharded, dtype)
    # Layered decodes its layers as one batch.
    decode = decode_activation(model.vae, side, side, degree, config.parallel_vae, max(1, model.layers), dtype)

    ranks = {}
    for index, name in enumerate(("rank0", "others")):
        stages = {"prompt_encode": encode if encode_on[index] else 0, "reference_encode": reference,
                  "forward": forward, "decode": decode}
        held = {"transformer": transformer_held, "text_encoder": te_held[index], "vae": vae_held}
        ranks[name] = {"weights": held, "stages": stages,
                       "peak_bytes": sum(held.values()) + max(stages.values())}
    return ranks


def fits(peak_bytes: int, card_gib: float) -> bool:
    r"""Whether a rank peaking at `peak_bytes` fits a card of `card_gib` GiB (overhead and margin included)."""
    return peak_bytes + CUDA_OVERHEAD_BYTES <= (1 - CARD_MARGIN) * card_gib * GIB


def fit_table(models: tuple[FamilyModel, ...] = MODELS, degrees: tuple[int, ...] = DEGREES,
              configurations: tuple[Configuration, ...] = CONFIGURATIONS) -> list[dict[str, Any]]:
    r"""
    One row per model x resolution x configuration x GPU count: the largest rank's peak (GiB), what drives it, and
    which cards it fits (see the module docstring for the model). Resolutions a model does not support are left out.

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.memory import fit_table

    >>> row = fit_table()[0]
    >>> row["model"], row["resolution"], row["gpus"], row["configuration"], row["fits"]
    ```
    """
    rows = []
    for model in models:
        for side in model.resolutions:
            for config in configurations:
                for degree in degrees:
                    ranks = rank_peaks(model, side, degree, config)
                    worst = max(ranks.values(), key=lambda rank: rank["peak_bytes"])
                    stage = max(worst["stages"], key=worst["stages"].get)
                    rows.append({
                        "model": model.key, "model_name": model.name, "note": model.note, "resolution": side,
                        "gpus": degree,
                        "configuration": config.key, "configuration_name": config.name,
                        "peak_gib": worst["peak_bytes"] / GIB, "peak_stage": stage,
                        "weights_gib": sum(worst["weights"].values()) / GIB,
                        "ranks": {name: {"peak_gib": rank["peak_bytes"] / GIB,
                                         "weights_gib": {k: v / GIB for k, v in rank["weights"].items()},
                                         "stages_gib": {k: v / GIB for k, v in rank["stages"].items()}}
                                  for name, rank in ranks.items()},
                        "fits": {f"{card}GB": fits(worst["peak_bytes"], card) for card in CARDS_GIB},
                    })
    return rows


def parameter_summary() -> dict[str, Any]:
    r"""The computed parameter counts of the real configs beside the published sizes."""
    from .model_sizes import PUBLISHED_PARAMETERS

    tp = transformer_parameters()
    te = text_encoder_parameters()
    counts = {"transformer": tp.total, "text_encoder": te.total, "vae": vae_parameters()}
    return {
        name: {"computed": count, "published": PUBLISHED_PARAMETERS[name],
               "ratio": count / PUBLISHED_PARAMETERS[name]}
        for name, count in counts.items()
    } | {"transformer_block": tp.block, "transformer_kept_whole": tp.kept_whole, "text_encoder_layer": te.layer,
         "text_encoder_kept_whole": te.kept_whole, "text_encoder_vision": te.vision}


__all__ = [
    "CARDS_GIB",
    "CARD_MARGIN",
    "CONFIGURATIONS",
    "CUDA_OVERHEAD_BYTES",
    "Configuration",
    "DEGREES",
    "decode_activation",
    "encode_image_activation",
    "forward_activation",
    "FamilyModel",
    "MODELS",
    "fit_table",
    "fits",
    "parameter_summary",
    "rank_peaks",
]

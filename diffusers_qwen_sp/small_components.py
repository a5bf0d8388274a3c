"""Builders of small Qwen-Image components: a BPE tokenizer trained offline and small model and scheduler configs.

Every builder returns the stock class (or its constructor arguments) the real checkpoints use, only shrunk: a
byte-level BPE `Qwen2Tokenizer` with the Qwen special tokens, a `Qwen2_5_VLConfig` whose special-token ids match that
tokenizer, an `AutoencoderKLQwenImage` config with a spatial factor of 4, and the `FlowMatchEulerDiscreteScheduler`
config of the real checkpoints. The shipped scene model (`diffusers_qwen_sp.scenes`) is built from them, and so are the
tiny random-weight test pipelines of `diffusers_qwen_sp.testing`.

Example:

```py
>>> from transformers import Qwen2_5_VLForConditionalGeneration

>>> from diffusers_qwen_sp.small_components import build_bpe_tokenizer, small_text_encoder_config

>>> tokenizer = build_bpe_tokenizer(["a red circle on a blue background", "two green squares"], vocab_size=300)
>>> text_encoder = Qwen2_5_VLForConditionalGeneration(small_text_encoder_config(tokenizer, vocab_size=300))
```
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX


__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "VISION_MERGE_SIZE",
    "VISION_PATCH_SIZE",
    "VISION_TEMPORAL_PATCH_SIZE",
    "build_bpe_tokenizer",
    "flow_match_scheduler_config",
    "small_text_encoder_config",
    "small_vae_config",
]

# Same order as the added tokens of the real Qwen2.5-VL tokenizer (ids 151643..151656 there), so relative ids match.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Vision tower geometry of [`small_text_encoder_config`]; an image processor feeding it must use the same values.
VISION_PATCH_SIZE = 14
VISION_MERGE_SIZE = 2
VISION_TEMPORAL_PATCH_SIZE = 2

# The byte-level alphabet is always part of the vocabulary, whatever the corpus.
_BYTE_ALPHABET_SIZE = 256


@functools.lru_cache(maxsize=4)
def _bpe_model(
    corpus: tuple[str, ...], vocab_size: int
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    # Immutable (vocab items, merges) so the cache cannot be corrupted; every caller builds its own tokenizer from it.
    bpe = Tokenizer(models.BPE())
    # The same normalizer and pre-tokenizer `Qwen2Tokenizer` installs, so the learned merges apply unchanged there.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return vocab, merges


def build_bpe_tokenizer(corpus: Sequence[str], vocab_size: int) -> Qwen2Tokenizer:
    r"""
    Train a small deterministic byte-level BPE on `corpus` and wrap it in a `Qwen2Tokenizer` with the Qwen special
    tokens.

    Training uses the `tokenizers` library offline with the normalizer and pre-tokenizer of `Qwen2Tokenizer`, so the
    learned merges apply unchanged there. It runs once per process for a given `(corpus, vocab_size)` and is cached;
    each call returns a new tokenizer object, so callers may modify theirs freely. The BPE tokens take the first ids
    (up to `vocab_size - 14` of them, fewer when the corpus has fewer merges to learn) and [`QWEN_SPECIAL_TOKENS`]
    follow right after, in the order of the real Qwen2.5-VL tokenizer.

    Args:
        corpus (`Sequence[str]`):
            Texts to learn the merges from.
        vocab_size (`int`):
            Largest total size, special tokens included; at least 270 (the 256 byte tokens and the 14 special tokens).
            The text encoder's embedding size must be at least the tokenizer's size.

    Returns:
        `Qwen2Tokenizer`: a tokenizer of at most `vocab_size` tokens with pad and eos token `<|endoftext|>`.

    Example:

    ```py
    >>> from diffusers_qwen_sp.small_components import build_bpe_tokenizer

    >>> tokenizer = build_bpe_tokenizer(["a red circle on a blue background"], vocab_size=300)
    >>> tokenizer.convert_tokens_to_ids("<|endoftext|>") == len(tokenizer) - 14
    True
    ```
    """
    if isinstance(corpus, str):
        raise TypeError(
            f"`corpus` must be a sequence of texts, got the single string {corpus[:40]!r}; wrap it in a list: [text]."
        )
    minimum = _BYTE_ALPHABET_SIZE + len(QWEN_SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"`vocab_size` must be an int of at least {minimum} (256 byte tokens + {len(QWEN_SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size!r}."
        )
    vocab, merges = _bpe_model(tuple(corpus), vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    expected = list(range(len(vocab), len(vocab) + len(QWEN_SPECIAL_TOKENS)))
    if ids != expected or len(tokenizer) > vocab_size:
        raise RuntimeError(
            f"BPE tokenizer special tokens got ids {ids} (expected {expected}) and {len(tokenizer)} tokens (at most "
            f"{vocab_size}); the installed `tokenizers`/`transformers` build them differently than expected."
        )
    return tokenizer


def small_text_encoder_config(
    tokenizer: Qwen2Tokenizer, vocab_size: int, hidden_size: int = 32
) -> Qwen2_5_VLConfig:
    r"""
    Config of a small `Qwen2_5_VLForConditionalGeneration` whose special-token ids match `tokenizer`.

    Text model: 2 layers, heads of 16 dims, multimodal RoPE sections (2, 2, 4). Vision tower: 2 blocks of hidden 16,
    [`VISION_PATCH_SIZE`] px patches merged [`VISION_MERGE_SIZE`] x [`VISION_MERGE_SIZE`] into tokens of the text
    model's width.

    Args:
        tokenizer (`Qwen2Tokenizer`):
            The tokenizer whose special-token ids to use, e.g. from [`build_bpe_tokenizer`].
        vocab_size (`int`):
            Embedding rows; at least `len(tokenizer)` (usually the `vocab_size` the tokenizer was built with).
        hidden_size (`int`, defaults to `32`):
            Width of the text model (and of the vision tower's output); a multiple of the 16-dim heads.

    Returns:
        `Qwen2_5_VLConfig`
    """
    if hidden_size % 16:
        raise ValueError(f"`hidden_size` must be a multiple of the 16-dim heads (e.g. 32 or 64), got {hidden_size}.")
    if vocab_size < len(tokenizer):
        raise ValueError(
            f"`vocab_size` ({vocab_size}) must cover the tokenizer's {len(tokenizer)} tokens; pass at least "
            f"{len(tokenizer)}."
        )
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden_size // 16,
            "num_key_value_heads": hidden_size // 16,
            "max_position_embeddings": 4096,
            # head_dim 16 -> 8 rotary frequencies, split (temporal, height, width) = (2, 2, 4).
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 4]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": VISION_PATCH_SIZE,
            "spatial_merge_size": VISION_MERGE_SIZE,
            "temporal_patch_size": VISION_TEMPORAL_PATCH_SIZE,
            "window_size": VISION_PATCH_SIZE * VISION_MERGE_SIZE * 2,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"),
    )


def small_vae_config(
    base_dim: int,
    z_dim: int,
    input_channels: int = 3,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> dict[str, Any]:
    r"""
    Config of a small `AutoencoderKLQwenImage`: channel multipliers (1, 2, 4), one residual block per level and two
    spatial downsamplings, i.e. a spatial factor of 4 (with the transformer's 2x2 patches, pixel sizes must be
    multiples of 8).

    Args:
        base_dim (`int`):
            Channels of the first level; the others have 2x and 4x as many.
        z_dim (`int`):
            Latent channels.
        input_channels (`int`, defaults to `3`):
            3 for RGB, 4 for RGBA.
        latents_mean (`Sequence[float]`, *optional*), latents_std (`Sequence[float]`, *optional*):
            Per-channel statistics of the encoded images, `z_dim` values each; the pipelines scale latents by them
            before decoding. Default 0 and 1.

    Returns:
        `dict[str, Any]`: keyword arguments for `AutoencoderKLQwenImage`.
    """
    for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if values and len(values) != z_dim:
            raise ValueError(f"`{name}` needs one value per latent channel ({z_dim}), got {len(values)}: {values!r}.")
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True],
        "input_channels": input_channels,
        "latents_mean": list(latents_mean or [0.0] * z_dim),
        "latents_std": list(latents_std or [1.0] * z_dim),
    }


def flow_match_scheduler_config() -> dict[str, Any]:
    r"""
    The `FlowMatchEulerDiscreteScheduler` config of the real Qwen-Image checkpoints (dynamic exponential shifting).

    Returns:
        `dict[str, Any]`: keyword arguments for `FlowMatchEulerDiscreteScheduler`.
    """
    return {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 8192,
        "max_shift": 0.9,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": True,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }

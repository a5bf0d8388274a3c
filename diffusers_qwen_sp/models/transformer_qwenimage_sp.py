"""The Qwen-Image transformer with a forward split into named, hookable stages.

`QwenImageSPTransformer2DModel` is diffusers' `QwenImageTransformer2DModel` (same config, same state dict) whose
forward is `preprocess -> run_blocks -> postprocess`. Everything that touches the image sequence before the blocks
goes through two parameter-free submodules:

- `image_rope_prepare`: yields the embedded image sequence with the image and text rotary frequencies and the
  sequence layout ([`~diffusers_qwen_sp.distributed.ShardBounds`]);
- `modulate_index_prepare`: yields the timestep (doubled for `zero_cond_t` models) and the per-token modulate index.

and two more carry the rest of the forward:

- `blocks_stage`: runs the transformer blocks on the [`QwenImageBlockInputs`] that `preprocess` produced;
- `image_output`: yields the projected image tokens of `postprocess`.

Sequence parallelism splits at the two preparation stages and gathers at `image_output` (after `proj_out`, so a
LoRA wrapper around `proj_out` computes on the same shard as the layer it wraps); TeaCache sits on `blocks_stage`.
Which tensor is split where is data, `QwenImageSPTransformer2DModel._sp_plan`. Because no other code path embeds the
image or builds rotary frequencies, a cached step shards exactly like a computed one.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers import QwenImageTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
from diffusers.utils import apply_lora_scale, logging

from .sp_plan import GatherInput, ShardBoundsOutput, SplitOutput, SPPlan
from .stages import BlocksStage, ImageOutput, ImageRopePrepare, ModulateIndexPrepare, QwenImageBlockInputs


logger = logging.get_logger(__name__)

# Config classes whose checkpoints this transformer loads unchanged.
QWEN_IMAGE_TRANSFORMER_CLASS_NAMES = ("QwenImageTransformer2DModel", "QwenImageSPTransformer2DModel")


@dataclass(frozen=True)
class DenoisingStep:
    r"""Where a pipeline's denoising loop is: filled into the transformer's `cache_context` by our pipelines."""

    step_index: int | None
    num_inference_steps: int | None
    timestep: float | torch.Tensor | None


class QwenImageSPTransformer2DModel(QwenImageTransformer2DModel):
    r"""
    diffusers' `QwenImageTransformer2DModel` with a staged, hookable forward.

    Same config and state dict as the stock model: any Qwen-Image transformer checkpoint loads unchanged, and
    [`~QwenImageSPTransformer2DModel.from_transformer`] converts a stock instance without copying weights. The forward
    runs [`~QwenImageSPTransformer2DModel.preprocess`], [`~QwenImageSPTransformer2DModel.run_blocks`] and
    [`~QwenImageSPTransformer2DModel.postprocess`]; sequence parallelism hooks `image_rope_prepare`,
    `modulate_index_prepare` and `image_output` (the plan `_sp_plan`), and TeaCache hooks `blocks_stage`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_qwen_sp import QwenImageSPTransformer2DModel

    >>> transformer = QwenImageSPTransformer2DModel.from_pretrained(
    ...     "Qwen/Qwen-Image", subfolder="transformer", dtype=torch.bfloat16
    ... )
    ```
    """

    # Which tensor sequence parallelism splits or gathers where (see `diffusers_qwen_sp.models.sp_plan`).
    _sp_plan: SPPlan = {
        # (timestep, modulate_index (B, S_img)): the per-token modulation index goes with its image token.
        "modulate_index_prepare": (SplitOutput(index=1, dim=1),),
        # (hidden_states (B, S_img, D), image_freqs (S_img, R), text_freqs (S_txt, R), layout): text stays whole.
        "image_rope_prepare": (SplitOutput(index=0, dim=1), SplitOutput(index=1, dim=0), ShardBoundsOutput(index=3)),
        # (output (B, S_img/P, p*p*C), layout) -> (B, S_img, p*p*C)
        "image_output": GatherInput(index=0, dim=1, bounds_index=1),
    }

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
    ) -> None:
        # The explicit signature is what diffusers' config machinery reads: keep it identical to the stock one.
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
            zero_cond_t=zero_cond_t,
            use_additional_t_cond=use_additional_t_cond,
            use_layer3d_rope=use_layer3d_rope,
        )
        self.image_rope_prepare = ImageRopePrepare(self.pos_embed)
        self.modulate_index_prepare = ModulateIndexPrepare(zero_cond_t=self.config.zero_cond_t)
        self.blocks_stage = BlocksStage(self.transformer_blocks)
        self.image_output = ImageOutput()
        # Set by our pipelines for the duration of a call, read by `cache_context`.
        self._denoising_step_fn: Callable[[], DenoisingStep] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_transformer(cls, transformer: nn.Module) -> "QwenImageSPTransformer2DModel":
        r"""
        Convert a stock `QwenImageTransformer2DModel` without copying its weights.

        The returned model holds the very parameter and buffer objects of `transformer` (same storage, device, dtype,
        tensor type and `requires_grad`), so weights quantized with torchao's `quantize_` (tensor subclasses such as
        `Int8Tensor` or `Float8Tensor`) stay quantized, and frozen weights stay frozen.

        Args:
            transformer (`QwenImageTransformer2DModel`): the stock model; returned as is if already converted.
        """
        if isinstance(transformer, cls):
            return transformer
        if not isinstance(transformer, QwenImageTransformer2DModel):
            raise TypeError(
                f"Expected a diffusers QwenImageTransformer2DModel, got {type(transformer).__name__}. Load the "
                "transformer of a Qwen-Image checkpoint (e.g. subfolder='transformer' of 'Qwen/Qwen-Image')."
            )
        _refuse_hooks_lost_in_conversion(transformer)
        with torch.device("meta"):
            converted = cls.from_config(transformer.config)
        # LoRA layers loaded before the conversion have no place in a freshly built model: adopt them as they are.
        _adopt_peft_layers(transformer, converted)
        # assign=True with keep_vars=True adopts the stock parameters themselves: no copy, and their own tensor type
        # (a torchao subclass stays one). `assign` sets `requires_grad` from the meta parameter it replaces, which is
        # True: copy the stock flags first, or quantized and frozen weights would come back trainable.
        stock_parameters = dict(transformer.named_parameters())
        for name, parameter in converted.named_parameters():
            parameter.requires_grad_(stock_parameters[name].requires_grad)
        converted.load_state_dict(transformer.state_dict(keep_vars=True), strict=True, assign=True)
        # torchao's `quantize_` shows the weight type in a per-instance `extra_repr` (`weight=Int8Tensor(...)`);
        # carry it over so that `print(transformer)` still shows what is quantized.
        stock_modules = dict(transformer.named_modules())
        for name, module in converted.named_modules():
            extra_repr = vars(stock_modules[name]).get("extra_repr") if name in stock_modules else None
            if isinstance(extra_repr, types.MethodType):
                module.extra_repr = types.MethodType(extra_repr.__func__, module)
        converted.train(transformer.training)
        # Processors (e.g. a user's custom attention processor) carry over per block.
        converted.set_attn_processor(transformer.attn_processors)
        # Rotary tables are plain tensors (not buffers): rebuild them on the CPU like the stock constructor does.
        converted.pos_embed = type(transformer.pos_embed)(
            theta=transformer.pos_embed.theta,
            axes_dim=list(transformer.pos_embed.axes_dim),
            scale_rope=transformer.pos_embed.scale_rope,
        )
        converted.image_rope_prepare = ImageRopePrepare(converted.pos_embed)
        converted.gradient_checkpointing = transformer.gradient_checkpointing
        converted.blocks_stage.gradient_checkpointing = transformer.gradient_checkpointing
        if transformer.gradient_checkpointing:
            converted._gradient_checkpointing_func = transformer._gradient_checkpointing_func
            converted.blocks_stage._gradient_checkpointing_func = transformer._gradient_checkpointing_func
        return converted

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Any, **kwargs: Any) -> "QwenImageSPTransformer2DModel":
        r"""
        Load a Qwen-Image transformer checkpoint (stock or saved by this class).

        Accepts the arguments of [`~diffusers.ModelMixin.from_pretrained`]. Raises a `ValueError` when the checkpoint's
        config names another model class.
        """
        config_keys = ("subfolder", "cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        config = cls.load_config(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in config_keys if key in kwargs}
        )
        check_qwen_image_config(config, source=str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ cache context

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        r"""
        Like diffusers' `cache_context`, filling `step_index`, `num_inference_steps` and `timestep` from the running
        pipeline when the caller did not pass them.
        """
        if self._denoising_step_fn is not None:
            step = self._denoising_step_fn()
            kwargs.setdefault("step_index", step.step_index)
            kwargs.setdefault("num_inference_steps", step.num_inference_steps)
            kwargs.setdefault("timestep", step.timestep)
        with super().cache_context(name, **kwargs):
            yield

    @contextlib.contextmanager
    def denoising_progress(self, step_fn: Callable[[], DenoisingStep]) -> Iterator[None]:
        r"""Make `cache_context` report the denoising step given by `step_fn` while the block is active."""
        previous = self._denoising_step_fn
        self._denoising_step_fn = step_fn
        try:
            yield
        finally:
            self._denoising_step_fn = previous

    # ------------------------------------------------------------------ caches

    def enable_cache(self, config: Any) -> None:
        r"""
        diffusers' `enable_cache`, which also takes a [`~diffusers_qwen_sp.TeaCacheConfig`]: TeaCache then hooks
        `blocks_stage`. Like diffusers' caches, it refuses to stack with another cache.

        Example:

        ```py
        >>> from diffusers_qwen_sp import TeaCacheConfig

        >>> transformer.enable_cache(TeaCacheConfig(threshold=0.2))
        >>> transformer.disable_cache()
        ```
        """
        from ..hooks.sequence_parallel import get_sequence_parallel_runtime
        from ..hooks.teacache import TeaCacheConfig, apply_teacache

        if isinstance(config, TeaCacheConfig):
            apply_teacache(self, config)
            return
        if get_sequence_parallel_runtime(self) is not None:
            raise ValueError(
                f"{type(config).__name__} is not supported under sequence parallelism: diffusers' caches decide or "
                "cache per rank, on each rank's shard of the image, so ranks can diverge and hang. Use "
                "TeaCacheConfig (its decision is taken from statistics all-reduced over the ranks), or disable "
                "sequence parallelism first."
            )
        super().enable_cache(config)

    def disable_cache(self) -> None:
        r"""diffusers' `disable_cache`, which also removes TeaCache."""
        from ..hooks.teacache import TeaCacheConfig, remove_teacache

        if isinstance(self._cache_config, TeaCacheConfig):
            remove_teacache(self)
            return
        super().disable_cache()

    # ------------------------------------------------------------------ the three stages

    def preprocess(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes: list,
        guidance: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> QwenImageBlockInputs:
        r"""
        Embed both streams, build the conditioning and the rotary frequencies: the part of the forward before the
        blocks. The image path goes through `modulate_index_prepare` and `image_rope_prepare`, where sequence
        parallelism shards it.
        """
        if img_shapes is None:
            raise ValueError("`img_shapes` is required: one list of (frames, height, width) per batch sample.")
        if guidance is not None:
            # The stock forward passes `guidance` to an embedder that takes no guidance and fails with a TypeError:
            # the Qwen-Image transformer has no guidance embedder, whatever `guidance_embeds` says.
            raise ValueError(
                f"`guidance` was given (shape {tuple(guidance.shape)}) but the Qwen-Image transformer has no guidance "
                "embedder, so it cannot be applied. Pass guidance=None (for the pipelines: leave guidance_scale unset "
                "and use true_cfg_scale with a negative prompt)."
            )

        hidden_states = self.img_in(hidden_states)  # (B, S_img, C) -> (B, S_img, D)
        timestep = timestep.to(hidden_states.dtype)
        timestep, modulate_index = self.modulate_index_prepare(timestep, img_shapes)

        encoder_hidden_states = self.txt_norm(encoder_hidden_states)
        encoder_hidden_states = self.txt_in(encoder_hidden_states)  # (B, S_txt, J) -> (B, S_txt, D)
        text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(
            encoder_hidden_states, encoder_hidden_states_mask
        )

        temb = self.time_text_embed(timestep, hidden_states, additional_t_cond)  # (B or 2B, D)
        hidden_states, image_freqs, text_freqs, image_shard = self.image_rope_prepare(
            hidden_states, img_shapes, text_seq_len
        )
        return QwenImageBlockInputs(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            temb=temb,
            image_rotary_emb=(image_freqs, text_freqs),
            modulate_index=modulate_index,
            image_shard=image_shard,
            attention_kwargs=attention_kwargs,
        )

    def run_blocks(
        self, inputs: QwenImageBlockInputs, controlnet_block_samples: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Run every transformer block through `blocks_stage` (where caches hook), adding controlnet residuals when given.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `(encoder_hidden_states (B, S_txt, D), hidden_states (B, S_img, D))`.
        """
        return self.blocks_stage(inputs, controlnet_block_samples)

    def postprocess(self, hidden_states: torch.Tensor, inputs: QwenImageBlockInputs) -> torch.Tensor:
        r"""Final norm and projection of the image stream: `(B, S_img, D) -> (B, S_img, p*p*C_out)`."""
        temb = inputs.temb
        if self.config.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]  # (2B, D) -> (B, D): the target's conditioning
        hidden_states = self.norm_out(hidden_states, temb)
        return self.image_output(self.proj_out(hidden_states), inputs.image_shard)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_shapes: list[tuple[int, int, int]] | None = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        additional_t_cond: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        r"""
        The stock forward's arguments and result, computed as `preprocess -> run_blocks -> postprocess`.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, S_img, in_channels)`): packed image latents.
            encoder_hidden_states (`torch.Tensor` of shape `(B, S_txt, joint_attention_dim)`): prompt embeddings.
            encoder_hidden_states_mask (`torch.Tensor` of shape `(B, S_txt)`, *optional*): 1 for real tokens.
            timestep (`torch.Tensor` of shape `(B,)`): the timestep divided by 1000.
            img_shapes (`list`): per sample, the (frames, height, width) of each packed image.
            guidance (`torch.Tensor`, *optional*): not supported by Qwen-Image (raises).
            attention_kwargs (`dict`, *optional*): passed to the attention processors.
            controlnet_block_samples (`list[torch.Tensor]`, *optional*): controlnet residuals.
            additional_t_cond (`torch.Tensor`, *optional*): extra conditioning index (Qwen-Image-Layered).
            return_dict (`bool`, defaults to `True`): return a `Transformer2DModelOutput` instead of a tuple.
        """
        inputs = self.preprocess(
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_mask,
            timestep,
            img_shapes,
            guidance=guidance,
            additional_t_cond=additional_t_cond,
            attention_kwargs=attention_kwargs,
        )
        _, hidden_states = self.run_blocks(inputs, controlnet_block_samples)
        output = self.postprocess(hidden_states, inputs)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def _adopt_peft_layers(source: nn.Module, target: nn.Module) -> None:
    r"""
    Move the PEFT tuner layers of `source` (e.g. `lora.Linear` wrappers that `load_lora_weights` put around its
    linears) to the same paths of `target`, with the adapters' config.

    A LoRA wrapper's parameters (`base_layer.weight`, `lora_A.<adapter>.weight`...) have no place in a freshly built
    model, so loading the state dict alone fails; and diffusers' `set_adapters`, `fuse_lora`, `unload_lora_weights`
    find the adapters through the wrappers and `peft_config`. Any tuner layer at any path is adopted, whatever it
    wraps.
    """
    if "peft" not in sys.modules:  # no module holds tuner layers before peft is imported; importing it costs seconds
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    adopted: list[str] = []
    for name, module in source.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(f"{outer}.") for outer in adopted):
            target.set_submodule(name, module)  # the outermost tuner layer, with the base layer it wraps
            adopted.append(name)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(source):
            setattr(target, attribute, getattr(source, attribute))


def _refuse_hooks_lost_in_conversion(transformer: nn.Module) -> None:
    r"""
    Raise a `ValueError` when a stock transformer carries hooks (offloading, caches) that converting it to a
    [`QwenImageSPTransformer2DModel`] would drop: the conversion builds new modules around the same weights.
    """
    found = []
    for module_name, module in transformer.named_modules():
        where = module_name or "the root"
        registry = getattr(module, "_diffusers_hook", None)
        found += [f"{hook_name!r} on {where}" for hook_name in getattr(registry, "hooks", {})]
        if getattr(module, "_hf_hook", None) is not None:
            found.append(f"accelerate {type(module._hf_hook).__name__} on {where}")
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(
            f"The {type(transformer).__name__} given carries hooks ({shown}) that converting it to "
            "QwenImageSPTransformer2DModel would silently drop. Convert it without them and enable offloading or caches "
            "afterwards (pipe.enable_model_cpu_offload(), pipe.enable_group_offload(...), "
            "pipe.transformer.enable_cache(...)), or load it with QwenImageSPTransformer2DModel.from_pretrained(...) so "
            "that no conversion is needed."
        )


def check_qwen_image_config(config: dict[str, Any], source: str) -> None:
    r"""Raise a `ValueError` naming `source` when `config` is not a Qwen-Image transformer config."""
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in QWEN_IMAGE_TRANSFORMER_CLASS_NAMES:
        raise ValueError(
            f"{source} holds a {class_name}, not a Qwen-Image transformer. Point to the transformer of a Qwen-Image "
            "checkpoint (e.g. from_pretrained('Qwen/Qwen-Image', subfolder='transformer'))."
        )
    if class_name is None and "num_attention_heads" not in config:
        raise ValueError(
            f"{source} has no Qwen-Image transformer config (config.json without `_class_name` or "
            "`num_attention_heads`). Point to the transformer folder of a Qwen-Image checkpoint."
        )


__all__ = [
    "DenoisingStep",
    "QwenImageSPTransformer2DModel",
    "check_qwen_image_config",
]

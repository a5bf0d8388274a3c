"""Measured per-rank memory on CPU (gloo) at world 2 and 4: parameter bytes each rank holds and the peak bytes of live
tensors during a transformer forward, a VAE decode and the prompt encode, for each placement of the weights
([`measure_memory`]).

Each rank builds random-weight models from configs (nothing is downloaded): the bench's mid-size transformer (real
channels, few blocks), a Qwen2.5-VL text encoder of the same width, the real Qwen-Image VAE architecture, in a
`QwenImageSPPipeline`, and measures three pipelines one after the other (each freed before the next):

1. replicated: transformer and text encoder whole on every rank; VAE decode whole, then patch-parallel
   (`pipe.enable_parallel_vae()`);
2. the transformer's blocks sharded (`shard_weights=True`) and the text encoder on rank 0 only (`"one_rank"`);
3. the text encoder sharded (`"sharded"`), with a sharded transformer.

Peaks are [`LiveBytes`] over the first call of each stage (so one-time allocations such as FSDP2's all-gather
buffers count), above what was alive before it. Next to each, the computed model of `fit` at the same geometry and
dtype predicts it: the check that the model the GPU table rests on matches what the code allocates.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from .counter import LiveBytes


@dataclass(frozen=True)
class MemorySettings:
    r"""
    The measured run: world sizes, the models and the inputs. The defaults take about 2 minutes on 2 CPU cores;
    [`QUICK`] takes seconds (tests).

    Args:
        worlds: gloo world sizes (Ulysses degree = world; must divide `heads`).
        layers, heads, head_dim: the transformer (real channels; text width `heads * head_dim`).
        te_layers, te_intermediate: the text encoder's decoder layers and MLP width (its hidden size is the
            transformer's text width, so its embeddings feed the transformer).
        vae_base_dim: the VAE's base channels (96: the real Qwen-Image VAE; dim_mult (1, 2, 4, 4) either way).
        image_side: image tokens per side of the transformer forward; text_tokens: its text tokens.
        decode_side: pixels per side of the decoded image (multiple of 16).
        prompt_repeats: how often the prompt sentence repeats (the prompt's length in tokens grows with it).
    """

    worlds: tuple[int, ...] = (2, 4)
    layers: int = 8
    heads: int = 8
    head_dim: int = 64
    te_layers: int = 8
    te_intermediate: int = 1536
    vae_base_dim: int = 96
    image_side: int = 32
    text_tokens: int = 64
    decode_side: int = 256
    prompt_repeats: int = 8
    timeout: float = 1500.0

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "te_layers", "te_intermediate", "vae_base_dim", "image_side",
                     "text_tokens", "decode_side", "prompt_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemorySettings.{name} must be a positive integer, got {value!r}.")
        if not self.worlds or any(not isinstance(w, int) or w < 2 or self.heads % w for w in self.worlds):
            raise ValueError(
                f"MemorySettings.worlds must be world sizes >= 2 that divide heads={self.heads} (Ulysses), got "
                f"{self.worlds!r}."
            )
        if self.decode_side % 16:
            raise ValueError(f"decode_side must be a multiple of 16 pixels, got {self.decode_side}.")
        if self.head_dim % 8:
            raise ValueError(f"head_dim must be a multiple of 8 (three rotary axes), got {self.head_dim}.")


QUICK = MemorySettings(worlds=(2,), layers=2, heads=4, head_dim=16, te_layers=2, te_intermediate=128, vae_base_dim=8,
                       image_side=8, text_tokens=16, decode_side=32, prompt_repeats=2, timeout=300.0)

_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_SENTENCES = ("a red cat on a blue mat", "a city street at night with neon signs", "a mountain lake at dawn")


def model_configs(settings: MemorySettings) -> dict[str, Any]:
    r"""The configs of the measured models (JSON-able), which the computed model traces too."""
    from ..rows import mid_size_config
    from ...small_components import small_text_encoder_config
    from .model_sizes import QWEN_IMAGE_VAE

    transformer = mid_size_config(settings.layers, settings.heads, settings.head_dim)
    transformer["axes_dims_rope"] = list(transformer["axes_dims_rope"])
    text_encoder = small_text_encoder_config(_tokenizer(), vocab_size=512,
                                             hidden_size=transformer["joint_attention_dim"]).to_dict()
    text_encoder["text_config"].update(num_hidden_layers=settings.te_layers,
                                       intermediate_size=settings.te_intermediate)
    text_encoder["text_config"].pop("layer_types", None)  # rebuilt for the new layer count
    vae = dict(QWEN_IMAGE_VAE, base_dim=settings.vae_base_dim)
    return json.loads(json.dumps({"transformer": transformer, "text_encoder": text_encoder, "vae": vae}))


def _tokenizer() -> Any:
    from ...small_components import build_bpe_tokenizer

    return build_bpe_tokenizer(tuple(_TEMPLATE.format(text) for text in _SENTENCES), vocab_size=512)


def _prompt(settings: MemorySettings) -> str:
    return " and ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(settings.prompt_repeats))


# ---------------------------------------------------------------------------------------------------- worker


def _build_pipeline(configs: dict[str, Any], vae: Any, seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ...models import QwenImageSPTransformer2DModel
    from ...pipelines import QwenImageSPPipeline
    from ...small_components import flow_match_scheduler_config

    torch.manual_seed(seed)
    transformer = QwenImageSPTransformer2DModel(**configs["transformer"]).eval()
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**configs["text_encoder"])).eval()
    return QwenImageSPPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**flow_match_scheduler_config()), vae=vae,
        text_encoder=text_encoder, tokenizer=_tokenizer(), transformer=transformer,
    )


def _peak(fn: Any) -> int:
    """Peak live bytes of the first call of `fn` on this rank (every rank calls it at once)."""
    gc.collect()
    dist.barrier()
    with torch.no_grad(), LiveBytes() as counter:
        output = fn()
    del output
    return counter.peak_bytes


def _held(pipe: Any) -> dict[str, int]:
    from ...weight_sharding import parameter_bytes

    encoder = pipe.text_encoder
    text_encoder = parameter_bytes(encoder)[0] if isinstance(encoder, torch.nn.Module) else 0
    return {"transformer": parameter_bytes(pipe.transformer)[0], "text_encoder": text_encoder,
            "vae": parameter_bytes(pipe.vae)[0]}


def _agreed_skip(error: str) -> str:
    # Every rank learns whether one failed, so all skip the same stages (or the collectives would diverge).
    failed = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return error or ("failed on another rank" if failed.item() else "")


def _stage(results: dict[str, Any], key: str, fn: Any) -> None:
    error = ""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - a stage that cannot run is reported as skipped, not fatal
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        value = None
    error = _agreed_skip(error)
    results[key] = {"skipped": error} if error else ({"done": True} if value is None else value)


def _memory_worker(rank: int, world: int, settings: MemorySettings, configs: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**configs["vae"]).eval()
    transformer_config = configs["transformer"]
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, settings.image_side**2, transformer_config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(1, settings.text_tokens, transformer_config["joint_attention_dim"],
                                          generator=generator),
        encoder_hidden_states_mask=None, timestep=torch.tensor([0.5]),
        img_shapes=[[(1, settings.image_side, settings.image_side)]], return_dict=False,
    )
    factor = 2 ** (len(configs["vae"]["dim_mult"]) - 1)
    latent_side = settings.decode_side // factor
    latents = torch.randn(1, configs["vae"]["z_dim"], 1, latent_side, latent_side, generator=generator)
    prompt = _prompt(settings)
    results: dict[str, Any] = {"rank": rank}

    def forward(pipe: Any) -> Any:
        return lambda: _peak(lambda: pipe.transformer(**inputs)[0])

    def encode(pipe: Any) -> Any:
        return lambda: _peak(lambda: pipe.encode_prompt(prompt=[prompt], device=torch.device("cpu"))[0])

    def decode(pipe: Any) -> Any:
        return lambda: _peak(lambda: pipe.vae.decode(latents, return_dict=False)[0])

    # 1. Everything replicated; the VAE decode whole, then patch-parallel.
    pipe = _build_pipeline(configs, vae, seed=0)
    pipe.enable_sequence_parallel(ulysses_degree=world, text_encoder="replicated", parallel_vae=False)
    results["held replicated"] = _held(pipe)
    _stage(results, "forward replicated", forward(pipe))
    _stage(results, "encode replicated", encode(pipe))
    _stage(results, "decode whole", decode(pipe))
    pipe.enable_parallel_vae()
    _stage(results, "decode parallel", decode(pipe))
    pipe.disable_parallel_vae()  # the VAE is shared by the three pipelines: hooked by the SP groups of one only
    del pipe

    # 2. Sharded transformer blocks, the text encoder on rank 0 only.
    pipe = _build_pipeline(configs, vae, seed=0)
    pipe.enable_sequence_parallel(ulysses_degree=world, shard_weights=True, text_encoder="one_rank", parallel_vae=False)
    results["held sharded"] = _held(pipe)
    _stage(results, "forward sharded", forward(pipe))
    _stage(results, "encode one_rank", encode(pipe))
    del pipe

    # 3. The text encoder sharded too.
    pipe = _build_pipeline(configs, vae, seed=0)
    pipe.enable_sequence_parallel(ulysses_degree=world, shard_weights=True, text_encoder="sharded", parallel_vae=False)
    results["held te sharded"] = _held(pipe)
    _stage(results, "encode sharded", encode(pipe))
    del pipe
    gc.collect()
    return results


# ---------------------------------------------------------------------------------------------------- driver


def _predictions(settings: MemorySettings, configs: dict[str, Any], world: int, prompt_tokens: int) -> dict[str, int]:
    r"""What the computed model (`fit`) predicts for the measured stages, at the same geometry, in float32."""
    from .fit import decode_activation, forward_activation
    from .model_sizes import text_encode_peak, text_encoder_parameters

    fp32 = torch.float32
    segments = (settings.image_side**2,)
    forward = forward_activation(configs["transformer"], segments, settings.text_tokens, settings.image_side,
                                 world, False, fp32)
    sharded = forward_activation(configs["transformer"], segments, settings.text_tokens, settings.image_side,
                                 world, True, fp32)
    side = settings.decode_side
    encode = text_encode_peak(configs["text_encoder"], prompt_tokens, 1, fp32)
    layer = text_encoder_parameters(configs["text_encoder"]).layer * 4
    return {
        "forward replicated": forward, "forward sharded": sharded,
        "decode whole": decode_activation(configs["vae"], side, side, world, False, 1, fp32),
        "decode parallel": decode_activation(configs["vae"], side, side, world, True, 1, fp32),
        "encode replicated": encode, "encode one_rank": encode, "encode sharded": encode + 3 * layer,
    }


def measure_memory(settings: MemorySettings | None = None, progress: Any = None) -> dict[str, Any]:
    r"""
    Run the measured part at each world size of `settings` and return a JSON-able report: per world, each rank's
    parameter bytes and stage peaks, the model's predictions, and the targets (sharded transformer bytes per rank
    <= replicated / world + one block; the ranks without the text encoder under `"one_rank"` save its whole size).

    Args:
        settings ([`MemorySettings`], *optional*): default `MemorySettings()` (about 2 minutes on 2 cores).
        progress (`Callable[[str], None]`, *optional*): called with a line after each world size.

    Example:

    ```py
    >>> from diffusers_qwen_sp.bench.memory import QUICK, measure_memory

    >>> report = measure_memory(QUICK)
    >>> report["worlds"]["2"]["targets"]["sharded_bytes_ratio"]
    ```
    """
    from ...distributed import run_distributed
    from .model_sizes import transformer_parameters

    settings = settings if settings is not None else MemorySettings()
    configs = model_configs(settings)
    prompt_tokens = len(_tokenizer()(_TEMPLATE.format(_prompt(settings))).input_ids)
    block_bytes = transformer_parameters(configs["transformer"]).block * 4
    report: dict[str, Any] = {"settings": asdict(settings), "configs": configs, "prompt_tokens": prompt_tokens,
                              "block_bytes": block_bytes, "worlds": {}}
    for world in settings.worlds:
        start = time.perf_counter()
        per_rank = run_distributed(_memory_worker, world, settings, configs, timeout=settings.timeout)
        report["worlds"][str(world)] = {
            "ranks": per_rank,
            "predicted": _predictions(settings, configs, world, prompt_tokens),
            "targets": targets(per_rank, world, block_bytes),
            "wall_s": time.perf_counter() - start,
        }
        if progress is not None:
            progress(f"world {world}: {time.perf_counter() - start:.0f} s")
    return report


def targets(per_rank: list[dict[str, Any]], world: int, block_bytes: int) -> dict[str, Any]:
    r"""
    The done-when checks, recomputed from the rows: the largest rank's sharded transformer bytes over its replicated
    bytes against `1 / world + block / replicated`, and, under `"one_rank"`, the text-encoder bytes each other rank
    saves against the whole encoder's size.
    """
    replicated = max(rank["held replicated"]["transformer"] for rank in per_rank)
    sharded = max(rank["held sharded"]["transformer"] for rank in per_rank)
    limit = replicated / world + block_bytes
    result: dict[str, Any] = {
        "sharded_bytes_ratio": sharded / replicated,
        "sharded_bytes_target": limit / replicated,
        "sharded_met": sharded <= limit,
    }
    whole = per_rank[0]["held replicated"]["text_encoder"]
    saved = [rank["held replicated"]["text_encoder"] - rank["held sharded"]["text_encoder"] for rank in per_rank[1:]]
    result["one_rank"] = {"text_encoder_bytes": whole, "saved_per_other_rank": saved,
                          "met": all(value == whole for value in saved),
                          "rank0_keeps": per_rank[0]["held sharded"]["text_encoder"] == whole}
    return result


__all__ = ["QUICK", "MemorySettings", "measure_memory", "model_configs", "targets"]

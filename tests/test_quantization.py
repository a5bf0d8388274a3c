"""torchao-quantized transformers under sequence and CFG parallelism, against the stock single-process pipeline.

Every case compares our pipeline, under one SP mode, with the stock diffusers `QwenImagePipeline` run in one process
in the same quantization state (fp32 base weights, then torchao's `quantize_`). The quantized transformer reaches our
pipeline in two ways:

- `quantize_after`: `quantize_(pipe.transformer, config)` on our pipeline (its transformer is already ours);
- `quantized_stock`: a stock `QwenImageTransformer2DModel` is quantized first and handed to our pipeline's constructor,
  which converts it with `QwenImageSPTransformer2DModel.from_transformer` (the tensor-subclass weights must survive).
  `pipe.transformer = quantized_stock` takes the same path (`__setattr__`); the single-process tests at the end check
  what the conversion keeps: the parameter objects themselves, their `requires_grad`, torchao's weight repr.

Configurations: int8 weight-only, int8 dynamic activation (per-token scales) x int8 weight, and float8 weight-only,
which all run on CPU (torch 2.13, torchao 0.18); float8 dynamic activation needs a GPU of compute capability >= 8.9
and is tested only there. SP modes: Ulysses 2 and Ring 2 (world 2), Ulysses 2 x Ring 2 and CFG 2 x Ulysses 2
(world 4); each case calls the pipeline twice and checks both calls.

Tolerance: max abs diff <= 1e-4 on images in [0, 1], as for the unquantized SP tests, except int8 dynamic under Ring
(Ring 2, Ulysses 2 x Ring 2): 4e-3. Measured (max over ranks and both calls; the same for both handoffs):

| mode | int8 weight-only | int8 dynamic | float8 weight-only |
| --- | --- | --- | --- |
| Ulysses 2 | 0 | 0 | 0 |
| Ring 2 | 4.8e-7 | 1.25e-3 | 3.6e-7 |
| Ulysses 2 x Ring 2 | 3.9e-7 | 1.25e-3 | 3.9e-7 |
| CFG 2 x Ulysses 2 | 0 | 0 | 0 |
| quantization itself (stock, fp32 -> quantized) | 1.2e-3 | 6.0e-3 | 7.3e-3 |

Why Ring, and only int8 dynamic: sequence parallelism splits tokens, never the hidden dimension, so per-row weight
scales and per-token activation scales (the int8 dynamic default) see the same numbers as in one process; Ulysses
and CFG parallel are bit-exact. Ring merges partial attention with log-sum-exp weights, which reorders sums: the
output moves by ~4e-7, as in the unquantized tests. Weight-only quantization passes such a
difference through unchanged. Dynamic activation quantization rounds every activation to an int8 code: an activation
within 4e-7 of a rounding boundary flips to the neighbouring code, a step of |x|max/127 of its token, which the later
layers carry to the image. This is the quantizer's own sensitivity, not a sharding error: in ONE process, perturbing
the transformer input by 4e-7 (relative, random) moves the int8-dynamic image by 3.0e-3 (fp32 and int8 weight-only:
4.8e-7 and 4.5e-7). Hence 4e-3: above that single-process sensitivity, below the 6.0e-3 that quantization itself
moves the image (a run that lost its quantization would fail; the weight type is checked as well).

A per-tensor activation scale (float8 dynamic's default granularity) would be computed from this rank's shard only,
which is not split-invariant: the float8 dynamic cases (CUDA, compute capability >= 8.9 only) pin `PerRow`, which
torchao 0.18 allows only on bf16 weights, so they run in bf16 against the bf16 bar (max <= 2e-1).
"""

from __future__ import annotations

import pytest
import torch

from diffusers_qwen_sp import QwenImageSPTransformer2DModel
from diffusers_qwen_sp.distributed import run_distributed
from diffusers_qwen_sp.testing import (
    build_tiny_components,
    build_tiny_pipeline,
    sp_pipeline_class,
    tiny_pipeline_call_kwargs,
)

from _spawn import Spawn, spawn_fixture, world_cases


torchao_quantization = pytest.importorskip("torchao.quantization", reason="needs torchao (pip install torchao)")

TOLERANCE = 1e-4
# Quantization must move the stock output by more than this, or a parity check could pass with the weights unquantized.
EFFECT_FLOOR = 1e-3
# Int8 dynamic under Ring (see the module docstring): one-step flips of per-token int8 activation codes.
RING_INT8_DYNAMIC_TOLERANCE = 4e-3
# torchao 0.18's float8 dynamic PerRow (per-token) needs bf16 weights: that case runs in bf16, against the bf16 bar
# (the peers' SP bar in bf16: max abs diff <= 2e-1 on [0, 1] images), set by bf16 attention, not by quantization.
BASE_DTYPES = {"float8_dynamic": torch.bfloat16}
BF16_SP_TOLERANCE = 2e-1
# 5 x 7 = 35 image tokens: odd, so the last SP rank holds a padding slot; true CFG on (for the CFG-parallel mode).
CALL = dict(height=40, width=56)
CALLS_PER_CASE = 2
HANDOFFS = ("quantize_after", "quantized_stock")
# mode -> (cfg, ulysses, ring), per world size
MODES = {
    2: {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2)},
    4: {"ulysses2xring2": (1, 2, 2), "cfg2xulysses2": (2, 2, 1)},
}
CPU_QUANTIZATIONS = ("int8_weight_only", "int8_dynamic", "float8_weight_only")


def _quantization_config(name: str):
    q = torchao_quantization
    return {
        "int8_weight_only": lambda: q.Int8WeightOnlyConfig(),
        "int8_dynamic": lambda: q.Int8DynamicActivationInt8WeightConfig(),  # per-token activation scales
        "float8_weight_only": lambda: q.Float8WeightOnlyConfig(),
        "float8_dynamic": lambda: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()),
    }[name]()


def _placed(model, device: str, dtype: torch.dtype):
    # Casting to the dtype the tiny models already have makes diffusers warn about fp32 modules: cast only for bf16.
    return model.to(device) if dtype == torch.float32 else model.to(device, dtype)


def _images(pipe, device: str) -> torch.Tensor:
    kwargs = tiny_pipeline_call_kwargs("qwen_image", **CALL)
    with torch.no_grad():
        return pipe(**kwargs).images.to(device="cpu", dtype=torch.float32)


def _stock_reference(quantization: str, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The stock pipeline in one process, quantized; and how far quantization moved it from the unquantized one."""
    stock = _placed(build_tiny_pipeline("qwen_image"), device, dtype)
    unquantized = _images(stock, device)
    torchao_quantization.quantize_(stock.transformer, _quantization_config(quantization))
    reference = _images(stock, device)
    return reference, (reference - unquantized).abs().max().item()


def _our_pipeline(quantization: str, handoff: str, device: str, dtype: torch.dtype):
    if handoff == "quantize_after":
        pipe = _placed(build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image")), device, dtype)
        torchao_quantization.quantize_(pipe.transformer, _quantization_config(quantization))
    else:
        components = build_tiny_components("qwen_image")
        _placed(components["transformer"], device, dtype)
        torchao_quantization.quantize_(components["transformer"], _quantization_config(quantization))
        pipe = _placed(sp_pipeline_class("qwen_image")(**components), device, dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _quantized_worker(rank: int, world_size: int, quantizations: tuple[str, ...], device: str = "cpu") -> dict:
    """Every quantization x handoff x SP mode of this world size; case id -> this rank's numbers."""
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    results = {}
    for quantization in quantizations:
        dtype = BASE_DTYPES.get(quantization, torch.float32)
        reference, quantization_effect = _stock_reference(quantization, device, dtype)
        for handoff in HANDOFFS:
            pipe = _our_pipeline(quantization, handoff, device, dtype)
            block = pipe.transformer.transformer_blocks[0]
            weight_type = type(block.attn.to_q.weight).__name__
            tokens_seen = []
            probe = block.register_forward_pre_hook(lambda module, args: tokens_seen.append(args[0].shape[1]))
            for mode, (cfg, ulysses, ring) in MODES[world_size].items():
                pipe.enable_sequence_parallel(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring)
                diffs = []
                for _ in range(CALLS_PER_CASE):
                    tokens_seen.clear()
                    diffs.append((_images(pipe, device) - reference).abs().max().item())
                pipe.disable_sequence_parallel()
                results[f"{mode}-{quantization}-{handoff}"] = {
                    "diffs": diffs,
                    "weight_type": weight_type,
                    "quantization_effect": quantization_effect,
                    "tokens_seen": list(tokens_seen),  # block 0's image tokens per call of the last pipeline call
                }
            probe.remove()
    return results


def _cases(quantizations: tuple[str, ...]) -> dict[int, list[str]]:
    return {
        world: [f"{mode}-{q}-{handoff}" for mode in modes for q in quantizations for handoff in HANDOFFS]
        for world, modes in MODES.items()
    }


def _check_case(per_rank: list[dict], world_size: int, case: str) -> None:
    mode, quantization, _ = case.split("-")
    cfg, ulysses, ring = MODES[world_size][mode]
    if quantization == "float8_dynamic":
        tolerance = BF16_SP_TOLERANCE
    elif quantization == "int8_dynamic" and ring > 1:
        tolerance = RING_INT8_DYNAMIC_TOLERANCE
    else:
        tolerance = TOLERANCE
    image_tokens = 5 * 7
    sp_degree = ulysses * ring
    for rank, result in enumerate(per_rank):
        assert result["weight_type"] not in ("Parameter", "Tensor"), f"rank {rank}: weights not quantized: {result}"
        # Not vacuous: quantization moved the stock output by far more than the tolerance.
        assert result["quantization_effect"] > EFFECT_FLOOR, f"rank {rank}: {result}"
        assert all(diff <= tolerance for diff in result["diffs"]), f"rank {rank}: {result}"
        # The blocks saw this rank's shard, ceil(35 / SP degree) tokens; one transformer call per step with CFG
        # parallel (this rank's branch), two without.
        expected_calls = 2 if cfg == 2 else 4  # 2 steps
        assert result["tokens_seen"] == [-(-image_tokens // sp_degree)] * expected_calls, f"rank {rank}: {result}"


spawned = spawn_fixture(
    _quantized_worker,
    Spawn(2, args=(CPU_QUANTIZATIONS,), timeout=150.0),
    Spawn(4, args=(CPU_QUANTIZATIONS,), timeout=240.0),
)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size, case", world_cases(_cases(CPU_QUANTIZATIONS)))
def test_quantized_matches_stock_single_process(spawned, world_size, case):
    _check_case(spawned[world_size].case(case), world_size, case)


def _float8_dynamic_skip_reason(world_size: int = 1) -> str | None:
    if not torch.cuda.is_available():
        return "float8 dynamic activation quantization needs CUDA (torchao: compute capability >= 8.9); CPU only here"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"float8 dynamic activation needs compute capability >= 8.9, got {torch.cuda.get_device_capability()}"
    if torch.cuda.device_count() < world_size:
        return f"needs {world_size} GPUs (one per rank, NCCL), found {torch.cuda.device_count()}"
    return None


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_float8_dynamic_single_process_on_cuda(handoff):
    reason = _float8_dynamic_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    reference, quantization_effect = _stock_reference("float8_dynamic", "cuda", torch.bfloat16)
    pipe = _our_pipeline("float8_dynamic", handoff, "cuda", torch.bfloat16)
    assert type(pipe.transformer.proj_out.weight).__name__ == "Float8Tensor"
    assert quantization_effect > EFFECT_FLOOR
    for call in range(CALLS_PER_CASE):
        # Same operations in the same order as the stock forward: equal within the fp32 tolerance even in bf16.
        diff = (_images(pipe, "cuda") - reference).abs().max().item()
        assert diff <= TOLERANCE, f"call {call}: {diff}"


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size, case", world_cases(_cases(("float8_dynamic",))))
def test_float8_dynamic_under_sp_on_cuda(world_size, case, request):
    reason = _float8_dynamic_skip_reason(world_size)
    if reason is not None:
        pytest.skip(reason)
    # One spawn per world size for all its cases, kept on the module like the CPU spawns.
    runs = request.module.__dict__.setdefault("_float8_dynamic_runs", {})
    if world_size not in runs:
        runs[world_size] = run_distributed(
            _quantized_worker, world_size, ("float8_dynamic",), device="cuda", backend="nccl", timeout=240.0
        )
    _check_case([result[case] for result in runs[world_size]], world_size, case)


# ---------------------------------------------------------------------------------------------------------------------
# Single process: what from_transformer keeps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", CPU_QUANTIZATIONS)
def test_from_transformer_keeps_quantized_weights(quantization):
    stock = build_tiny_components("qwen_image")["transformer"]
    torchao_quantization.quantize_(stock, _quantization_config(quantization))
    stock_weight = stock.transformer_blocks[0].attn.to_q.weight
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    pipe.transformer = stock  # converted on assignment

    converted = pipe.transformer
    assert isinstance(converted, QwenImageSPTransformer2DModel)
    weight = converted.transformer_blocks[0].attn.to_q.weight
    # The stock parameter itself: same tensor subclass, same quantized data, still frozen like quantize_ left it.
    assert weight is stock_weight and type(weight).__name__ in ("Int8Tensor", "Float8Tensor"), type(weight)
    assert weight.qdata.data_ptr() == stock_weight.qdata.data_ptr()
    stock_flags = {name: p.requires_grad for name, p in stock.named_parameters()}
    assert {name: p.requires_grad for name, p in converted.named_parameters()} == stock_flags
    assert not stock_flags["transformer_blocks.0.attn.to_q.weight"]
    # print(transformer) still shows the quantized weight type, as torchao shows it on the stock model.
    assert repr(converted.transformer_blocks[0].attn.to_q) == repr(stock.transformer_blocks[0].attn.to_q)
    assert type(weight).__name__ in repr(converted.proj_out)


def test_from_transformer_keeps_frozen_weights():
    stock = build_tiny_components("qwen_image")["transformer"]
    stock.transformer_blocks.requires_grad_(False)  # e.g. training only the embedders
    converted = QwenImageSPTransformer2DModel.from_transformer(stock)
    flags = {name: p.requires_grad for name, p in converted.named_parameters()}
    assert flags == {name: p.requires_grad for name, p in stock.named_parameters()}
    assert not flags["transformer_blocks.1.img_mlp.net.2.weight"] and flags["img_in.weight"]

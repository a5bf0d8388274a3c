"""The per-rank worker of the bench ([`_bench_worker`], spawned by `run_distributed`): it builds the transformer (random
weights materialised on the device, or a checkpoint), one runner per row, the inputs, and measures every row in
interleaved rounds."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers import (
    ContextParallelConfig,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.utils import logging

from ..hooks import SequenceParallelConfig, TeaCacheConfig, teacache_stats
from ..models import QwenImageSPTransformer2DModel
from ..pipelines import QwenImageSPPipeline
from ..small_components import flow_match_scheduler_config
from .instrumentation import (
    PeakMemory,
    cpu_name,
    _agree,
    _count_bytes,
    describe,
    _max_abs_diff,
    _timed_call,
    cpu_accelerator_count,
    rotated,
)
from .rows import RowSpec, _model_location, transformer_config
from .settings import BenchSettings


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _rebuild_rope(model: QwenImageTransformer2DModel, like: torch.nn.Module) -> None:
    # The rotary tables are plain tensors (not buffers) built by the constructor on the CPU: a meta-built model has
    # meta ones. Rebuild them like the stock constructor does (see QwenImageSPTransformer2DModel.from_transformer).
    model.pos_embed = type(like)(theta=like.theta, axes_dim=list(like.axes_dim), scale_rope=like.scale_rope)


def materialize_random_transformer(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> QwenImageTransformer2DModel:
    r"""
    A stock `QwenImageTransformer2DModel` with random weights built directly on `device` in `dtype`.

    The model is built on the meta device (no memory), cast there, given uninitialised storage on `device`
    (`to_empty`) and initialised like the stock constructor would: `reset_parameters` of every module that has one
    (Linear: Kaiming-uniform), RMSNorm weights to one. The full-size model (20 B parameters) thus never exists in fp32
    or on the CPU. Seeded: the same on every rank of one device type.
    """
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                continue
            for name, parameter in own.items():
                if parameter.ndim == 1:  # norm scales and biases
                    parameter.fill_(1.0 if name == "weight" else 0.0)
                else:
                    parameter.normal_(0.0, 0.02)
    _rebuild_rope(model, model.pos_embed)
    return model.eval()


def _load_transformer(model: str, device: torch.device, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    path, subfolder = _model_location(model)
    kwargs: dict[str, Any] = dict(subfolder=subfolder, dtype=dtype)
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight to this rank's GPU: no full copy in host memory per rank
    transformer = QwenImageTransformer2DModel.from_pretrained(path, **kwargs)
    return transformer.to(device).eval()


def shared_stock_copy(stock: QwenImageTransformer2DModel) -> QwenImageTransformer2DModel:
    r"""A second stock instance whose parameters are the same tensors (no copy), for diffusers' CP or compilation to
    change while the original stays as it is."""
    with torch.device("meta"):
        copy = QwenImageTransformer2DModel.from_config(stock.config)
    copy.load_state_dict(stock.state_dict(), strict=True, assign=True)
    _rebuild_rope(copy, stock.pos_embed)
    return copy.eval()


def _fingerprint(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().float().sum(dtype=torch.float64).item() for p in model.parameters()))


def _make_identical(model: torch.nn.Module, world: int) -> bool:
    """Broadcast rank 0's weights when the ranks' weights differ (sharded results mixing different models). Returns
    whether it had to."""
    if world == 1:
        return False
    prints: list[Any] = [None] * world
    dist.all_gather_object(prints, _fingerprint(model))
    if len(set(prints)) == 1:
        return False
    with torch.no_grad():
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)
    return True


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**flow_match_scheduler_config())  # the real Qwen-Image scheduler config


@dataclass
class _Runner:
    """A row's live objects on one rank."""

    spec: RowSpec
    transformer: torch.nn.Module | None = None
    pipe: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def build(self, stock: QwenImageTransformer2DModel, settings: BenchSettings) -> None:
        spec = self.spec
        components = dict(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None)
        if spec.kind == "stock":
            self.transformer = stock
            self.pipe = QwenImagePipeline(transformer=stock, **components)
        elif spec.kind == "diffusers_cp":
            self.transformer = shared_stock_copy(stock)
            with cpu_accelerator_count():
                self.transformer.enable_parallelism(
                    config=ContextParallelConfig(ulysses_degree=spec.ulysses, ring_degree=spec.ring)
                )
            self.pipe = QwenImagePipeline(transformer=self.transformer, **components)
        else:
            # Each row its own staged transformer, sharing the stock weights: no hooks are applied or removed
            # between timed calls.
            self.pipe = QwenImageSPPipeline(
                transformer=QwenImageSPTransformer2DModel.from_transformer(stock), **components
            )
            if spec.parallel:
                self.pipe.enable_sequence_parallel(
                    SequenceParallelConfig(
                        ulysses_degree=spec.ulysses, ring_degree=spec.ring, cfg_degree=spec.cfg,
                        timeout=settings.timeout,
                    )
                )
            if spec.teacache is not None:
                self.pipe.enable_teacache(TeaCacheConfig(threshold=spec.teacache))
            if spec.compiled:  # compiles at the first call: the untimed warm-up round
                self.pipe.transformer.compile_repeated_blocks(fullgraph=True)
            self.transformer = self.pipe.transformer
        self.pipe.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _text_mask(settings: BenchSettings, device: torch.device) -> torch.Tensor:
    mask = torch.ones(1, settings.text_tokens, dtype=torch.long, device=device)
    if settings.text_padding:
        mask[:, settings.text_tokens - settings.text_padding :] = 0  # a prompt shorter than the padded length
    return mask


def forward_inputs(
    config: dict[str, Any], settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    r"""Inputs of one transformer forward (batch 1), as the pipeline's conditional call passes them."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    height, width = settings.grid
    mask = _text_mask(settings, device) if settings.text_padding else None  # the pipeline turns all-ones into None
    return dict(
        hidden_states=torch.randn(1, settings.image_tokens, config["in_channels"], generator=generator).to(
            device, dtype
        ),
        encoder_hidden_states=torch.randn(
            1, settings.text_tokens, config["joint_attention_dim"], generator=generator
        ).to(device, dtype),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((1,), 0.7, device=device, dtype=dtype),
        img_shapes=[[(1, height, width)]],
        return_dict=False,
    )


def pipeline_inputs(
    config: dict[str, Any], settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    r"""Keyword arguments of one pipeline call from random prompt embeddings (both CFG branches), without the
    generator."""
    generator = torch.Generator().manual_seed(settings.seed + 2)
    shape = (1, settings.text_tokens, config["joint_attention_dim"])
    # Real text-encoder states are far from unit-normal; unit-normal ones are what a random model gets.
    return dict(
        prompt_embeds=torch.randn(shape, generator=generator).to(device, dtype),
        prompt_embeds_mask=_text_mask(settings, device),
        negative_prompt_embeds=torch.randn(shape, generator=generator).to(device, dtype),
        negative_prompt_embeds_mask=_text_mask(settings, device),
        true_cfg_scale=settings.cfg_scale,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------------------------------


def _bench_worker(rank: int, world: int, settings: BenchSettings, rows: tuple[RowSpec, ...]) -> dict[str, Any]:
    if settings.device == "cuda":
        torch.cuda.set_device(rank)  # before any collective: NCCL binds the communicator to the current device
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(settings.threads)
    logging.set_verbosity_error()  # enable_parallelism warns "experimental" on every rank
    # diffusers' CP output gather calls a deprecated functional collective on every forward.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    dtype = settings.torch_dtype

    start = time.perf_counter()
    if settings.model is not None:
        stock = _load_transformer(settings.model, device, dtype)
    else:
        stock = materialize_random_transformer(transformer_config(settings), device, dtype, settings.seed)
    broadcast = _make_identical(stock, world)
    config = dict(stock.config)
    phase_s = {"model": time.perf_counter() - start}
    start = time.perf_counter()

    runners = [_Runner(spec) for spec in rows]
    for runner in runners:
        error = runner.spec.unavailable
        if not error:
            try:
                runner.build(stock, settings)
            except Exception as exc:  # noqa: BLE001 - e.g. diffusers CP refusing this setup: reported as n/a
                error = describe(exc)
            error = _agree(error)
        runner.error = error

    per_row: dict[str, dict[str, Any]] = {
        r.spec.name: {"forward_times": [], "forward_cpu_times": [], "image_times": [], "image_cpu_times": [],
                      "forward_diffs": []}
        for r in runners
    }
    phase_s["rows"] = time.perf_counter() - start
    start = time.perf_counter()

    # ---------------------------------------------------------------- per forward
    forward_rows = [r for r in runners if r.spec.per_forward and r.ok]
    if forward_rows:
        inputs = forward_inputs(config, settings, device, dtype)
        reference: torch.Tensor | None = None
        for round_index in range(settings.warmup + settings.forward_repeats):
            for runner in rotated(forward_rows, round_index):
                if not runner.ok:
                    continue
                entry = per_row[runner.spec.name]
                measure = round_index == 0  # the first warm-up round counts bytes and memory, untimed
                counted: dict[str, Any] = {}
                count = measure and not runner.spec.compiled  # compiled collectives do not dispatch through Python
                with contextlib.ExitStack() as stack:
                    memory = stack.enter_context(PeakMemory(device)) if measure else None
                    if count:  # bytes of the transformer's calls only (see _count_bytes)
                        stack.enter_context(_count_bytes(runner.spec.kind, world, runner.transformer, counted))
                    output, elapsed, cpu, error = _timed_call(
                        lambda runner=runner: runner.transformer(**inputs)[0], device
                    )
                if error:
                    runner.error = error
                    continue
                if count:
                    entry["forward_bytes"] = counted
                if measure:
                    entry["forward_memory"] = memory.summary()
                if runner.spec.key == "stock" and reference is None:  # stock runs first in round 0
                    reference = output.detach().float().clone()
                if reference is not None:
                    entry["forward_diffs"].append(_max_abs_diff(output, reference))
                if round_index >= settings.warmup:
                    entry["forward_times"].append(elapsed)
                    entry["forward_cpu_times"].append(cpu)

    phase_s["forward"] = time.perf_counter() - start
    start = time.perf_counter()

    # ---------------------------------------------------------------- per image
    image_rows = [r for r in runners if r.spec.per_image and r.ok]
    if image_rows:
        call_kwargs = pipeline_inputs(config, settings, device, dtype)
        for round_index in range(settings.warmup + settings.image_repeats):
            for runner in rotated(image_rows, round_index):
                if not runner.ok:
                    continue
                entry = per_row[runner.spec.name]
                measure = round_index == 0

                def call(runner: _Runner = runner) -> torch.Tensor:
                    generator = torch.Generator("cpu").manual_seed(settings.seed)
                    return runner.pipe(**call_kwargs, generator=generator)[0]

                counted = {}
                count = measure and not runner.spec.compiled
                with contextlib.ExitStack() as stack:
                    memory = stack.enter_context(PeakMemory(device)) if measure else None
                    if count:  # bytes of the transformer's calls only (see _count_bytes)
                        stack.enter_context(_count_bytes(runner.spec.kind, world, runner.transformer, counted))
                    output, elapsed, cpu, error = _timed_call(call, device)
                if error:
                    runner.error = error
                    continue
                if runner.spec.teacache is not None:
                    stats = teacache_stats(runner.transformer)
                    computed = {branch: list(s["computed"]) for branch, s in stats.items()}
                    entry.setdefault("teacache_computed", []).append(computed)
                if count:
                    entry["image_bytes"] = counted
                if measure:
                    entry["image_memory"] = memory.summary()
                    if rank == 0:
                        entry["latents"] = output.detach().float().cpu()
                if round_index >= settings.warmup:
                    entry["image_times"].append(elapsed)
                    entry["image_cpu_times"].append(cpu)

    phase_s["image"] = time.perf_counter() - start
    for runner in runners:
        per_row[runner.spec.name]["error"] = runner.error
    return dict(
        rank=rank,
        rows=per_row,
        parameters=sum(p.numel() for p in stock.parameters()),
        config={key: value for key, value in config.items() if not key.startswith("_")},
        phase_s=phase_s,
        weights_broadcast=broadcast,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
    )

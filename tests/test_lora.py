"""LoRA at any time: diffusers' LoRA API under SP, CFG parallel and TeaCache against the single-process pipeline.

PEFT wraps a targeted `nn.Linear` in a `lora.Linear` whose `base_layer` is the original. The SP hooks sit on
parameter-free stages only (`image_rope_prepare`, `modulate_index_prepare`, `image_output` after `proj_out`), so a
wrapper around any linear (block linears, `img_mod`, `img_in`, `txt_in`, `norm_out.linear`, `proj_out`) computes on
the same shard as its base layer, whenever it was added: before or after `enable_sequence_parallel` or
`enable_teacache`.

Every parity check is fp32, max abs diff <= 1e-4 on images in [0, 1], and calls the pipeline twice (stale state in a
hook or a wrapper would show on the second call). The references are computed here, in the pytest process: the stock
diffusers pipeline in the same LoRA state, or, with TeaCache, our pipeline on one process with the same TeaCache
config (tests/test_sequence_parallel.py shows both agree without TeaCache). The spawned ranks return their images,
their TeaCache statistics and the image sequence length their blocks saw; the tests compare.

The LoRA files are written into a tmp folder by the tests (never downloaded): the diffusers/PEFT layout
(`save_lora_weights` of `get_peft_model_state_dict`) and two single-file layouts that the stock `load_lora_weights`
converts: Qwen-Image-Lightning's (`diffusion_model.` prefix, `lora_down`/`lora_up`, `alpha`) and kohya's
(`lora_unet_` flattened names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from safetensors.torch import save_file

from diffusers_qwen_sp import custom_pipeline_path
from diffusers_qwen_sp.hooks.teacache import get_teacache_hook, teacache_stats
from diffusers_qwen_sp.testing import (
    build_tiny_pipeline,
    save_tiny_pipeline,
    sp_pipeline_class,
    tiny_pipeline_call_kwargs,
    tiny_transformer_config,
)

from _spawn import Spawn, SpawnedRuns, world_cases


pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


TOLERANCE = 1e-4

# ---------------------------------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------------------------------

# Every kind of linear layer of the transformer: the blocks' attention and MLP linears and modulations, the embedders,
# the output norm's modulation and the output projection (PEFT matches a target as a suffix of a module name).
BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
)
TOP_LEVEL_TARGETS = (
    "img_in",
    "txt_in",
    "norm_out.linear",
    "proj_out",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)


@dataclass(frozen=True)
class LoraSpec:
    """A random LoRA (A and B both random, B scaled by `strength`), reproducible from its seed."""

    seed: int
    rank: int
    alpha: float
    targets: tuple[str, ...]
    strength: float = 0.25

    def config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), init_lora_weights=False
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The PEFT state dict, keys like `img_in.lora_A.weight`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            transformer = QwenImageTransformer2DModel(**tiny_transformer_config())
            transformer.add_adapter(self.config())
            return {
                # A small change, as a trained LoRA makes: the images move by a few 1e-2, TeaCache still skips.
                key: value.detach() * (self.strength if ".lora_B." in key else 1.0)
                for key, value in get_peft_model_state_dict(transformer).items()
            }


ADAPTERS = {
    # alpha / rank = 2: the scaling must survive every layout and every operation
    "a": LoraSpec(seed=1, rank=4, alpha=8.0, targets=BLOCK_TARGETS + TOP_LEVEL_TARGETS),
    "b": LoraSpec(
        seed=2,
        rank=2,
        alpha=2.0,
        targets=("attn.to_q", "attn.to_v", "attn.add_k_proj", "img_mlp.net.2", "img_mod.1", "txt_mod.1")
        + ("img_in", "proj_out"),
    ),
    # the Lightning-style LoRA of the few-step calls: a strong one (a distillation LoRA moves the images far)
    "lightning": LoraSpec(seed=3, rank=4, alpha=8.0, targets=BLOCK_TARGETS + TOP_LEVEL_TARGETS, strength=1.0),
}


def write_diffusers_layout(spec: LoraSpec, directory: Path) -> Path:
    """`pytorch_lora_weights.safetensors` as diffusers training scripts save it, with the LoRA config as metadata."""
    QwenImagePipeline.save_lora_weights(
        directory,
        transformer_lora_layers=spec.state_dict(),
        transformer_lora_adapter_metadata=spec.config().to_dict(),
    )
    return directory


def single_file_state_dict(spec: LoraSpec, layout: str) -> dict[str, torch.Tensor]:
    """
    The same LoRA in a layout that the stock `QwenImageLoraLoaderMixin.lora_state_dict` converts
    (`_convert_non_diffusers_qwen_lora_to_diffusers`): `lora_down` = A, `lora_up` = B, and a scalar `alpha` per module
    that the converter folds into the weights as `alpha / rank`.

    - `"lightning"`: `diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight` (Qwen-Image-Lightning);
    - `"kohya"`: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` (module path flattened with `_`).
    """
    converted = {}
    for key, tensor in spec.state_dict().items():
        module, kind = key.removesuffix(".weight").rsplit(".", 1)  # "img_in", "lora_A"
        if layout == "lightning":
            prefix = f"diffusion_model.{module}"
        elif layout == "kohya":
            prefix = "lora_unet_" + module.replace(".", "_")
        else:
            raise ValueError(layout)
        converted[f"{prefix}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor.contiguous()
        converted[f"{prefix}.alpha"] = torch.tensor(float(spec.alpha))
    return converted


def write_lora_files(directory: Path) -> dict[str, str]:
    """Every file the tests load: name -> path (a folder for the diffusers layout, a file for the others)."""
    files = {}
    for name, spec in ADAPTERS.items():
        files[name] = str(write_diffusers_layout(spec, directory / name))
    for layout in ("lightning", "kohya"):
        path = directory / f"lightning_{layout}.safetensors"
        save_file(single_file_state_dict(ADAPTERS["lightning"], layout), str(path))
        files[f"lightning_{layout}"] = str(path)
    return files


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_lora_files(tmp_path_factory.mktemp("loras"))


# ---------------------------------------------------------------------------------------------------------------------
# Calls and operation sequences, shared by the references (here) and the ranks
# ---------------------------------------------------------------------------------------------------------------------

# 40x56 pixels -> 10x14 latents -> 5x7 = 35 image tokens: uneven over 2 and 4 ranks (padding on the last rank).
CALL = dict(height=40, width=56)
IMAGE_TOKENS = 35
STEPS = 2
# Skips step 1 of 4 in every LoRA state below; every decision is about 30% or more off the threshold.
TEACACHE = dict(threshold=0.25)
TEACACHE_STEPS = 4

# Qwen-Image-Lightning's scheduler (from its model card) and a few-step call: no true CFG, a batch of 2 (so that CFG
# parallel splits the batch between the CFG ranks), 8 steps.
LIGHTNING_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=math.log(3),
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=math.log(3),
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=None,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
LIGHTNING_CALL = dict(
    prompt=["a red cat", "two small blue squares on a big yellow field at noon"],
    negative_prompt=None,
    true_cfg_scale=1.0,
    num_inference_steps=8,
    height=40,
    width=56,
)
# Skips steps 2 and 5 of 8; every decision is 7% or more off the threshold.
LIGHTNING_TEACACHE = dict(threshold=0.32, warmup_steps=2)


def _teacache_ops(on: bool, teacache: dict | None) -> list[tuple]:
    return [("teacache", on)] if teacache is not None else []


def ops_sequence(teacache: dict | None) -> list[tuple]:
    """
    One sequence of the LoRA API, each state checked: LoRAs loaded, fused, deleted before SP (and TeaCache) and after.
    `("parallel", on)` and `("teacache", on)` are the only steps the single-process reference differs in.
    """
    return [
        ("load", "a"),  # before TeaCache and SP
        ("set_adapters", ("a",), (0.7,)),  # before
        ("disable_lora",),  # before
        *_teacache_ops(True, teacache),
        ("parallel", True),
        ("check", "disabled", {}),
        ("enable_lora",),  # after
        ("check", "a0.7", {}),
        ("load", "b"),  # after
        ("set_adapters", ("a", "b"), (1.0, 0.5)),  # after
        ("check", "a+b-scale0.5", {"attention_kwargs": {"scale": 0.5}}),
        ("fuse", 0.8),  # after; diffusers keeps the LoRA layers scaled by 0.8 after unfusing
        ("check", "fused", {}),
        ("unfuse",),  # after
        ("check", "unfused", {}),
        ("parallel", False),
        *_teacache_ops(False, teacache),
        ("delete", "b"),  # before
        ("fuse", 1.0),  # before
        ("parallel", True),
        *_teacache_ops(True, teacache),  # this time TeaCache after SP
        ("check", "a-fused-before", {}),
        ("unfuse",),
        ("unload",),  # after; had the unfuse failed, the fused weights would stay and "no-lora" would differ
        ("check", "no-lora", {}),
        ("load", "b"),  # after an unload, under SP
        ("check", "b-after-unload", {}),
    ]


def switch_sequence(teacache: dict | None) -> list[tuple]:
    """Adapter A, then B, then A again: each must equal a fresh pipeline that only ever loaded that adapter."""
    return [
        ("load", "a"),
        ("load", "b"),
        ("parallel", True),
        *_teacache_ops(True, teacache),
        ("set_adapters", ("a",), (1.0,)),
        ("check", "a", {}),
        ("set_adapters", ("b",), (1.0,)),
        ("check", "b", {}),
        ("set_adapters", ("a",), (1.0,)),
        ("check", "a-again", {}),
    ]


def lightning_sequence(teacache: dict | None) -> list[tuple]:
    """Lightning-style few-step use: the single-file Lightning layout loaded under SP (the reference loads the
    equivalent diffusers layout)."""
    return [
        ("scheduler", "lightning"),
        ("parallel", True),
        *_teacache_ops(True, teacache),
        ("load_file", "lightning_lightning", "lightning"),
        ("check", "lightning", LIGHTNING_CALL),
    ]


SEQUENCES = {"ops": ops_sequence, "switch": switch_sequence, "lightning": lightning_sequence}


def _call_kwargs(overrides: dict, steps: int, seed: int) -> dict[str, Any]:
    kwargs = tiny_pipeline_call_kwargs("qwen_image", **{**CALL, "num_inference_steps": steps, **overrides})
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


def run_sequence(
    pipe: DiffusionPipeline,
    ops: list[tuple],
    files: dict[str, str],
    teacache: dict | None,
    parallel: dict | None = None,
    repeats: int = 2,
    parallel_seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """
    Apply `ops` to `pipe`; every `check` calls it `repeats` times. `parallel` (the `enable_sequence_parallel` kwargs)
    is `None` for the single-process reference. While parallelism is on, the calls use `parallel_seed` (the pipeline
    must denoise rank 0's noise whatever a rank's seed), else seed 0. Returns check label -> `{"images": [...],
    "teacache": [...]}` (this rank's TeaCache statistics), one entry per call, and `"image_tokens"`: the image sequence
    lengths the first block saw (a shard under SP, or the parity would prove nothing).
    """
    results = {}
    parallel_on = False
    steps = TEACACHE_STEPS if teacache is not None else STEPS
    image_tokens: list[int] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]  # (B, S_img, D); the stock forward passes kwargs
        image_tokens.append(hidden_states.shape[1])

    probe = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for op in ops:
            kind, args = op[0], op[1:]
            if kind == "parallel" and parallel is not None:
                parallel_on = args[0]
            if kind != "check":
                _apply(pipe, op, files, teacache, parallel)
                continue
            label, overrides = args
            image_tokens.clear()
            images, stats = [], []
            for _ in range(repeats):
                kwargs = _call_kwargs(
                    overrides, overrides.get("num_inference_steps", steps), parallel_seed if parallel_on else 0
                )
                with torch.no_grad():
                    images.append(pipe(**kwargs).images)
                stats.append(_local_teacache_stats(pipe))
            results[label] = {"images": images, "teacache": stats, "image_tokens": sorted(set(image_tokens))}
    finally:
        probe.remove()
    return results


def _apply(
    pipe: DiffusionPipeline, op: tuple, files: dict[str, str], teacache: dict | None, parallel: dict | None
) -> None:
    """One step of an operation sequence other than `check`."""
    kind, args = op[0], op[1:]
    if kind == "load":
        pipe.load_lora_weights(files[args[0]], adapter_name=args[0])
    elif kind == "load_file":
        pipe.load_lora_weights(files[args[0]], adapter_name=args[1])
    elif kind == "set_adapters":
        pipe.set_adapters(list(args[0]), adapter_weights=list(args[1]))
    elif kind == "disable_lora":
        pipe.disable_lora()
    elif kind == "enable_lora":
        pipe.enable_lora()
    elif kind == "fuse":
        pipe.fuse_lora(lora_scale=args[0])
    elif kind == "unfuse":
        pipe.unfuse_lora()
    elif kind == "unload":
        pipe.unload_lora_weights()
    elif kind == "delete":
        pipe.delete_adapters(args[0])
    elif kind == "scheduler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**LIGHTNING_SCHEDULER)
    elif kind == "parallel":
        if parallel is not None and args[0]:
            pipe.enable_sequence_parallel(**parallel)
        elif parallel is not None:
            pipe.disable_sequence_parallel()
    elif kind == "teacache":
        if args[0]:
            pipe.enable_teacache(**teacache)
        else:
            pipe.disable_teacache()
    else:
        raise ValueError(f"unknown operation {op!r}")


def _local_teacache_stats(pipe: DiffusionPipeline) -> dict[str, dict[str, Any]] | None:
    """This rank's TeaCache statistics per CFG branch it ran (not merged over CFG ranks), or None without TeaCache."""
    if get_teacache_hook(pipe.transformer) is None:
        return None
    return {
        branch: {"skipped": list(entry["skipped"]), "rel_l1": dict(entry["rel_l1"])}
        for branch, entry in teacache_stats(pipe.transformer).items()
    }


def _teacache_mismatches(stats: dict | None, expected: dict | None) -> list[str]:
    """
    The skip lists must be the single-process ones, and so must the statistic they come from: the relative L1 change
    of the indicator at every step (an SP all-reduce only reorders the sums, ~1e-7), so a decision that agrees only
    because it is far from the threshold does not hide a statistic taken over the wrong tokens or samples.
    """
    if expected is None:
        return [] if stats is None else [f"TeaCache ran: {stats}"]
    if not stats:
        return ["TeaCache did not run"]
    mismatches = []
    for branch, entry in stats.items():  # under CFG parallel with true CFG a rank runs one branch
        reference = expected[branch]
        if entry["skipped"] != reference["skipped"]:
            mismatches.append(f"{branch} skipped {entry['skipped']}, single process {reference['skipped']}")
        steps = sorted(set(entry["rel_l1"]) | set(reference["rel_l1"]))
        worst = max(
            abs(entry["rel_l1"].get(step, math.inf) - reference["rel_l1"].get(step, -math.inf)) for step in steps
        )
        if not worst <= 1e-5:
            mismatches.append(
                f"{branch} rel-L1 off by {worst:.3g}: {entry['rel_l1']} vs single process {reference['rel_l1']}"
            )
    return mismatches


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# The spawned ranks
# ---------------------------------------------------------------------------------------------------------------------

# mode id -> enable_sequence_parallel kwargs, per world size
MODES = {
    2: {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2), "cfg2": dict(cfg_degree=2)},
    4: {"ulysses2ring2": dict(ulysses_degree=2, ring_degree=2), "cfg2ulysses2": dict(cfg_degree=2, ulysses_degree=2)},
}
# world size -> [(mode, sequence)]
MODE_SEQUENCES = {
    2: [(mode, sequence) for mode in ("ulysses2", "ring2") for sequence in ("ops", "switch")]
    + [("ulysses2", "lightning"), ("ring2", "lightning"), ("cfg2", "lightning")],
    4: [(mode, sequence) for mode in ("ulysses2ring2", "cfg2ulysses2") for sequence in ("ops", "switch", "lightning")],
}


def _case_id(mode: str, sequence: str, teacache: bool) -> str:
    return f"{mode}-{'teacache-' if teacache else ''}{sequence}"


def _teacache_config(sequence: str) -> dict:
    return LIGHTNING_TEACACHE if sequence == "lightning" else TEACACHE


# world size -> case ids, e.g. "ulysses2-teacache-switch"
CASES = {
    world: [_case_id(mode, sequence, teacache) for mode, sequence in pairs for teacache in (False, True)]
    for world, pairs in MODE_SEQUENCES.items()
}


def _worker(rank: int, world_size: int, files: dict[str, str]) -> dict[str, Any]:
    results = {}
    for mode, sequence in MODE_SEQUENCES[world_size]:
        for use_teacache in (False, True):
            teacache = _teacache_config(sequence) if use_teacache else None
            pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
            # A different seed on every rank: every rank must still denoise rank 0's noise.
            results[_case_id(mode, sequence, use_teacache)] = run_sequence(
                pipe,
                SEQUENCES[sequence](teacache),
                files,
                teacache,
                parallel=MODES[world_size][mode],
                parallel_seed=0 if rank == 0 else 1000 + rank,
            )
    return results


@pytest.fixture(scope="module")
def spawned(lora_files: dict[str, str]) -> SpawnedRuns:
    # Built here rather than with `spawn_fixture`: the ranks need the paths of this module's LoRA files.
    spawns = [Spawn(2, args=(lora_files,), timeout=200.0), Spawn(4, args=(lora_files,), timeout=250.0)]
    return SpawnedRuns(_worker, spawns)


# ---------------------------------------------------------------------------------------------------------------------
# The single-process references
# ---------------------------------------------------------------------------------------------------------------------


def _reference_pipeline(teacache: dict | None) -> DiffusionPipeline:
    # The stock pipeline; with TeaCache (which stock diffusers lacks) ours on one process with the same config.
    pipeline_cls = None if teacache is None else sp_pipeline_class("qwen_image")
    return build_tiny_pipeline("qwen_image", pipeline_cls=pipeline_cls)


def _reference_ops(files: dict[str, str], sequence: str, teacache: dict | None) -> list[tuple]:
    ops = SEQUENCES[sequence](teacache)
    if sequence == "lightning":
        # The diffusers layout of the same LoRA: the Lightning single file must load to the same images.
        ops = [("load_file", "lightning", "lightning") if op[0] == "load_file" else op for op in ops]
    return ops


def _fresh_switch_references(files: dict[str, str], teacache: dict | None) -> dict[str, dict[str, Any]]:
    """A fresh pipeline per adapter that only ever loaded that adapter."""
    references = {}
    for name in ("a", "b"):
        pipe = _reference_pipeline(teacache)
        ops = [("load", name), *_teacache_ops(True, teacache), ("check", name, {})]
        references[name] = run_sequence(pipe, ops, files, teacache, repeats=1)[name]
    references["a-again"] = references["a"]
    return references


class References:
    """Single-process references, computed on first use and kept for the module."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self._cache: dict[tuple[str, bool], dict[str, dict[str, Any]]] = {}

    def get(self, sequence: str, use_teacache: bool) -> dict[str, dict[str, Any]]:
        key = (sequence, use_teacache)
        if key not in self._cache:
            teacache = _teacache_config(sequence) if use_teacache else None
            if sequence == "switch":
                self._cache[key] = _fresh_switch_references(self.files, teacache)
            else:
                ops = _reference_ops(self.files, sequence, teacache)
                self._cache[key] = run_sequence(_reference_pipeline(teacache), ops, self.files, teacache, repeats=1)
        return self._cache[key]


@pytest.fixture(scope="module")
def references(lora_files: dict[str, str]) -> References:
    return References(lora_files)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def _parse_case(case: str) -> tuple[str, str, bool]:
    parts = case.split("-")
    return parts[0], parts[-1], "teacache" in parts


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size, case", world_cases(CASES))
def test_lora_matches_single_process(spawned, references, world_size, case):
    mode, sequence, use_teacache = _parse_case(case)
    expected = references.get(sequence, use_teacache)
    sp_degree = MODES[world_size][mode].get("ulysses_degree", 1) * MODES[world_size][mode].get("ring_degree", 1)
    shard_tokens = -(-IMAGE_TOKENS // sp_degree)  # each rank's chunk of the zero-padded image sequence
    failures = []
    for rank, returned in enumerate(spawned[world_size].case(case)):
        assert list(returned) == list(expected), f"rank {rank} checked {list(returned)}, expected {list(expected)}"
        for label, result in returned.items():
            reference = expected[label]
            if result["image_tokens"] != [shard_tokens]:
                seen = result["image_tokens"]
                failures.append(f"rank {rank} {label}: the blocks saw {seen} image tokens, not [{shard_tokens}]")
            for call, (images, stats) in enumerate(zip(result["images"], result["teacache"])):
                diff = _max_diff(images, reference["images"][0])
                if not diff <= TOLERANCE:
                    failures.append(f"rank {rank} {label} call {call}: max diff {diff:.3g}")
                for mismatch in _teacache_mismatches(stats, reference["teacache"][0]):
                    failures.append(f"rank {rank} {label} call {call}: {mismatch}")
    assert failures == [], "\n".join(failures)


def test_references_are_not_vacuous(references):
    """Each LoRA state changes the images, and TeaCache skips steps in the references the SP runs must reproduce."""
    ops = references.get("ops", False)
    images = {label: result["images"][0] for label, result in ops.items()}
    assert _max_diff(images["disabled"], images["no-lora"]) <= 1e-6
    for label in ("a0.7", "a+b-scale0.5", "fused", "a-fused-before", "b-after-unload"):
        assert _max_diff(images[label], images["no-lora"]) > 1e-2, label
    assert _max_diff(images["a0.7"], images["a+b-scale0.5"]) > 1e-2
    assert _max_diff(images["fused"], images["a+b-scale0.5"]) > 1e-2
    # diffusers' `fuse_lora(lora_scale=0.8)` scales the LoRA layers for good: unfusing keeps them scaled.
    assert _max_diff(images["fused"], images["unfused"]) <= 1e-5
    switch = references.get("switch", False)
    assert _max_diff(switch["a"]["images"][0], switch["b"]["images"][0]) > 1e-2
    for sequence in ("ops", "switch", "lightning"):
        for label, result in references.get(sequence, True).items():
            skipped = [entry["skipped"] for entry in result["teacache"][0].values()]
            assert all(skipped), f"{sequence} {label}: TeaCache skipped nothing, the SP check would be vacuous"


@pytest.mark.parametrize("layout", ["lightning", "kohya"])
def test_single_file_layouts_load_like_the_diffusers_layout(lora_files, layout):
    """The stock converter turns the single file into the same LoRA, on the stock pipeline and on ours."""
    for pipeline_cls in (None, sp_pipeline_class("qwen_image")):
        images = {}
        for name in ("lightning", f"lightning_{layout}"):
            pipe = build_tiny_pipeline("qwen_image", pipeline_cls=pipeline_cls)
            pipe.load_lora_weights(lora_files[name], adapter_name="lightning")
            with torch.no_grad():
                images[name] = pipe(**_call_kwargs({}, STEPS, seed=0)).images
        assert _max_diff(images["lightning"], images[f"lightning_{layout}"]) <= 1e-5


def test_custom_pipeline_then_lora(tmp_path, lora_files):
    """The path the docs give: a `custom_pipeline` folder loaded with plain diffusers, then `load_lora_weights`."""
    path = save_tiny_pipeline("qwen_image", tmp_path / "tiny")
    pipe = DiffusionPipeline.from_pretrained(
        path, custom_pipeline=custom_pipeline_path("qwen_image"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "QwenImageSPPipeline"
    pipe.set_progress_bar_config(disable=True)
    stock = build_tiny_pipeline("qwen_image")
    for p in (pipe, stock):
        p.load_lora_weights(lora_files["a"], adapter_name="a")
    with torch.no_grad():
        ours_images = pipe(**_call_kwargs({}, STEPS, seed=0)).images
        stock_images = stock(**_call_kwargs({}, STEPS, seed=0)).images
    assert _max_diff(ours_images, stock_images) <= 1e-6


def test_lora_loaded_before_the_conversion(lora_files):
    """LoRAs loaded on a stock pipeline survive `from_pipe` into ours (the stock transformer is converted) and stay
    under diffusers' LoRA API there."""
    stock = build_tiny_pipeline("qwen_image")
    reference = build_tiny_pipeline("qwen_image")
    for pipe in (stock, reference):
        for name in ("a", "b"):
            pipe.load_lora_weights(lora_files[name], adapter_name=name)
    ours = sp_pipeline_class("qwen_image").from_pipe(stock)
    ours.set_progress_bar_config(disable=True)
    assert ours.transformer.proj_out is stock.transformer.proj_out  # the LoRA wrapper itself, sharing its weights
    ops = [
        ("check", "a+b", {}),
        ("set_adapters", ("a", "b"), (1.0, 0.5)),
        ("fuse", 1.0),
        ("check", "fused", {}),
        ("unfuse",),
        ("delete", "b"),
        ("check", "a", {}),
        ("unload",),
        ("check", "no-lora", {}),
    ]
    expected = run_sequence(reference, ops, lora_files, teacache=None, repeats=1)
    for label, result in run_sequence(ours, ops, lora_files, teacache=None, repeats=1).items():
        assert _max_diff(result["images"][0], expected[label]["images"][0]) <= 1e-6, label
    assert _max_diff(expected["a+b"]["images"][0], expected["no-lora"]["images"][0]) > 1e-2

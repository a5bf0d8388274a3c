"""Sequence parallelism on CPU with gloo against the single-process run (fp32).

Tolerance: max abs diff <= 1e-4 (outputs, images in [0, 1]); the attention merge reorders sums, so bit-equality is not
expected. Every case calls the model several times and checks each call: a collective read before it completes shows
up as a random bad call. All cases of one world size run in one spawn (the module-scoped `sp_spawn` fixture, see
tests/_spawn.py), and each case reports as its own test:
`test_pipeline_matches_single_process[world4-qwen_image_layered-u2r1cfg2]`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_qwen_sp import QwenImageSPTransformer2DModel
from diffusers_qwen_sp.hooks import (
    SequenceParallelConfig,
    apply_sequence_parallel,
    get_sequence_parallel_runtime,
    remove_sequence_parallel,
)
from diffusers_qwen_sp.testing import (
    build_tiny_pipeline,
    small_reference_images,
    sp_pipeline_class,
    tiny_pipeline_call_kwargs,
    tiny_transformer_config,
)
from diffusers_qwen_sp.distributed import run_distributed

from _spawn import Spawn, spawn_fixture, world_cases


TOLERANCE = 1e-4
DEGREES = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}  # world -> [(ulysses, ring)]


def _transformer_inputs(config, img_shapes, text_len=11, seed=3):
    generator = torch.Generator().manual_seed(seed)
    seq = sum(f * h * w for f, h, w in img_shapes)
    mask = torch.ones(2, text_len, dtype=torch.long)
    mask[1, text_len - 4 :] = 0  # the second prompt is 4 tokens shorter
    return dict(
        hidden_states=torch.randn(2, seq, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(2, text_len, config["joint_attention_dim"], generator=generator),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.9, 0.4]),
        img_shapes=[list(img_shapes)] * 2,
        return_dict=False,
    )


TRANSFORMER_CASES = {
    # 5*7 = 35 image tokens: not divisible by 2 or 4; with 4 ranks the last chunk holds 8 slots, 3 of them padding
    "plain_odd": ({}, [(1, 5, 7)]),
    # 3 tokens over 4 ranks: the last rank holds only padding
    "tiny_sequence": ({}, [(1, 1, 3)]),
    "zero_cond_t": ({"zero_cond_t": True}, [(1, 4, 5), (1, 3, 3)]),
    "layered": ({"use_additional_t_cond": True, "use_layer3d_rope": True}, [(1, 3, 3), (1, 3, 3), (1, 3, 3)]),
}


def _transformer_case_id(name, ulysses, ring):
    return f"transformer-{name}-u{ulysses}r{ring}"


def _image_tokens(name):
    return sum(f * h * w for f, h, w in TRANSFORMER_CASES[name][1])


# world -> [(case id, case name)]
TRANSFORMER_CASE_IDS = {
    world: [(_transformer_case_id(name, u, r), name) for name in TRANSFORMER_CASES for u, r in degrees]
    for world, degrees in DEGREES.items()
}


def _check_transformer(rank, world_size):
    """Case id -> {"seen_len": tokens the blocks saw, "diffs": max |diff| of each of 3 calls, "restored": bool}."""
    results = {}
    for name, (overrides, img_shapes) in TRANSFORMER_CASES.items():
        torch.manual_seed(0)
        model = QwenImageSPTransformer2DModel(**tiny_transformer_config(**overrides)).eval()
        kwargs = _transformer_inputs(model.config, img_shapes)
        if overrides.get("use_additional_t_cond"):
            kwargs["additional_t_cond"] = torch.tensor([0, 1])
        with torch.no_grad():
            expected = model(**kwargs)[0]
            seen_lengths = []
            probe = model.transformer_blocks[0].register_forward_pre_hook(
                lambda module, args: seen_lengths.append(args[0].shape[1])
            )
            for ulysses, ring in DEGREES[world_size]:
                apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
                model(**kwargs)
                result = results[_transformer_case_id(name, ulysses, ring)] = {"seen_len": seen_lengths[-1]}
                result["diffs"] = [(model(**kwargs)[0] - expected).abs().max().item() for call in range(3)]
                remove_sequence_parallel(model)
                result["restored"] = get_sequence_parallel_runtime(model) is None and torch.equal(
                    model(**kwargs)[0], expected
                )
            probe.remove()
    return results


# world -> [(cfg, ulysses, ring)] for the pipelines
PIPELINE_MODES = {2: [(1, 2, 1), (1, 1, 2), (2, 1, 1)], 4: [(1, 4, 1), (1, 1, 4), (1, 2, 2), (2, 2, 1), (2, 1, 2)]}

PIPELINE_CALLS = {
    # batch 2, prompts of different lengths, 5x7 = 35 image tokens (odd), true CFG on
    "qwen_image": dict(
        prompt=["a red cat", "two small blue squares on a big yellow field at noon"],
        negative_prompt=["blurry", "low quality, watermark"],
        num_images_per_prompt=2,  # batch 4
        height=40,
        width=56,
    ),
    # CFG off: with cfg_degree=2 the batch of 2 is split between the CFG ranks; a batch of 1 is computed by both
    "qwen_image_no_cfg": dict(prompt=["a red cat", "a blue dog on grass"], true_cfg_scale=1.0, height=40, width=56),
    "qwen_image_no_cfg_batch_1": dict(prompt="a red cat", true_cfg_scale=1.0, height=40, width=56),
    "qwen_image_edit": dict(num_images_per_prompt=2),
    "qwen_image_edit_plus": {},  # two reference images of different sizes
    "qwen_image_edit_2511": {},  # zero_cond_t: reference tokens modulated at t = 0
    "qwen_image_layered": {},
}


def _variant(name):
    return "qwen_image" if name.startswith("qwen_image_no_cfg") else name


TEACACHE = dict(threshold=0.15)
TEACACHE_STEPS = 6


def _skip_lists(stats):
    return {branch: (entry["computed"], entry["skipped"]) for branch, entry in stats.items()}


def _pipeline_case_id(name, cfg, ulysses, ring):
    return f"{name}-u{ulysses}r{ring}" + ("cfg2" if cfg > 1 else "")


# world -> pipeline case ids
PIPELINE_CASE_IDS = {
    world: [_pipeline_case_id(name, *mode) for name in PIPELINE_CALLS for mode in modes]
    for world, modes in PIPELINE_MODES.items()
}


def _check_pipeline(rank, world_size):
    """Case id -> {"diffs": max |diff| of 2 repeats, "teacache_diff", "skips", "expected_skips"}."""
    results = {}
    with small_reference_images(), torch.no_grad():
        for name, call in PIPELINE_CALLS.items():
            variant = _variant(name)
            stock = build_tiny_pipeline(variant)
            expected = _as_tensor(stock(**tiny_pipeline_call_kwargs(variant, **call)).images)
            pipe = build_tiny_pipeline(variant, pipeline_cls=sp_pipeline_class(variant))
            # Single-process TeaCache reference: the images and skip lists every SP mode must reproduce.
            pipe.enable_teacache(**TEACACHE)
            cached_call = tiny_pipeline_call_kwargs(variant, **call, num_inference_steps=TEACACHE_STEPS)
            expected_cached = _as_tensor(pipe(**cached_call).images)
            expected_skips = _skip_lists(pipe.teacache_stats())
            pipe.disable_teacache()
            for cfg, ulysses, ring in PIPELINE_MODES[world_size]:
                result = results[_pipeline_case_id(name, cfg, ulysses, ring)] = {"expected_skips": expected_skips}
                pipe.enable_sequence_parallel(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring)
                result["diffs"] = []
                for repeat in range(2):
                    kwargs = tiny_pipeline_call_kwargs(variant, **call)
                    # A different seed on every rank: the pipeline must still denoise rank 0's noise everywhere.
                    kwargs["generator"] = torch.Generator().manual_seed(0 if rank == 0 else 1000 + rank)
                    result["diffs"].append((_as_tensor(pipe(**kwargs).images) - expected).abs().max().item())
                pipe.enable_teacache(**TEACACHE)
                cached = _as_tensor(pipe(**tiny_pipeline_call_kwargs(variant, **call, num_inference_steps=TEACACHE_STEPS)).images)
                result["teacache_diff"] = (cached - expected_cached).abs().max().item()
                result["skips"] = _skip_lists(pipe.teacache_stats())  # merged over the CFG ranks under CFG parallel
                pipe.disable_teacache()
                pipe.disable_sequence_parallel()
    return results


def _as_tensor(images):
    return torch.stack(list(images)) if isinstance(images, list) else images


def _run_all(rank, world_size):
    return {**_check_transformer(rank, world_size), **_check_pipeline(rank, world_size)}


# Each spawn takes about 60-100 s on 2 busy cores; the first test of a world size pays for it (hence timeout 450).
sp_spawn = spawn_fixture(_run_all, Spawn(2, timeout=400), Spawn(4, timeout=400))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(450)
@pytest.mark.parametrize(
    "world_size, case", world_cases({world: [case for case, _ in ids] for world, ids in TRANSFORMER_CASE_IDS.items()})
)
def test_transformer_matches_single_process(sp_spawn, world_size, case):
    name = dict(TRANSFORMER_CASE_IDS[world_size])[case]
    image_tokens = _image_tokens(name)
    for rank, result in enumerate(sp_spawn[world_size].case(case)):
        # the blocks see ceil(S / P) tokens
        assert result["seen_len"] == -(-image_tokens // world_size), (
            f"rank {rank}: blocks saw {result['seen_len']} of {image_tokens} image tokens"
        )
        for call, diff in enumerate(result["diffs"]):
            assert diff <= TOLERANCE, f"rank {rank} call {call}: {diff}"
        assert len(result["diffs"]) == 3, f"rank {rank}: {result}"
        assert result["restored"], f"rank {rank}: remove did not restore the unsharded model"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(450)
@pytest.mark.parametrize("world_size, case", world_cases(PIPELINE_CASE_IDS))
def test_pipeline_matches_single_process(sp_spawn, world_size, case):
    for rank, result in enumerate(sp_spawn[world_size].case(case)):
        expected_skips = result["expected_skips"]
        assert any(skipped for _, skipped in expected_skips.values()), (
            f"rank {rank}: TeaCache skipped nothing at {TEACACHE}, the SP check would be vacuous: {expected_skips}"
        )
        for repeat, diff in enumerate(result["diffs"]):
            assert diff <= TOLERANCE, f"rank {rank} call {repeat}: {diff}"
        assert len(result["diffs"]) == 2, f"rank {rank}: {result}"
        assert result["teacache_diff"] <= TOLERANCE, f"rank {rank} TeaCache: {result['teacache_diff']}"
        assert result["skips"] == expected_skips, (
            f"rank {rank}: TeaCache skip lists {result['skips']} != single process {expected_skips}"
        )


def test_config_validation():
    with pytest.raises(ValueError, match="ulysses_degree must be a positive integer, got 0"):
        SequenceParallelConfig(ulysses_degree=0)
    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2"):
        SequenceParallelConfig(cfg_degree=3)
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        SequenceParallelConfig(attention_backend="fast")


# case -> what rank 0's error message must contain
ERROR_MESSAGES = {
    "product": "= 4, but the world size is 2",
    "heads": "ulysses_degree=2 does not divide the 3 attention heads",
    "diffusers_cp": "enable_parallelism",
    "cfg_unknown": "does not know whether this call does true CFG",
    # a processor set after SP would attend over this rank's shard only: refused at the next forward
    "processor_swapped": "set after sequence parallelism was applied",
    # diffusers' FirstBlockCache decides per rank (ranks diverge and hang): refused in either order
    "diffusers_cache_after_sp": "FirstBlockCacheConfig is not supported under sequence parallelism",
    "diffusers_cache_before_sp": "A FirstBlockCacheConfig cache is enabled",
}


def _errors(rank, world_size):
    messages = dict.fromkeys(ERROR_MESSAGES, "no error was raised")
    torch.manual_seed(0)
    model = QwenImageSPTransformer2DModel(**tiny_transformer_config())  # 4 heads
    for name, config in {
        "product": SequenceParallelConfig(ulysses_degree=2, ring_degree=2),  # 4 != world 2
        "heads": None,
    }.items():
        try:
            if name == "heads":
                model3 = QwenImageSPTransformer2DModel(**tiny_transformer_config(num_attention_heads=3))
                apply_sequence_parallel(model3, SequenceParallelConfig(ulysses_degree=2))
            else:
                apply_sequence_parallel(model, config)
        except ValueError as error:
            messages[name] = str(error)
    # CFG parallel driven by hand without saying whether the call does true CFG: refused, never a silent guess.
    from diffusers_qwen_sp.hooks import apply_cfg_parallel, remove_cfg_parallel

    runtime = apply_sequence_parallel(model, SequenceParallelConfig(cfg_degree=2))
    apply_cfg_parallel(model, runtime.groups)
    try:
        with torch.no_grad(), model.cache_context("cond"):
            model(**_transformer_inputs(model.config, [(1, 2, 2)]))
    except RuntimeError as error:
        messages["cfg_unknown"] = str(error)
    remove_cfg_parallel(model)
    remove_sequence_parallel(model)
    from diffusers import FirstBlockCacheConfig
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2))
    model.transformer_blocks[1].attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    try:
        with torch.no_grad():
            model(**_transformer_inputs(model.config, [(1, 5, 7)]))
    except RuntimeError as error:
        messages["processor_swapped"] = str(error)
    remove_sequence_parallel(model)
    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2))
    try:
        model.enable_cache(FirstBlockCacheConfig(threshold=0.4))
    except ValueError as error:
        messages["diffusers_cache_after_sp"] = str(error)
    remove_sequence_parallel(model)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.4))
    try:
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2))
    except RuntimeError as error:
        messages["diffusers_cache_before_sp"] = str(error)
    model.disable_cache()
    model._parallel_config = object()  # what diffusers' enable_parallelism leaves behind
    try:
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2))
    except RuntimeError as error:
        messages["diffusers_cp"] = str(error)
    return messages


def _cfg_parallel_duplicate_warning(rank, world_size):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers_qwen_sp.hooks.cfg_parallel")
    logger.addHandler(handler)
    try:
        pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
        pipe.enable_sequence_parallel(cfg_degree=2)
        with torch.no_grad():
            for _ in range(2):  # two calls, 2 steps each: told once
                pipe(**tiny_pipeline_call_kwargs("qwen_image", prompt="a red cat", true_cfg_scale=1.0))
        pipe.disable_sequence_parallel()
    finally:
        logger.removeHandler(handler)
    return [record.getMessage() for record in records]


def _cfg_parallel_with_prompt_embeddings(rank, world_size):
    """True CFG from embeddings whose masks are None (what encode_prompt returns for unpadded prompts): the stock rule
    still does true CFG, so each CFG rank must compute one branch per step and the image equal one process's."""
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt("a red cat")
        negative, negative_mask = pipe.encode_prompt("blur")
    call = {key: value for key, value in tiny_pipeline_call_kwargs("qwen_image").items()
            if key not in ("prompt", "negative_prompt")}
    embeddings = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
    with torch.no_grad():
        expected = pipe(**call, **embeddings).images
    calls = []
    probe = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    pipe.enable_sequence_parallel(cfg_degree=2)
    call["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = pipe(**call, **embeddings).images
    probe.remove()
    pipe.disable_sequence_parallel()
    return {"masks_none": mask is None and negative_mask is None, "block_calls": len(calls),
            "steps": call["num_inference_steps"], "diff": (images - expected).abs().max().item()}


def _launcher_errors(rank, world_size):
    """The duplicate-batch warning first, then the errors: case id -> this rank's warnings or error message."""
    return {
        "cfg_warning": _cfg_parallel_duplicate_warning(rank, world_size),
        "cfg_prompt_embeds": _cfg_parallel_with_prompt_embeddings(rank, world_size),
        **_errors(rank, world_size),
    }


# One spawn for the warning and the errors, each case its own test.
launcher_errors = spawn_fixture(_launcher_errors, Spawn(2, timeout=240))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases({2: ["cfg_warning", "cfg_prompt_embeds", *ERROR_MESSAGES]}))
def test_clear_errors_under_a_launcher(launcher_errors, world_size, case):
    per_rank = launcher_errors[world_size].case(case)
    if case == "cfg_prompt_embeds":
        for result in per_rank:  # one branch per rank and step (not both), and the single-process image
            assert result["masks_none"] and result["block_calls"] == result["steps"], per_rank
            assert result["diff"] <= TOLERANCE, per_rank
    elif case == "cfg_warning":
        warnings = per_rank
        # Told once, by rank 0 (diffusers' loggers speak on rank 0 only under torch.distributed).
        assert len(warnings[0]) == 1 and "batch of 1 does not split" in warnings[0][0], warnings
        assert warnings[1] == [], warnings
    else:
        assert ERROR_MESSAGES[case] in per_rank[0], per_rank


def test_no_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model = QwenImageSPTransformer2DModel(**tiny_transformer_config())
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2))


def _cli_generate(rank, world_size, folder):
    from diffusers_qwen_sp.cli import main

    code = main(["generate", "--ulysses-degree", "2", "--teacache", "0.15", "--steps", "6", "--height", "40",
                 "--width", "56", "--output", f"{folder}/sp.png"])
    return code


@pytest.mark.distributed
def test_cli_under_a_launcher_matches_single_process(tmp_path, capsys):
    from PIL import Image

    from diffusers_qwen_sp.cli import main

    assert main(["generate", "--teacache", "0.15", "--steps", "6", "--height", "40", "--width", "56",
                 "--output", str(tmp_path / "single.png")]) == 0
    assert run_distributed(_cli_generate, 2, str(tmp_path), timeout=120) == [0, 0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["single.png", "sp.png"]  # rank 0 wrote once
    with Image.open(tmp_path / "single.png") as single, Image.open(tmp_path / "sp.png") as sharded:
        difference = torch.from_numpy(np.asarray(single, dtype=np.int16) - np.asarray(sharded, dtype=np.int16))
    assert difference.abs().max().item() <= 1  # 8-bit PNGs of images within 1e-4


def test_the_plan_is_data_on_the_model_class_and_another_plan_is_checked_whole():
    from diffusers_qwen_sp.distributed import ParallelGroups
    from diffusers_qwen_sp.models import GatherInput, ShardBoundsOutput, SplitOutput

    model = QwenImageSPTransformer2DModel(**tiny_transformer_config()).eval()
    plan = type(model)._sp_plan
    assert plan["image_output"] == GatherInput(index=0, dim=1, bounds_index=1)
    assert ShardBoundsOutput(index=3) in plan["image_rope_prepare"]
    assert SplitOutput(index=1, dim=1) in plan["modulate_index_prepare"]
    kwargs = _transformer_inputs(model.config, [(1, 5, 7)])
    with torch.no_grad():
        expected = model(**kwargs)[0]
        bad = {**plan, "transformer_blocks.*.nope": GatherInput(index=0, dim=1, bounds_index=1)}
        for _ in range(2):  # a bad plan hooks nothing, so the next apply still works
            with pytest.raises(ValueError, match="transformer_blocks.\\*.nope"):
                apply_sequence_parallel(model, groups=ParallelGroups(), plan=bad)
            assert get_sequence_parallel_runtime(model) is None
            # An SP world of one process (no process group needed) with an explicit plan: the output is unchanged.
            runtime = apply_sequence_parallel(model, groups=ParallelGroups(), plan=dict(plan))
            assert runtime.plan == plan and get_sequence_parallel_runtime(model) is runtime
            assert torch.equal(model(**kwargs)[0], expected)
            remove_sequence_parallel(model)
            assert torch.equal(model(**kwargs)[0], expected)


def test_a_failed_apply_hooks_nothing_and_config_and_groups_must_agree():
    from diffusers_qwen_sp.distributed import ParallelGroups
    from diffusers_qwen_sp.models import GatherInput

    model = QwenImageSPTransformer2DModel(**tiny_transformer_config()).eval()
    kwargs = _transformer_inputs(model.config, [(1, 5, 7)])
    with torch.no_grad():
        expected = model(**kwargs)[0]
    plan = dict(type(model)._sp_plan)
    gather = GatherInput(index=0, dim=1, bounds_index=1)
    # block 0 reached by two keys, and a key naming nothing: refused before any hook is registered
    twice = {**plan, "transformer_blocks.*": gather, "transformer_blocks.0": gather}
    for bad, match in ((twice, "one entry"), ({**plan, "image_output.nope": gather}, "no submodule")):
        with pytest.raises(ValueError, match=match):
            apply_sequence_parallel(model, groups=ParallelGroups(), plan=bad)
        assert get_sequence_parallel_runtime(model) is None
        assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in model.modules())
    with pytest.raises(ValueError, match=r"\(ulysses, ring, cfg\) = \(2, 1, 1\) but the groups"):
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=2), groups=ParallelGroups())
    for _ in range(2):  # and a good apply still works, twice
        apply_sequence_parallel(model, groups=ParallelGroups())
        with torch.no_grad():
            assert torch.equal(model(**kwargs)[0], expected)
        remove_sequence_parallel(model)


def test_converting_a_stock_transformer_with_hooks_is_refused():
    from diffusers import FirstBlockCacheConfig, QwenImageTransformer2DModel

    stock = QwenImageTransformer2DModel(**tiny_transformer_config())
    stock.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="would silently drop"):
        QwenImageSPTransformer2DModel.from_transformer(stock)
    stock.disable_cache()
    assert isinstance(QwenImageSPTransformer2DModel.from_transformer(stock), QwenImageSPTransformer2DModel)


# ------------------------------------------------------------------------------ data-parallel replicas (dp x cfg x ...)

# (dp, cfg, ring, ulysses) at world 4 -> per rank: the global ranks of each group, worked out by hand from
# rank = dp_idx * (cfg*ring*ulysses) + cfg_idx * (ring*ulysses) + ring_idx * ulysses + ulysses_idx.
DP_LAYOUTS = {
    # no replicas: the layout of the cfg x ring x ulysses mesh, unchanged (the replica is the world)
    (1, 1, 2, 2): [dict(replica=[0, 1, 2, 3], sp=[0, 1, 2, 3], ulysses=[0, 1], ring=[0, 2], cfg=[0]),
                   dict(replica=[0, 1, 2, 3], sp=[0, 1, 2, 3], ulysses=[0, 1], ring=[1, 3], cfg=[1]),
                   dict(replica=[0, 1, 2, 3], sp=[0, 1, 2, 3], ulysses=[2, 3], ring=[0, 2], cfg=[2]),
                   dict(replica=[0, 1, 2, 3], sp=[0, 1, 2, 3], ulysses=[2, 3], ring=[1, 3], cfg=[3])],
    (1, 2, 1, 2): [dict(replica=[0, 1, 2, 3], sp=[0, 1], ulysses=[0, 1], ring=[0], cfg=[0, 2]),
                   dict(replica=[0, 1, 2, 3], sp=[0, 1], ulysses=[0, 1], ring=[1], cfg=[1, 3]),
                   dict(replica=[0, 1, 2, 3], sp=[2, 3], ulysses=[2, 3], ring=[2], cfg=[0, 2]),
                   dict(replica=[0, 1, 2, 3], sp=[2, 3], ulysses=[2, 3], ring=[3], cfg=[1, 3])],
    # two replicas (0, 1) and (2, 3): every group stays inside one
    (2, 1, 1, 2): [dict(replica=[0, 1], sp=[0, 1], ulysses=[0, 1], ring=[0], cfg=[0]),
                   dict(replica=[0, 1], sp=[0, 1], ulysses=[0, 1], ring=[1], cfg=[1]),
                   dict(replica=[2, 3], sp=[2, 3], ulysses=[2, 3], ring=[2], cfg=[2]),
                   dict(replica=[2, 3], sp=[2, 3], ulysses=[2, 3], ring=[3], cfg=[3])],
    (2, 1, 2, 1): [dict(replica=[0, 1], sp=[0, 1], ulysses=[0], ring=[0, 1], cfg=[0]),
                   dict(replica=[0, 1], sp=[0, 1], ulysses=[1], ring=[0, 1], cfg=[1]),
                   dict(replica=[2, 3], sp=[2, 3], ulysses=[2], ring=[2, 3], cfg=[2]),
                   dict(replica=[2, 3], sp=[2, 3], ulysses=[3], ring=[2, 3], cfg=[3])],
    (2, 2, 1, 1): [dict(replica=[0, 1], sp=[0], ulysses=[0], ring=[0], cfg=[0, 1]),
                   dict(replica=[0, 1], sp=[1], ulysses=[1], ring=[1], cfg=[0, 1]),
                   dict(replica=[2, 3], sp=[2], ulysses=[2], ring=[2], cfg=[2, 3]),
                   dict(replica=[2, 3], sp=[3], ulysses=[3], ring=[3], cfg=[2, 3])],
    # four replicas of one process: no group at all
    (4, 1, 1, 1): [dict(replica=[r], sp=[r], ulysses=[r], ring=[r], cfg=[r]) for r in range(4)],
}
# Pipelines per replica: (dp, cfg, ring, ulysses, shard_weights). Each replica draws its own prompt and seed.
DP_PIPELINE_MODES = [(2, 1, 1, 2, False), (2, 2, 1, 1, False), (4, 1, 1, 1, False), (2, 1, 1, 2, True)]
DP_PROMPTS = ("a red cat", "two small blue squares on a big yellow field at noon", "a dog", "green grass")


def _dp_layout_id(dp, cfg, ring, ulysses):
    return f"layout-dp{dp}cfg{cfg}r{ring}u{ulysses}"


def _dp_pipeline_id(dp, cfg, ring, ulysses, shard):
    return f"pipeline-dp{dp}cfg{cfg}r{ring}u{ulysses}" + ("-sharded" if shard else "")


def _group_ranks(group, own):
    """The global ranks of a group as torch.distributed knows them (`[own]` for `None`, a group of one)."""
    import torch.distributed as dist

    return [own] if group is None else dist.get_process_group_ranks(group)


def _check_replicas(rank, world_size):
    """Case id -> this rank's layout (group ranks, stored and actual) or pipeline diffs against one process."""
    import torch.distributed as dist

    from diffusers_qwen_sp.distributed import ParallelGroups

    results = {}
    for mesh in DP_LAYOUTS:
        dp, cfg, ring, ulysses = mesh
        groups = ParallelGroups.create(ulysses, ring, cfg, dp_degree=dp)
        total = torch.tensor([rank])
        if groups.replica_group is not None:
            dist.all_reduce(total, group=groups.replica_group)  # (1,) -> sum of the replica's ranks
        results[_dp_layout_id(*mesh)] = {
            "stored": dict(replica=groups.replica_ranks, sp=groups.sp_ranks, ulysses=groups.ulysses_ranks,
                           ring=groups.ring_ranks, cfg=groups.cfg_ranks),
            "actual": {name: _group_ranks(getattr(groups, f"{name}_group"), rank)
                       for name in ("replica", "sp", "ulysses", "ring", "cfg")},
            "replica_is_world": groups.replica_group is dist.group.WORLD,
            "dp_rank": groups.dp_rank, "replica_rank": groups.replica_rank, "replica_size": groups.replica_size,
            "replica_sum": total.item(),
        }
    with torch.no_grad():
        stock = build_tiny_pipeline("qwen_image")
        references = {prompt: _as_tensor(stock(**tiny_pipeline_call_kwargs("qwen_image", prompt=prompt)).images)
                      for prompt in DP_PROMPTS}
        for dp, cfg, ring, ulysses, shard in DP_PIPELINE_MODES:
            pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
            pipe.enable_sequence_parallel(dp_degree=dp, cfg_degree=cfg, ring_degree=ring, ulysses_degree=ulysses,
                                          shard_weights=shard)
            groups = get_sequence_parallel_runtime(pipe.transformer).groups
            prompt = DP_PROMPTS[groups.dp_rank]  # replicas run different requests at the same time
            result = results[_dp_pipeline_id(dp, cfg, ring, ulysses, shard)] = {"diffs": []}
            for repeat in range(2):
                kwargs = tiny_pipeline_call_kwargs("qwen_image", prompt=prompt)
                if groups.replica_rank:  # a follower's noise is replaced by its leader's
                    kwargs["generator"] = torch.Generator().manual_seed(1000 + rank)
                result["diffs"].append((_as_tensor(pipe(**kwargs).images) - references[prompt]).abs().max().item())
            if shard:
                from diffusers_qwen_sp.weight_sharding import get_weight_sharding

                result["shard_ranks"] = get_weight_sharding(pipe.transformer).ranks
                result["replica_ranks"] = groups.replica_ranks
    # Sharding a one-process replica shards nothing: refused on every rank alike.
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    try:
        pipe.enable_sequence_parallel(dp_degree=4, shard_weights=True)
        results["shard-one-process-replicas"] = "no error was raised"
    except ValueError as error:
        results["shard-one-process-replicas"] = str(error)
    return results


dp_spawn = spawn_fixture(_check_replicas, Spawn(4, timeout=300))
DP_CASES = {4: [*map(_dp_layout_id, *zip(*DP_LAYOUTS)), *(_dp_pipeline_id(*mode) for mode in DP_PIPELINE_MODES),
                "shard-one-process-replicas"]}


@pytest.mark.distributed
@pytest.mark.timeout(350)
@pytest.mark.parametrize("world_size, case", world_cases(DP_CASES))
def test_replicas_have_their_own_groups_and_run_their_own_requests(dp_spawn, world_size, case):
    per_rank = dp_spawn[world_size].case(case)
    if case.startswith("layout-"):
        dp, cfg, ring, ulysses = next(mesh for mesh in DP_LAYOUTS if _dp_layout_id(*mesh) == case)
        for rank, (result, expected) in enumerate(zip(per_rank, DP_LAYOUTS[dp, cfg, ring, ulysses])):
            assert result["stored"] == expected, f"rank {rank}: {result['stored']}"
            assert result["actual"] == expected, f"rank {rank}: the process groups hold {result['actual']}"
            assert result["replica_is_world"] == (dp == 1), f"rank {rank}"  # dp 1: as before, the world
            assert result["dp_rank"] == rank // (4 // dp) and result["replica_rank"] == rank % (4 // dp)
            assert result["replica_size"] == 4 // dp
            assert result["replica_sum"] == sum(expected["replica"]), f"rank {rank}: {result['replica_sum']}"
    elif case == "shard-one-process-replicas":
        for message in per_rank:
            assert "shards nothing: 'world' shards over the ranks of one replica" in message, message
    else:
        for rank, result in enumerate(per_rank):
            assert len(result["diffs"]) == 2 and max(result["diffs"]) <= TOLERANCE, f"rank {rank}: {result}"
            if case.endswith("-sharded"):
                assert result["shard_ranks"] == result["replica_ranks"], f"rank {rank}: {result}"


def test_config_counts_replicas_in_the_world():
    config = SequenceParallelConfig(ulysses_degree=2, dp_degree=3)
    assert (config.replica_size, config.world_size) == (2, 6) and "dp_degree=3" in repr(config)
    with pytest.raises(ValueError, match="dp_degree must be a positive integer, got 0"):
        SequenceParallelConfig(dp_degree=0)

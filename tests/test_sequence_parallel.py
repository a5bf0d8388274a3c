"""Sequence parallelism on CPU with gloo against the single-process run (fp32).

Tolerance: max abs diff <= 1e-4 (outputs, images in [0, 1]); the attention merge reorders sums, so bit-equality is not
expected. Every case calls the model several times and checks each call: a collective read before it completes shows
up as a random bad call. All cases of one world size run in one spawn.
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


def _check_transformer(rank, world_size):
    failures = []
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
                image_tokens = sum(f * h * w for f, h, w in img_shapes)
                if seen_lengths[-1] != -(-image_tokens // world_size):  # the blocks see ceil(S / P) tokens
                    failures.append(f"{name}: blocks saw {seen_lengths[-1]} of {image_tokens} image tokens")
                for call in range(3):
                    diff = (model(**kwargs)[0] - expected).abs().max().item()
                    if not diff <= TOLERANCE:
                        failures.append(f"{name} u{ulysses}r{ring} call {call}: {diff}")
                remove_sequence_parallel(model)
                if get_sequence_parallel_runtime(model) is not None or not torch.equal(model(**kwargs)[0], expected):
                    failures.append(f"{name} u{ulysses}r{ring}: remove did not restore the unsharded model")
            probe.remove()
    return failures


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


def _check_pipeline(rank, world_size):
    failures = []
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
            if not any(skipped for _, skipped in expected_skips.values()):
                failures.append(f"{name}: TeaCache skipped nothing at {TEACACHE}, the SP check would be vacuous")
            for cfg, ulysses, ring in PIPELINE_MODES[world_size]:
                mode = f"{name} cfg{cfg} u{ulysses} r{ring}"
                pipe.enable_sequence_parallel(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring)
                for repeat in range(2):
                    kwargs = tiny_pipeline_call_kwargs(variant, **call)
                    # A different seed on every rank: the pipeline must still denoise rank 0's noise everywhere.
                    kwargs["generator"] = torch.Generator().manual_seed(0 if rank == 0 else 1000 + rank)
                    diff = (_as_tensor(pipe(**kwargs).images) - expected).abs().max().item()
                    if not diff <= TOLERANCE:
                        failures.append(f"{mode} call {repeat}: {diff}")
                pipe.enable_teacache(**TEACACHE)
                cached = _as_tensor(pipe(**tiny_pipeline_call_kwargs(variant, **call, num_inference_steps=TEACACHE_STEPS)).images)
                diff = (cached - expected_cached).abs().max().item()
                if not diff <= TOLERANCE:
                    failures.append(f"{mode} TeaCache: {diff}")
                skips = _skip_lists(pipe.teacache_stats())  # merged over the CFG ranks under CFG parallel
                if skips != expected_skips:
                    failures.append(f"{mode} TeaCache skip lists {skips} != single process {expected_skips}")
                pipe.disable_teacache()
                pipe.disable_sequence_parallel()
    return failures


def _as_tensor(images):
    return torch.stack(list(images)) if isinstance(images, list) else images


def _run_all(rank, world_size):
    return _check_transformer(rank, world_size) + _check_pipeline(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_matches_single_process(world_size):
    results = run_distributed(_run_all, world_size, timeout=400)
    for rank, failures in enumerate(results):
        assert failures == [], f"rank {rank}: {failures}"


def test_config_validation():
    with pytest.raises(ValueError, match="ulysses_degree must be a positive integer, got 0"):
        SequenceParallelConfig(ulysses_degree=0)
    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2"):
        SequenceParallelConfig(cfg_degree=3)
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        SequenceParallelConfig(attention_backend="fast")


def _errors(rank, world_size):
    messages = {}
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
    logging.getLogger("diffusers_qwen_sp.hooks.cfg_parallel").addHandler(handler)
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    pipe.enable_sequence_parallel(cfg_degree=2)
    with torch.no_grad():
        for _ in range(2):  # two calls, 2 steps each: told once
            pipe(**tiny_pipeline_call_kwargs("qwen_image", prompt="a red cat", true_cfg_scale=1.0))
    return [record.getMessage() for record in records]


def test_clear_errors_under_a_launcher():
    warnings = run_distributed(_cfg_parallel_duplicate_warning, 2, timeout=120)
    # Told once, by rank 0 (diffusers' loggers speak on rank 0 only under torch.distributed).
    assert len(warnings[0]) == 1 and "batch of 1 does not split" in warnings[0][0], warnings
    assert warnings[1] == [], warnings
    messages = run_distributed(_errors, 2, timeout=120)[0]
    assert "= 4, but the world size is 2" in messages["product"]
    assert "ulysses_degree=2 does not divide the 3 attention heads" in messages["heads"]
    assert "enable_parallelism" in messages["diffusers_cp"]
    assert "does not know whether this call does true CFG" in messages["cfg_unknown"]


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

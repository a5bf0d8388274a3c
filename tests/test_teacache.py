"""TeaCache: the decision with hand-worked numbers, the hook on tiny pipelines (fp32) against uncached runs and an
independent re-derivation of its skip pattern, per-branch state, stats, resets, apply/remove, the zero_cond_t
indicator, calibration.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_qwen_sp import QwenImageSPTransformer2DModel
from diffusers_qwen_sp.hooks.teacache import (
    QWEN_IMAGE_TEACACHE_COEFFICIENTS,
    TEACACHE_HOOK,
    TeaCacheConfig,
    apply_teacache,
    get_teacache_hook,
    remove_teacache,
    teacache_decision,
    teacache_indicator,
    teacache_stats,
)
from diffusers_qwen_sp.pipelines import QwenImageSPPipeline
from diffusers_qwen_sp.teacache_calibration import calibrate_teacache, format_coefficients
from diffusers_qwen_sp.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs, tiny_transformer_config

from _spawn import Spawn, spawn_fixture, world_cases


STEPS = 10
# On the tiny model each of 10 steps changes the indicator by rel ~0.06-0.09, i.e. |poly(rel)| ~0.065-0.077 with the
# Qwen-Image coefficients: 0.1 skips every other step, 0.25 three in four. (0.2 would put an accumulation at 0.2003,
# too close to call.)
THRESHOLD = 0.255


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    yield pipe
    remove_teacache(pipe.transformer)


def _run(pipe, **overrides) -> torch.Tensor:
    overrides.setdefault("num_inference_steps", STEPS)
    with torch.no_grad():
        return pipe(**tiny_pipeline_call_kwargs("qwen_image", **overrides)).images


def _tiny_transformer(variant: str = "qwen_image", seed: int = 0) -> QwenImageSPTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageSPTransformer2DModel(**tiny_transformer_config(variant)).eval()


def _transformer_inputs(batch: int = 1, side: int = 4, txt: int = 5, seed: int = 0, timestep: float = 0.7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, side * side, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, txt, 32, generator=generator),
        encoder_hidden_states_mask=None,
        timestep=torch.full((batch,), timestep),
        img_shapes=[[(1, side, side)]] * batch,
    )


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    config = TeaCacheConfig()
    assert config.threshold == 0.2
    assert config.coefficients == [-4.5e2, 2.8e2, -4.5e1, 3.2, -2e-2] == list(QWEN_IMAGE_TEACACHE_COEFFICIENTS)
    assert "threshold=0.2" in repr(config)
    assert config.warmup_steps == 0
    for bad in (dict(threshold=-0.1), dict(threshold=float("nan")), dict(coefficients=[]),
                dict(coefficients=[1.0, float("inf")]), dict(num_inference_steps=0), dict(warmup_steps=-1),
                dict(warmup_steps=1.5)):
        with pytest.raises(ValueError, match="TeaCacheConfig"):
            TeaCacheConfig(**bad)
    with pytest.raises(TypeError, match="threshold"):
        TeaCacheConfig(threshold="0.2")


# ---------------------------------------------------------------------------------------------------- decision


def _pair(rel: float, valid: int = 4, padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # previous: (1, valid + padding, 5) ones -> sum|prev| over the valid tokens = 5 * valid = 20
    previous = torch.ones(1, valid + padding, 5)
    current = previous.clone()
    current[0, 0, 0] += rel * 5 * valid  # sum|cur - prev| = rel * 20
    if padding:
        current[:, valid:] = 1e6  # padding tokens: garbage that must not count
    return current, previous


def test_decision_hand_worked():
    identity = [0.0, 0.0, 0.0, 1.0, 0.0]  # poly(rel) = rel: rescaled == rel
    kwargs = dict(coefficients=identity, threshold=0.1)

    # step 0: no previous indicator -> compute, accumulator 0
    first = teacache_decision(torch.ones(1, 4, 5), None, 0.0, **kwargs)
    assert first.compute and first.rel_l1 is None and first.accumulated == 0.0

    accumulated, decisions = 0.0, []
    for rel, force in ((0.05, False), (0.04, False), (0.03, False), (0.08, False), (0.02, True)):
        decision = teacache_decision(*_pair(rel), accumulated, force_compute=force, **kwargs)
        assert decision.rel_l1 == pytest.approx(rel, rel=1e-6)
        assert decision.rescaled == pytest.approx(rel, rel=1e-6)
        accumulated = decision.accumulated
        decisions.append((decision.compute, round(accumulated, 6)))
    assert decisions == [
        (False, 0.05),  # step 1: acc 0 + 0.05 = 0.05 < 0.1 -> skip
        (False, 0.09),  # step 2: acc 0.05 + 0.04 = 0.09 < 0.1 -> skip
        (True, 0.0),  # step 3: acc 0.09 + 0.03 = 0.12 >= 0.1 -> compute, reset to 0
        (False, 0.08),  # step 4: acc 0 + 0.08 = 0.08 < 0.1 -> skip
        (True, 0.0),  # step 5: the last step -> compute whatever the numbers (0.08 + 0.02 = 0.10)
    ]


def test_decision_absolute_value_padding_and_degenerate_norm():
    # poly(rel) = rel - 0.5 -> poly(0.1) = -0.4: rescaled is |-0.4| = 0.4 >= 0.3 -> compute
    decision = teacache_decision(*_pair(0.1), 0.0, coefficients=[1.0, -0.5], threshold=0.3)
    assert decision.rescaled == pytest.approx(0.4) and decision.compute

    # 4 real tokens + 3 SP padding tokens holding 1e6: only the real ones count -> rel 0.05 as without padding
    decision = teacache_decision(*_pair(0.05, padding=3), 0.0, coefficients=[1.0, 0.0], threshold=0.1, valid_tokens=4)
    assert decision.rel_l1 == pytest.approx(0.05, rel=1e-6) and not decision.compute

    # a rank whose chunk is all padding contributes 0 to both sums; alone it cannot judge: sum|prev| = 0 -> compute
    zeros = torch.zeros(1, 3, 5)
    decision = teacache_decision(zeros + 1, zeros, 0.0, coefficients=[1.0, 0.0], threshold=10.0)
    assert decision.rel_l1 == math.inf and decision.compute
    decision = teacache_decision(zeros, zeros, 0.0, coefficients=[1.0, 0.0], threshold=10.0, valid_tokens=0)
    assert decision.rel_l1 == 0.0 and not decision.compute


# ---------------------------------------------------------------------------------------------------- pipeline


def test_threshold_zero_is_identical_to_no_cache(pipe):
    # The reference is computed here, not in a module fixture: those run before conftest's one-thread setting, and a
    # different thread count changes float reduction order.
    uncached = _run(pipe)
    apply_teacache(pipe.transformer, TeaCacheConfig(threshold=0.0))
    try:
        images = _run(pipe)
        stats = teacache_stats(pipe.transformer)
    finally:
        remove_teacache(pipe.transformer)
    assert torch.equal(images, uncached)
    assert stats.keys() == {"cond", "uncond"}
    for branch in stats.values():
        assert branch["computed"] == list(range(STEPS)) and branch["skipped"] == []


def _hand_indicator(transformer, call: dict) -> torch.Tensor:
    # block 0's modulated image input, written out: LayerNorm (no affine, eps 1e-6) * (1 + scale) + shift
    inputs = transformer.preprocess(
        call["hidden_states"], call["encoder_hidden_states"], call["encoder_hidden_states_mask"], call["timestep"],
        call["img_shapes"],
    )
    block = transformer.transformer_blocks[0]
    dim = inputs.hidden_states.shape[-1]
    modulation = block.img_mod[1](F.silu(inputs.temb))  # (B, 6D): shift, scale, gate, then the MLP's three
    shift, scale = modulation[:, :dim], modulation[:, dim : 2 * dim]
    normed = F.layer_norm(inputs.hidden_states, (dim,), eps=1e-6)
    return normed * (1 + scale[:, None]) + shift[:, None]


def test_skip_pattern_matches_independent_derivation(pipe):
    uncached = _run(pipe)
    transformer = pipe.transformer
    calls: list[dict] = []

    def record(module, args, kwargs):
        calls.append({key: kwargs[key] for key in (
            "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")})

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    apply_teacache(transformer, TeaCacheConfig(threshold=THRESHOLD))
    try:
        images = _run(pipe)
        stats = teacache_stats(transformer)
    finally:
        remove_teacache(transformer)
        handle.remove()

    # The pipeline calls cond then uncond at every step. Re-derive each branch's decisions from its own inputs.
    assert len(calls) == 2 * STEPS
    coefficients = np.array(QWEN_IMAGE_TEACACHE_COEFFICIENTS)
    with torch.no_grad():
        for offset, branch in enumerate(("cond", "uncond")):
            indicators = [_hand_indicator(transformer, call) for call in calls[offset::2]]
            computed, skipped, accumulated, margins = [0], [], 0.0, []
            for step in range(1, STEPS):
                previous, current = indicators[step - 1], indicators[step]
                rel = ((current - previous).abs().sum() / previous.abs().sum()).item()
                assert stats[branch]["rel_l1"][step] == pytest.approx(rel, rel=1e-5)
                accumulated += abs(np.polyval(coefficients, rel))
                margins.append(abs(accumulated - THRESHOLD))
                if accumulated < THRESHOLD and step < STEPS - 1:
                    skipped.append(step)
                else:
                    computed.append(step)
                    accumulated = 0.0
            # No accumulation lands within 1e-3 of the threshold: the pattern cannot flip on rounding.
            assert min(margins) > 1e-3, margins
            assert stats[branch]["computed"] == computed
            assert stats[branch]["skipped"] == skipped
    # Measured on this model (cond and uncond alike: the indicator does not see the text):
    # step  rel     |poly|  accumulated
    #   1   0.0626  0.0658  0.0658          < 0.25 -> skip
    #   2   0.0617  0.0654  0.1311          < 0.25 -> skip
    #   3   0.0710  0.0691  0.2003          < 0.25 -> skip
    #   4   0.0722  0.0696  0.2699         >= 0.25 -> compute, reset
    #   5-7 0.0685 + 0.0696 + 0.0771 = 0.2152 -> skip; 8: + 0.0740 = 0.2892 -> compute; 9: last -> compute
    assert stats["cond"]["skipped"] == stats["uncond"]["skipped"] == [1, 2, 3, 5, 6, 7]
    difference = (images - uncached).abs().max().item()
    assert 0 < difference < 0.05, difference


def test_every_stage_and_sp_hook_point_runs_on_skipped_steps(pipe):
    # The SP split hooks live on `image_rope_prepare` / `modulate_index_prepare`, the gather on `image_output` after
    # `proj_out`: a skipped step must go through them exactly like a computed one.
    counts = {"image_rope_prepare": 0, "modulate_index_prepare": 0, "proj_out": 0, "image_output": 0,
              "transformer_blocks.0": 0}

    class Count(ModelHook):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def pre_forward(self, module, *args, **kwargs):
            counts[self.name] += 1
            return args, kwargs

    transformer = pipe.transformer
    for name in counts:
        HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(name)).register_hook(Count(name), "count")
    apply_teacache(transformer, TeaCacheConfig(threshold=THRESHOLD))
    try:
        _run(pipe)
        stats = teacache_stats(transformer)
    finally:
        remove_teacache(transformer)
        for name in counts:
            transformer.get_submodule(name)._diffusers_hook.remove_hook("count", recurse=False)
    computed = len(stats["cond"]["computed"]) + len(stats["uncond"]["computed"])
    assert computed < 2 * STEPS
    assert counts == {"image_rope_prepare": 2 * STEPS, "modulate_index_prepare": 2 * STEPS, "proj_out": 2 * STEPS,
                      "image_output": 2 * STEPS, "transformer_blocks.0": computed}


def test_stats_survive_the_end_of_call_reset_and_are_replaced(pipe):
    transformer = pipe.transformer
    apply_teacache(transformer, TeaCacheConfig(threshold=0.1))
    try:
        with pytest.raises(ValueError, match="apply_teacache"):
            teacache_stats(torch.nn.Linear(1, 1))
        assert teacache_stats(transformer) == {}
        _run(pipe)  # the pipeline resets the hook's state at its end (maybe_free_model_hooks)
        first = teacache_stats(transformer)
        assert first["cond"]["skipped"] == [1, 3, 5, 7]  # threshold 0.1: ~0.07 per step -> every other step
        assert first["cond"]["computed"] == [0, 2, 4, 6, 8, 9]
        transformer._reset_stateful_cache()  # a second reset with nothing live keeps them
        assert teacache_stats(transformer) == first
        _run(pipe, num_inference_steps=4)
        second = teacache_stats(transformer)
    finally:
        remove_teacache(transformer)
    assert second.keys() == {"cond", "uncond"}
    for branch in second.values():
        assert sorted(branch["computed"] + branch["skipped"]) == [0, 1, 2, 3]
        assert branch["computed"][0] == 0 and branch["computed"][-1] == 3
        assert set(branch["rel_l1"]) == {1, 2, 3}


# ---------------------------------------------------------------------------------------------------- by hand


def _call(transformer, name: str, **inputs) -> torch.Tensor:
    with torch.no_grad(), transformer.cache_context(name):
        return transformer(**inputs, return_dict=False)[0]


def test_branches_keep_separate_state():
    transformer = _tiny_transformer()
    latents = [_transformer_inputs(seed=0, timestep=1.0 - 0.1 * i)["hidden_states"] * (1 - 0.05 * i) for i in range(5)]
    text = {"cond": _transformer_inputs(seed=1)["encoder_hidden_states"],
            "uncond": _transformer_inputs(seed=2)["encoder_hidden_states"]}

    def inputs(i: int, branch: str) -> dict:
        return dict(_transformer_inputs(timestep=1.0 - 0.1 * i), hidden_states=latents[i],
                    encoder_hidden_states=text[branch])

    config = TeaCacheConfig(threshold=0.5, num_inference_steps=5)
    apply_teacache(transformer, config)
    # One branch alone, then both interleaved as true CFG does: each branch must behave as if alone.
    alone = {branch: [] for branch in text}
    for branch in text:
        for i in range(5):
            alone[branch].append(_call(transformer, branch, **inputs(i, branch)))
        transformer._reset_stateful_cache()
    interleaved = {branch: [] for branch in text}
    for i in range(5):
        for branch in text:
            interleaved[branch].append(_call(transformer, branch, **inputs(i, branch)))
    stats = teacache_stats(transformer)
    remove_teacache(transformer)
    assert stats["cond"]["skipped"] and stats["cond"]["skipped"] == stats["uncond"]["skipped"]
    for branch in text:
        for a, b in zip(alone[branch], interleaved[branch]):
            assert torch.equal(a, b)
    # The residuals differ per branch: a skipped cond step reusing uncond's residual would be caught here.
    skipped = stats["cond"]["skipped"][0]
    assert not torch.allclose(interleaved["cond"][skipped], interleaved["uncond"][skipped])


def test_shape_change_and_loop_end_reset_the_branch():
    transformer = _tiny_transformer()
    small = _transformer_inputs(side=4)
    large = _transformer_inputs(side=6)
    with torch.no_grad():
        expected_large = transformer(**large, return_dict=False)[0]
    apply_teacache(transformer, TeaCacheConfig(threshold=100.0, num_inference_steps=3))
    try:
        for _ in range(2):  # step 0 computed, step 1 skipped (threshold 100)
            _call(transformer, "cond", **small)
        assert teacache_stats(transformer)["cond"] == {"computed": [0], "skipped": [1], "rel_l1": {1: 0.0}}
        # new image size: the branch restarts at step 0 and computes (no residual of the wrong shape is reused)
        assert torch.equal(_call(transformer, "cond", **large), expected_large)
        assert teacache_stats(transformer)["cond"]["computed"] == [0]
        _call(transformer, "cond", **large)  # step 1: skipped
        _call(transformer, "cond", **large)  # step 2 = num_inference_steps - 1: forced
        assert teacache_stats(transformer)["cond"] == {"computed": [0, 2], "skipped": [1], "rel_l1": {1: 0.0, 2: 0.0}}
        _call(transformer, "cond", **large)  # a 4th call of a 3-step loop starts a new loop at step 0
        assert teacache_stats(transformer)["cond"]["computed"] == [0]
        # the cache context's step index wins over counting: step_index 0 restarts the loop
        with torch.no_grad(), transformer.cache_context("cond", step_index=0, num_inference_steps=2):
            transformer(**large)
        with torch.no_grad(), transformer.cache_context("cond", step_index=1, num_inference_steps=2):
            transformer(**large)  # the last step: computed although nothing changed
        assert teacache_stats(transformer)["cond"]["computed"] == [0, 1]
        with pytest.raises(RuntimeError, match="cache_context"):
            transformer(**large)
    finally:
        remove_teacache(transformer)


@pytest.mark.parametrize("warmup, computed", [(0, [0, 5]), (1, [0, 5]), (3, [0, 1, 2, 5]), (9, [0, 1, 2, 3, 4, 5])])
def test_warmup_steps_are_always_computed(warmup, computed):
    # threshold 100 skips every step it may: only the warm-up steps and the last one (step 5 of 6) are computed
    transformer = _tiny_transformer()
    apply_teacache(transformer, TeaCacheConfig(threshold=100.0, num_inference_steps=6, warmup_steps=warmup))
    try:
        for repeat in range(2):  # the second loop starts at step 0 again: same decisions
            for step in range(6):
                _call(transformer, "cond", **_transformer_inputs(timestep=1.0 - 0.1 * step))
            stats = teacache_stats(transformer)["cond"]
            assert stats["computed"] == computed, repeat
            assert sorted(stats["computed"] + stats["skipped"]) == list(range(6)), repeat
    finally:
        remove_teacache(transformer)


def test_apply_remove_apply():
    transformer = _tiny_transformer()
    inputs = _transformer_inputs()
    doubled = dict(inputs, hidden_states=inputs["hidden_states"] * 2)
    with torch.no_grad():
        reference = transformer(**inputs).sample
        reference_doubled = transformer(**doubled).sample
    hook = apply_teacache(transformer, TeaCacheConfig(threshold=100.0))
    assert "TeaCacheHook(threshold=100.0" in repr(hook)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_teacache(transformer)
    outputs = [_call(transformer, "cond", **inputs), _call(transformer, "cond", **doubled)]
    assert teacache_stats(transformer)["cond"]["skipped"] == [1]
    assert torch.equal(outputs[0], reference) and not torch.equal(outputs[1], reference_doubled)

    remove_teacache(transformer)
    remove_teacache(transformer)  # idempotent
    assert get_teacache_hook(transformer) is None
    assert transformer.blocks_stage._diffusers_hook.get_hook(TEACACHE_HOOK) is None
    assert torch.equal(_call(transformer, "cond", **doubled), reference_doubled)  # the stock forward again

    apply_teacache(transformer, TeaCacheConfig(threshold=100.0))
    again = [_call(transformer, "cond", **inputs), _call(transformer, "cond", **doubled)]
    assert teacache_stats(transformer)["cond"]["computed"] == [0]
    assert teacache_stats(transformer)["cond"]["skipped"] == [1]
    assert torch.equal(again[0], outputs[0]) and torch.equal(again[1], outputs[1])

    # TeaCache sits on the blocks stage: a hook registered on the root afterwards keeps running when TeaCache goes.
    calls = []

    class Outer(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(Outer(), "outer")
    remove_teacache(transformer)
    assert torch.equal(_call(transformer, "cond", **doubled), reference_doubled) and calls == [1]
    transformer._diffusers_hook.remove_hook("outer", recurse=False)

    with pytest.raises(TypeError, match="QwenImageSPTransformer2DModel"):
        apply_teacache(torch.nn.Linear(2, 2))


def test_enable_cache_and_disable_cache_like_diffusers_caches():
    from diffusers import FirstBlockCacheConfig

    transformer = _tiny_transformer()
    inputs = _transformer_inputs()
    doubled = dict(inputs, hidden_states=inputs["hidden_states"] * 2)
    with torch.no_grad():
        reference_doubled = transformer(**doubled).sample
    for _ in range(2):  # enable -> disable -> enable: no state left behind
        transformer.enable_cache(TeaCacheConfig(threshold=100.0))
        assert transformer.is_cache_enabled and get_teacache_hook(transformer) is not None
        _call(transformer, "cond", **inputs)
        skipped = _call(transformer, "cond", **doubled)  # threshold 100: step 1 reuses step 0's residual
        assert teacache_stats(transformer)["cond"]["skipped"] == [1] and not torch.equal(skipped, reference_doubled)
        with pytest.raises(ValueError, match="already been enabled"):  # diffusers' own refusal to stack caches
            transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        transformer.disable_cache()
        assert not transformer.is_cache_enabled and get_teacache_hook(transformer) is None
        assert torch.equal(_call(transformer, "cond", **doubled), reference_doubled)
    # And the other way round: TeaCache refuses to stack on a diffusers cache.
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="does not stack"):
        apply_teacache(transformer)
    transformer.disable_cache()
    assert get_teacache_hook(transformer) is None and not transformer.is_cache_enabled


def test_teacache_nests_inside_cfg_parallel():
    from diffusers_qwen_sp.distributed import ParallelGroups
    from diffusers_qwen_sp.hooks.cfg_parallel import CFG_PARALLEL_HOOK, apply_cfg_parallel, get_cfg_parallel_hook

    # CFG parallel on the root, TeaCache on the blocks stage: nested by construction, in either order of application.
    for teacache_first in (False, True):
        transformer = _tiny_transformer()
        if teacache_first:
            apply_teacache(transformer)
        cfg_hook = apply_cfg_parallel(transformer, ParallelGroups(cfg_degree=2))  # needs no process group
        if not teacache_first:
            apply_teacache(transformer)
        assert transformer._diffusers_hook._hook_order == [CFG_PARALLEL_HOOK]
        assert transformer.blocks_stage._diffusers_hook._hook_order == [TEACACHE_HOOK]
        assert get_cfg_parallel_hook(transformer) is cfg_hook
        remove_teacache(transformer)
        assert transformer._diffusers_hook._hook_order == [CFG_PARALLEL_HOOK]
        assert cfg_hook.fn_ref.original_forward.__self__ is transformer  # wraps the forward itself


# ---------------------------------------------------------------------------------------------------- zero_cond_t


def test_zero_cond_t_indicator_batch_2_by_hand():
    transformer = _tiny_transformer("qwen_image_edit_2511")
    generator = torch.Generator().manual_seed(3)
    # per sample: a 4x4 target then a 2x2 reference image -> 20 tokens, modulate_index [0]*16 + [1]*4
    img_shapes = [[(1, 4, 4), (1, 2, 2)]] * 2
    with torch.no_grad():
        inputs = transformer.preprocess(
            torch.randn(2, 20, 16, generator=generator), torch.randn(2, 5, 32, generator=generator), None,
            torch.tensor([0.9, 0.3]), img_shapes,
        )
        indicator = teacache_indicator(transformer.transformer_blocks[0], inputs)

        assert inputs.temb.shape == (4, 64)  # (2B, D): rows [t_0, t_1, 0, 0]
        assert inputs.modulate_index.tolist() == [[0] * 16 + [1] * 4] * 2
        block = transformer.transformer_blocks[0]
        weight, bias = block.img_mod[1].weight, block.img_mod[1].bias
        expected = torch.empty(2, 20, 64)
        for b in range(2):
            for s in range(20):
                row = b if s < 16 else 2 + b  # target tokens: sample b at t_b; reference tokens: sample b at t = 0
                modulation = weight @ F.silu(inputs.temb[row]) + bias
                shift, scale = modulation[:64], modulation[64:128]
                x = inputs.hidden_states[b, s]
                normed = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-6)
                expected[b, s] = normed * (1 + scale) + shift
    torch.testing.assert_close(indicator, expected, rtol=1e-5, atol=1e-5)
    # the two samples and the two halves really differ (else the test would not see a wrong row choice)
    assert not torch.allclose(indicator[0, :16], indicator[1, :16])


# ---------------------------------------------------------------------------------------------------- calibration


def test_calibration_on_the_tiny_model(pipe):
    calibration = calibrate_teacache(
        pipe, ["a red cat", "a blue dog"], num_inference_steps=6, degree=4,
        **{key: value for key, value in tiny_pipeline_call_kwargs("qwen_image").items()
           if key not in ("prompt", "num_inference_steps")},
    )
    assert len(calibration.coefficients) == 5 and all(math.isfinite(c) for c in calibration.coefficients)
    # 2 prompts x 2 CFG branches x 5 steps after the first
    assert len(calibration.pairs) == 20
    assert all(0 < x < 1 and 0 < y < 1 for x, y in calibration.pairs)
    assert math.isfinite(calibration.residual)
    line = format_coefficients(calibration)
    assert line.startswith("TeaCacheConfig(coefficients=[") and len(eval(line).coefficients) == 5
    assert get_teacache_hook(pipe.transformer) is None  # the recording hooks are gone
    assert pipe.transformer.image_output._diffusers_hook._hook_order == []


# ---------------------------------------------------------------------------------------------------- SP + TeaCache

SP_STEPS = 8
SP_THRESHOLD = 0.3
SP_CFG_SCALE = 4.0
SP_TOL = 1e-4
SP_VARIANTS = ("qwen_image", "qwen_image_edit_2511")


def _sp_problem(variant: str) -> dict:
    generator = torch.Generator().manual_seed(7)
    if variant == "qwen_image":
        # 5x5 = 25 image tokens: zero-padded to 26 at SP world 2 and to 28 at world 4
        batch, img_shapes = 1, [[(1, 5, 5)]]
    else:
        # zero_cond_t, batch 2: a 3x5 target and a 2x2 reference -> 19 tokens, padded to 20 at world 2 and 4
        batch, img_shapes = 2, [[(1, 3, 5), (1, 2, 2)]] * 2
    tokens = sum(math.prod(shape) for shape in img_shapes[0])
    target = math.prod(img_shapes[0][0])
    cond_mask = torch.ones(batch, 6, dtype=torch.bool)
    uncond_mask = cond_mask.clone()
    uncond_mask[:, -2:] = False  # a padded negative prompt
    return dict(
        latents=torch.randn(batch, tokens, 16, generator=generator),
        target=target,
        img_shapes=img_shapes,
        text={"cond": torch.randn(batch, 6, 32, generator=generator),
              "uncond": torch.randn(batch, 6, 32, generator=generator)},
        mask={"cond": cond_mask, "uncond": uncond_mask},
    )


def _sp_denoise(transformer, variant: str) -> tuple[list[torch.Tensor], dict]:
    r"""A true-CFG Euler loop at transformer level (what the pipelines do): skipping changes later inputs too."""
    problem = _sp_problem(variant)
    latents, target = problem["latents"].clone(), problem["target"]
    sigmas = torch.linspace(1.0, 0.0, SP_STEPS + 1)
    predictions = []
    for step in range(SP_STEPS):
        outputs = {}
        for branch in ("cond", "uncond"):
            with torch.no_grad(), transformer.cache_context(branch, step_index=step, num_inference_steps=SP_STEPS):
                outputs[branch] = transformer(
                    hidden_states=latents,
                    encoder_hidden_states=problem["text"][branch],
                    encoder_hidden_states_mask=problem["mask"][branch],
                    timestep=sigmas[step].expand(latents.shape[0]),
                    img_shapes=problem["img_shapes"],
                    return_dict=False,
                )[0]
        prediction = outputs["uncond"] + SP_CFG_SCALE * (outputs["cond"] - outputs["uncond"])
        predictions.append(prediction)
        # only the target tokens are denoised; reference tokens (zero_cond_t) stay the clean condition
        latents = latents.clone()
        latents[:, :target] += (sigmas[step + 1] - sigmas[step]) * prediction[:, :target]
    transformer._reset_stateful_cache()  # as a pipeline does at its end; the stats are kept
    return predictions, teacache_stats(transformer)


def _sp_transformer(variant: str) -> QwenImageSPTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageSPTransformer2DModel(**tiny_transformer_config(variant)).eval()


def _sp_case_id(variant: str, ulysses: int, ring: int, cfg: int) -> str:
    return f"{variant}-u{ulysses}r{ring}" + ("cfg2" if cfg > 1 else "")


def _hook_order(module: torch.nn.Module) -> list[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry._hook_order) if registry is not None else []


def _sp_teacache_worker(rank: int, world_size: int, cases: list[tuple[int, int, int]]) -> dict:
    """Case id -> this rank's numbers: `{variant}-reference` the single-process run, `{variant}-u{u}r{r}[cfg2]` an SP
    run with where its hooks sat."""
    from diffusers_qwen_sp.hooks.cfg_parallel import apply_cfg_parallel, get_cfg_parallel_hook
    from diffusers_qwen_sp.hooks.sequence_parallel import SequenceParallelConfig, apply_sequence_parallel

    results = {}
    for variant in SP_VARIANTS:
        # The single-process reference, on every rank (no collective involved).
        transformer = _sp_transformer(variant)
        apply_teacache(transformer, TeaCacheConfig(threshold=SP_THRESHOLD))
        predictions, stats = _sp_denoise(transformer, variant)
        results[f"{variant}-reference"] = {"predictions": predictions, "stats": stats}
        for index, (ulysses, ring, cfg) in enumerate(cases):
            transformer = _sp_transformer(variant)
            config = SequenceParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg)
            # Both orders of application must work: SP hooks sit on submodules, CFG parallel stays outermost.
            if index % 2:
                apply_teacache(transformer, TeaCacheConfig(threshold=SP_THRESHOLD))
                runtime = apply_sequence_parallel(transformer, config)
                if cfg > 1:
                    apply_cfg_parallel(transformer, runtime.groups)
            else:
                runtime = apply_sequence_parallel(transformer, config)
                if cfg > 1:
                    apply_cfg_parallel(transformer, runtime.groups)
                apply_teacache(transformer, TeaCacheConfig(threshold=SP_THRESHOLD))
            if cfg > 1:
                get_cfg_parallel_hook(transformer).true_cfg = True  # a hand-written loop with both branches
            result = results[_sp_case_id(variant, ulysses, ring, cfg)] = {
                "root_hook_order": _hook_order(transformer),
                "blocks_stage_hook_order": _hook_order(transformer.blocks_stage),
            }
            result["predictions"], result["stats"] = _sp_denoise(transformer, variant)
            remove_teacache(transformer)
            result["removed"] = get_teacache_hook(transformer) is None
    return results


# world size -> (ulysses, ring, cfg) per case; all cases of one world size run in one spawn.
SP_MESHES = {2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)], 4: [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2)]}
# world size -> case id -> (variant, mesh)
SP_CASES = {
    world: {_sp_case_id(variant, *mesh): (variant, mesh) for variant in SP_VARIANTS for mesh in meshes}
    for world, meshes in SP_MESHES.items()
}

# A rank deciding differently from the others would hang in a collective: the timeout turns that into a failure.
sp_teacache = spawn_fixture(
    _sp_teacache_worker,
    Spawn(2, args=(SP_MESHES[2],), timeout=120),
    Spawn(4, args=(SP_MESHES[4],), timeout=120),
)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, variant", world_cases({world: SP_VARIANTS for world in SP_MESHES}))
def test_sequence_parallel_teacache_reference(sp_teacache, world_size, variant):
    reference_stats = sp_teacache[world_size].case(f"{variant}-reference")[0]["stats"]
    coefficients = np.array(QWEN_IMAGE_TEACACHE_COEFFICIENTS)
    for branch in ("cond", "uncond"):
        # the reference skips some steps, and no accumulation is within 1e-3 of the threshold (no rounding flip)
        assert reference_stats[branch]["skipped"], (variant, reference_stats)
        accumulated = 0.0
        for step, rel in sorted(reference_stats[branch]["rel_l1"].items()):
            accumulated += abs(np.polyval(coefficients, rel))
            assert abs(accumulated - SP_THRESHOLD) > 1e-3, (variant, branch, step, accumulated)
            if step in reference_stats[branch]["computed"]:
                accumulated = 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases(SP_CASES))
def test_sequence_parallel_teacache(sp_teacache, world_size, case):
    from diffusers_qwen_sp.hooks.cfg_parallel import CFG_PARALLEL_HOOK

    variant, (ulysses, ring, cfg) = SP_CASES[world_size][case]
    reference = sp_teacache[world_size].case(f"{variant}-reference")[0]
    reference_stats = reference["stats"]
    for rank, result in enumerate(sp_teacache[world_size].case(case)):
        predictions, stats = result["predictions"], result["stats"]
        where = f"{variant}, (ulysses, ring, cfg) = {(ulysses, ring, cfg)}, rank {rank}"
        # SP hooks sit on submodules, CFG parallel on the root, TeaCache on the blocks stage, whatever the order
        assert result["root_hook_order"] == ([CFG_PARALLEL_HOOK] if cfg > 1 else []), where
        assert result["blocks_stage_hook_order"] == [TEACACHE_HOOK], where
        assert result["removed"], f"{where}: get_teacache_hook after remove_teacache is not None"
        # with CFG parallel a rank only ever runs its own branch: CFG rank 0 cond, CFG rank 1 uncond
        branches = ("cond", "uncond") if cfg == 1 else (("cond", "uncond")[rank // (ulysses * ring)],)
        assert set(stats) == set(branches), where
        for branch in branches:
            assert stats[branch]["computed"] == reference_stats[branch]["computed"], where
            assert stats[branch]["skipped"] == reference_stats[branch]["skipped"], where
            # the same numbers, not only the same decisions: SP padding in the sums would shift them by ~1%
            assert stats[branch]["rel_l1"] == pytest.approx(reference_stats[branch]["rel_l1"], rel=1e-4), where
        assert len(predictions) == len(reference["predictions"]) == SP_STEPS, where
        for step, (got, expected) in enumerate(zip(predictions, reference["predictions"])):
            difference = (got - expected).abs().max().item()
            assert difference <= SP_TOL, f"{where}, step {step}: max |diff| {difference}"

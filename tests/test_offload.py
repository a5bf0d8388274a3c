"""Offloading (diffusers group offloading, accelerate model CPU offload) under sequence and CFG parallelism.

On CPU the offload hooks run with the CPU as their "accelerator" (group offloading with `onload_device=cpu`,
`enable_model_cpu_offload(device="cpu")`): nothing moves, but every hook is in the forward, so these tests check that
the offload hooks and our SP / CFG-parallel hooks coexist without changing the output. Each case calls the pipeline
twice (max abs diff <= 1e-4 against the stock single-process pipeline, images in [0, 1]), checks from block 0's
inputs that the sequence really is sharded and CFG parallel really runs one branch per rank on both calls, then
disables SP and checks that the offload hooks are still there and the output is the stock one again. Both orders:
offloading enabled before `enable_sequence_parallel` and after it.

The choice of device (each rank offloads to its own GPU, not diffusers' default GPU 0) cannot run without CUDA: those
tests mock `torch.cuda.current_device` (and diffusers' accelerator detection) and only inspect where the hooks
would onload; no CUDA kernel runs. `enable_sequential_cpu_offload` is refused under parallelism: that is tested both
ways round. (It cannot run on a CPU-only machine even without SP: accelerate 1.15 fails to move a weight back to the
meta device when the execution device is the CPU.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from accelerate.hooks import CpuOffload
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, GroupOffloadingHook, _get_group_onload_device

from diffusers_qwen_sp.hooks.cfg_parallel import CFG_PARALLEL_HOOK
from diffusers_qwen_sp.testing import (
    build_tiny_components,
    build_tiny_pipeline,
    sp_pipeline_class,
    tiny_pipeline_call_kwargs,
)

from _spawn import Spawn, spawn_fixture, world_cases


TOLERANCE = 1e-4
CALL = dict(height=40, width=56)  # 5 x 7 = 35 image tokens (odd: a padding slot on rank 1), true CFG on
IMAGE_TOKENS = 35
STEPS = 2
OFFLOADS = ("group_block_level", "group_leaf_level", "model_cpu_offload")
ORDERS = ("offload_first", "sp_first")
MODES = {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2), "cfg2": (2, 1, 1)}  # (cfg, ulysses, ring) on 2 ranks
PARITY_CASES = [f"{offload}-{order}-{mode}" for offload in OFFLOADS for order in ORDERS for mode in MODES]
DEVICE_CASES = ("model_offload_then_sp", "sp_then_model_offload")
REFUSAL_CASES = ("sequential_then_sp", "sp_then_sequential", "model_offload_gpu_id_of_another_rank")


def _enable_offload(pipe, offload: str) -> None:
    if offload == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        offload_type = offload.removeprefix("group_")
        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type=offload_type, **kwargs)


def _offload_hooks_present(pipe, offload: str) -> bool:
    if offload == "model_cpu_offload":
        return isinstance(getattr(pipe.transformer, "_hf_hook", None), CpuOffload)
    return _get_group_onload_device(pipe.transformer) == torch.device("cpu")


def _images(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**tiny_pipeline_call_kwargs("qwen_image", **CALL)).images


@contextlib.contextmanager
def _count_offload_hook_runs(calls: list[str]) -> Iterator[None]:
    # Whether the offload hooks are still in the forward, not only attached: accelerate calls the hook it holds at call
    # time, diffusers' registry binds `pre_forward` when the hook is registered (so patch before enabling offload).
    def counting(original):
        def pre_forward(hook, module, *args, **kwargs):
            if isinstance(hook, GroupOffloadingHook) or type(module).__name__ == "QwenImageSPTransformer2DModel":
                calls.append(type(hook).__name__)
            return original(hook, module, *args, **kwargs)

        return pre_forward

    with mock.patch.object(CpuOffload, "pre_forward", counting(CpuOffload.pre_forward)):
        with mock.patch.object(GroupOffloadingHook, "pre_forward", counting(GroupOffloadingHook.pre_forward)):
            yield


def _parity_case(offload: str, order: str, mode: str, expected: torch.Tensor) -> dict:
    hook_runs = []
    with _count_offload_hook_runs(hook_runs):
        return _parity_case_counted(offload, order, mode, expected, hook_runs)


def _parity_case_counted(offload: str, order: str, mode: str, expected: torch.Tensor, hook_runs: list[str]) -> dict:
    cfg, ulysses, ring = MODES[mode]
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    tokens_seen = []  # block 0's image tokens, one entry per transformer call (a torch hook: no forward rewiring)
    block = pipe.transformer.transformer_blocks[0]
    block.register_forward_pre_hook(lambda module, args: tokens_seen.append(args[0].shape[1]))
    if order == "offload_first":
        _enable_offload(pipe, offload)
    pipe.enable_sequence_parallel(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring)
    if order == "sp_first":
        _enable_offload(pipe, offload)
    result = {"diffs": [], "tokens_seen": [], "hooks_present": [], "offload_hook_runs": []}
    for _ in range(2):
        tokens_seen.clear()
        hook_runs.clear()
        result["diffs"].append((_images(pipe) - expected).abs().max().item())
        result["tokens_seen"].append(list(tokens_seen))
        result["hooks_present"].append(_offload_hooks_present(pipe, offload))
        result["offload_hook_runs"].append(len(hook_runs))
    result["root_hooks"] = list(pipe.transformer._diffusers_hook.hooks)
    result["text_encoder_dropped"] = pipe.text_encoder is None  # the default placement "one_rank" on rank 1
    pipe.disable_sequence_parallel()
    if pipe.text_encoder is None:  # a rank that dropped its encoder gets one back to run alone (as the error says)
        pipe.text_encoder = build_tiny_pipeline("qwen_image").text_encoder
    tokens_seen.clear()
    hook_runs.clear()
    result["diff_after_disable"] = (_images(pipe) - expected).abs().max().item()
    result["tokens_after_disable"] = list(tokens_seen)
    result["hooks_after_disable"] = _offload_hooks_present(pipe, offload)
    result["offload_hook_runs_after_disable"] = len(hook_runs)
    return result


def _mocked_cuda(current_device: int) -> contextlib.ExitStack:
    # Where diffusers would onload on CUDA, on a machine without one: accelerator detection and the current device.
    stack = contextlib.ExitStack()
    for target in ("diffusers_qwen_sp.pipelines.offload.get_device", "diffusers.pipelines.pipeline_utils.get_device"):
        stack.enter_context(mock.patch(target, return_value="cuda"))
    stack.enter_context(mock.patch("torch.cuda.current_device", return_value=current_device))
    return stack


def _device_case(case: str, rank: int) -> dict:
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    if case == "model_offload_then_sp":
        with _mocked_cuda(current_device=0):  # as before torchrun's LOCAL_RANK was applied: every rank on GPU 0
            pipe.enable_model_cpu_offload()
        chosen_before = str(pipe._offload_device)
        with _mocked_cuda(current_device=rank):  # enable_sequence_parallel set this rank's device
            pipe.enable_sequence_parallel(cfg_degree=2)
    else:
        pipe.enable_sequence_parallel(cfg_degree=2)
        chosen_before = None
        with _mocked_cuda(current_device=rank):
            pipe.enable_model_cpu_offload()
    result = {
        "chosen_before": chosen_before,
        "offload_device": str(pipe._offload_device),
        "transformer_execution_device": str(pipe.transformer._hf_hook.execution_device),
        "vae_execution_device": str(pipe.vae._hf_hook.execution_device),  # rank 1 holds no text encoder
        # accelerate's hook wraps the CFG-parallel hook: the forward it restores after each call is the registry's
        "accelerate_wraps_cfg_hook": list(pipe.transformer._diffusers_hook.hooks) == [CFG_PARALLEL_HOOK]
        and "create_new_forward" in getattr(getattr(pipe.transformer._old_forward, "func", None), "__qualname__", ""),
    }
    pipe.remove_all_hooks()
    pipe.disable_sequence_parallel()
    return result


def _refusal_case(case: str, rank: int) -> str | None:
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    try:
        if case == "sequential_then_sp":
            pipe.enable_sequential_cpu_offload(device="cpu")
            pipe.enable_sequence_parallel(ulysses_degree=2)
        elif case == "sp_then_sequential":
            pipe.enable_sequence_parallel(ulysses_degree=2)
            pipe.enable_sequential_cpu_offload(device="cpu")
        else:
            pipe.enable_sequence_parallel(ulysses_degree=2)
            with _mocked_cuda(current_device=rank):
                pipe.enable_model_cpu_offload(gpu_id=1 - rank)
    except ValueError as error:
        return str(error)
    finally:
        pipe.remove_all_hooks()
        if pipe.sequence_parallel_enabled:
            pipe.disable_sequence_parallel()
    return None


def _offload_worker(rank: int, world_size: int) -> dict:
    expected = _images(build_tiny_pipeline("qwen_image"))  # the stock pipeline, one process, no offloading
    results = {}
    for case in PARITY_CASES:
        offload, order, mode = case.split("-")
        results[case] = _parity_case(offload, order, mode, expected)
    for case in DEVICE_CASES:
        results[case] = _device_case(case, rank)
    for case in REFUSAL_CASES:
        results[case] = _refusal_case(case, rank)
    # Group offloading onto a device index other than this rank's: refused on the ranks it is wrong for.
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    pipe.transformer.enable_group_offload(torch.device("cuda", 0), offload_type="leaf_level")  # offloads to CPU now
    try:
        with _mocked_cuda(current_device=rank):
            pipe.enable_sequence_parallel(ulysses_degree=2)
        results["group_offload_onto_gpu_0"] = None
    except ValueError as error:
        results["group_offload_onto_gpu_0"] = str(error)
    results["group_offload_onto_gpu_0_sp_left_enabled"] = pipe.sequence_parallel_enabled
    return results


spawned = spawn_fixture(_offload_worker, Spawn(2, timeout=200.0))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(260)
@pytest.mark.parametrize("world_size, case", world_cases({2: PARITY_CASES}))
def test_offload_under_sp_matches_stock_single_process(spawned, world_size, case):
    offload, order, mode = case.split("-")
    cfg, ulysses, ring = MODES[mode]
    # Per transformer call, block 0 sees this rank's shard (ceil(35 / 2) = 18 tokens) under SP; under CFG parallel
    # each rank computes one branch: one call per step instead of two, on BOTH calls (the second call is the one
    # that lost CFG parallel when accelerate re-added its hook outside of ours).
    shard = -(-IMAGE_TOKENS // (ulysses * ring))
    expected_tokens = [shard] * (STEPS if cfg == 2 else 2 * STEPS)
    for rank, result in enumerate(spawned[world_size].case(case)):
        assert all(diff <= TOLERANCE for diff in result["diffs"]), f"rank {rank}: {result}"
        assert result["tokens_seen"] == [expected_tokens] * 2, f"rank {rank}: {result}"
        assert all(result["hooks_present"]), f"rank {rank}: offload hooks gone: {result}"
        # the default text-encoder placement composes with offloading: only the leader keeps the encoder
        assert result["text_encoder_dropped"] == (rank != 0), f"rank {rank}: {result}"
        # accelerate's hook is outermost: it runs on every transformer call, the skipped CFG branch's included
        transformer_calls = 2 * STEPS
        if offload == "model_cpu_offload":
            assert result["offload_hook_runs"] == [transformer_calls] * 2, f"rank {rank}: {result}"
        else:
            assert all(runs > 0 for runs in result["offload_hook_runs"]), f"rank {rank}: {result}"
        if offload == "group_block_level" and cfg == 2:  # both on the root (leaf level has no root group)
            assert set(result["root_hooks"]) == {_GROUP_OFFLOADING, CFG_PARALLEL_HOOK}, f"rank {rank}: {result}"
        # disable_sequence_parallel leaves the offloading and the stock output
        assert result["diff_after_disable"] <= TOLERANCE, f"rank {rank}: {result}"
        assert result["tokens_after_disable"] == [IMAGE_TOKENS] * (2 * STEPS), f"rank {rank}: {result}"
        assert result["hooks_after_disable"], f"rank {rank}: {result}"
        if offload == "model_cpu_offload":
            assert result["offload_hook_runs_after_disable"] == transformer_calls, f"rank {rank}: {result}"
        else:
            assert result["offload_hook_runs_after_disable"] > 0, f"rank {rank}: {result}"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases({2: DEVICE_CASES}))
def test_model_offload_onloads_to_this_ranks_gpu(spawned, world_size, case):
    for rank, result in enumerate(spawned[world_size].case(case)):
        if case == "model_offload_then_sp":
            assert result["chosen_before"] == "cuda:0", result  # before SP: every rank's current device was 0
        # diffusers' default would be cuda:0 on every rank
        assert result["offload_device"] == f"cuda:{rank}", f"rank {rank}: {result}"
        assert result["transformer_execution_device"] == f"cuda:{rank}", f"rank {rank}: {result}"
        assert result["vae_execution_device"] == f"cuda:{rank}", f"rank {rank}: {result}"
        assert result["accelerate_wraps_cfg_hook"], f"rank {rank}: {result}"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases({2: REFUSAL_CASES}))
def test_unsupported_offloading_is_refused(spawned, world_size, case):
    for rank, message in enumerate(spawned[world_size].case(case)):
        assert message is not None, f"rank {rank}: {case} was accepted"
        if case == "model_offload_gpu_id_of_another_rank":
            assert f"got gpu_id/device index {1 - rank}" in message and f"computes on cuda:{rank}" in message, message
            assert "Leave gpu_id and the device index out" in message, message
        else:
            assert message.startswith("enable_sequential_cpu_offload"), message
            assert "offload_type='leaf_level'" in message, message


@pytest.mark.distributed
def test_group_offload_onto_another_ranks_gpu_is_refused(spawned):
    # Right for rank 0 (it computes on cuda:0), wrong for rank 1: both raise rank 1's error, so that rank 0 never
    # goes on alone into a collective that rank 1 does not join.
    messages = spawned[2].case("group_offload_onto_gpu_0")
    assert messages[0] == messages[1], messages
    assert "Group offloading of `transformer` onloads to cuda:0" in messages[1], messages
    assert "rank 1 computes on cuda:1" in messages[1] and "onload_device=torch.device('cuda')" in messages[1], messages
    left_enabled = spawned[2].case("group_offload_onto_gpu_0_sp_left_enabled")
    assert left_enabled == [False, False], left_enabled  # both rolled SP back


# ---------------------------------------------------------------------------------------------------------------------
# Single process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["group_offloading", "model_cpu_offload_hook"])
def test_stock_transformer_with_offload_hooks_is_refused(offload):
    components = build_tiny_components("qwen_image")
    transformer = components["transformer"]
    if offload == "group_offloading":
        transformer.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
        expected = "'group_offloading' on"
    else:
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(transformer, "cpu")
        expected = "accelerate CpuOffload on the root"
    with pytest.raises(ValueError, match="would silently drop") as error:
        sp_pipeline_class("qwen_image")(**components)
    assert expected in str(error.value)


def test_model_offload_keeps_diffusers_default_in_one_process():
    # Without torch.distributed there is no rank: diffusers' own default (GPU 0), even if another device is current.
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    with _mocked_cuda(current_device=1):
        pipe.enable_model_cpu_offload()
    assert str(pipe._offload_device) == "cuda:0"
    pipe.remove_all_hooks()


def test_teacache_with_leaf_offloading_equals_teacache_and_block_offloading_is_refused():
    # TeaCache reads block 0's modulation before running the blocks: leaf-level offloading loads those weights when
    # they are called, block-level offloading only inside the block's forward, so that one is refused with the fix.
    def cached(offload: str | None) -> tuple[torch.Tensor, dict]:
        pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
        if offload is not None:
            _enable_offload(pipe, offload)
        pipe.enable_teacache(threshold=0.15)
        with torch.no_grad():
            images = pipe(**tiny_pipeline_call_kwargs("qwen_image", **CALL, num_inference_steps=6)).images
        return images, pipe.teacache_stats()

    expected, expected_stats = cached(None)
    assert expected_stats["cond"]["skipped"], "TeaCache skipped nothing: the comparison would be vacuous"
    for _ in range(2):
        images, stats = cached("group_leaf_level")
        assert (images - expected).abs().max().item() <= TOLERANCE and stats == expected_stats
    with pytest.raises(RuntimeError, match="offload_type='leaf_level'"):
        cached("group_block_level")

"""Sharded transformer weights (FSDP2) under Ulysses, Ring, both and CFG parallel, with TeaCache and LoRA.

Every parity check is fp32, max abs diff <= 1e-4 on images in [0, 1], and calls the pipeline twice (a stale
all-gather or a parameter left unsharded would show on the second call). The references are computed here, in the
pytest process: the stock diffusers pipeline (with the same LoRA for the LoRA cases), or, with TeaCache, our pipeline
on one process with the same TeaCache config (stock diffusers has no TeaCache). The spawned ranks return their images,
TeaCache statistics, how many all-gathers they ran and how many parameter bytes they hold; the tests compare.

All cases of one world size run in one spawn (tests/_spawn.py), each reported as its own test, e.g.
`test_matches_single_process[world4-cfg2ulysses2-teacache]`.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_qwen_sp import QwenImageSPPipeline, SequenceParallelConfig
from diffusers_qwen_sp.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs
from diffusers_qwen_sp.weight_sharding import (
    WeightShardingConfig,
    get_weight_sharding,
    parameter_bytes,
    remove_weight_sharding,
)

from _spawn import Spawn, spawn_fixture, world_cases


pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402


TOLERANCE = 1e-4
CALLS = 2
# 5 x 7 = 35 image tokens: padded under every SP degree here. 6 steps at 0.15: TeaCache skips steps 1 and 3.
CALL = dict(height=40, width=56, num_inference_steps=6)
TEACACHE = dict(threshold=0.15)
LORA_SEED = 7
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "img_mlp.net.2", "txt_mod.1",
                "img_mod.1", "img_in", "proj_out"]

# world -> mode -> (cfg, ulysses, ring)
MODES = {
    2: {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2)},
    4: {"ulysses2ring2": (1, 2, 2), "cfg2ulysses2": (2, 2, 1)},
}
KINDS = ("plain", "teacache", "lora")
# Beyond the parity grid: a LoRA added after sharding (world 2, Ulysses), the refusal of world-wide sharding with
# TeaCache under true-CFG parallel and the pipeline still working after it (world 4).
EXTRA = {2: ["ulysses2-lora-after", "ulysses2-disable-refused", "ulysses2-enable-refused"],
         4: ["cfg2ulysses2-teacache-world-refused"]}
CASES = {world: [f"{mode}-{kind}" for mode in modes for kind in KINDS] + EXTRA[world] for world, modes in MODES.items()}


def _lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)


def _add_lora(transformer):
    # init_lora_weights=False: A and B both random (kaiming), from this seed, in module order: the same on every rank
    # and for the stock model, whose modules come in the same order.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_SEED)
        transformer.add_adapter(_lora_config())


def _call(pipe):
    with torch.no_grad():
        return pipe(**tiny_pipeline_call_kwargs("qwen_image", **CALL)).images


class _CountingAllGather:
    """Counts the blocks' all-gathers around the all-gather weight sharding installed (test instrumentation)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def allocate(self, *args, **kwargs):
        return self.inner.allocate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _count_all_gathers(pipe):
    counter = _CountingAllGather(get_weight_sharding(pipe.transformer).all_gather)
    for block in pipe.transformer.transformer_blocks:
        block.set_custom_all_gather(counter)
    return counter


def _sharding_facts(pipe):
    """This rank's parameter bytes of the blocks, and which block parameters stayed whole."""
    from torch.distributed.tensor import DTensor

    size = len(get_weight_sharding(pipe.transformer).ranks)
    blocks = pipe.transformer.transformer_blocks
    sharded_local = sharded_whole = largest_shards = 0
    whole_names = []
    for name, parameter in blocks.named_parameters():
        if isinstance(parameter, DTensor):
            row_bytes = parameter.numel() // parameter.shape[0] * parameter.element_size()
            sharded_local += parameter.to_local().numel() * parameter.element_size()
            sharded_whole += parameter.numel() * parameter.element_size()
            largest_shards += -(-parameter.shape[0] // size) * row_bytes  # dim 0 in chunks of ceil(rows / size)
        else:
            whole_names.append(name)
    local, whole = parameter_bytes(blocks)
    return {
        "shard_size": size,
        "sharded_local": sharded_local,
        "sharded_whole": sharded_whole,
        "largest_shards": largest_shards,
        "local": local,
        "whole": whole,
        "block": parameter_bytes(blocks[1])[1],
        "whole_names": whole_names,
    }


def _enable(pipe, mode, shard_weights=True):
    cfg, ulysses, ring = MODES[2].get(mode) or MODES[4][mode]
    pipe.enable_sequence_parallel(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring, shard_weights=shard_weights)
    pipe.to("cpu")  # as the README's flow does after enabling: `to` on FSDP2 modules keeps the shards


def _run_mode(rank, world_size, mode):
    from diffusers_qwen_sp.hooks.cfg_parallel import get_cfg_parallel_hook

    results = {}
    cfg = (MODES[2].get(mode) or MODES[4][mode])[0]
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    _enable(pipe, mode)
    results[f"{mode}-plain"] = {"images": [_call(pipe) for _ in range(CALLS)], "facts": _sharding_facts(pipe)}

    if cfg > 1:
        # World-wide sharding with TeaCache under true-CFG parallel: refused at the first call, on every rank; the
        # pipeline works again once TeaCache is off.
        pipe.enable_teacache(**TEACACHE)
        try:
            _call(pipe)
            error = "no error was raised"
        except RuntimeError as caught:
            error = str(caught)
        pipe.disable_teacache()
        results[f"{mode}-teacache-world-refused"] = {"error": error, "images": [_call(pipe) for _ in range(CALLS)]}
        pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
        _enable(pipe, mode, shard_weights="sp")
    counter = _count_all_gathers(pipe)
    pipe.enable_teacache(**TEACACHE)
    images, stats, all_gathers = [], [], []
    for _ in range(CALLS):
        before = counter.calls
        images.append(_call(pipe))
        all_gathers.append(counter.calls - before)
        stats.append(pipe.teacache_stats())
    cfg_hook = get_cfg_parallel_hook(pipe.transformer)
    results[f"{mode}-teacache"] = {
        "images": images,
        "stats": stats,
        "all_gathers": all_gathers,
        # the branches this rank computes: both, or its own under CFG parallel
        "branches": ["cond", "uncond"] if cfg_hook is None else [("cond", "uncond")[cfg_hook.groups.cfg_rank]],
        "layers": len(pipe.transformer.transformer_blocks),
        "facts": _sharding_facts(pipe),
    }
    pipe.disable_teacache()

    if mode == "ulysses2":
        # LoRA added after sharding: its layers wrap the sharded linears and stay whole on every rank.
        _add_lora(pipe.transformer)
        results[f"{mode}-lora-after"] = {"images": [_call(pipe) for _ in range(CALLS)]}
        pipe.transformer.delete_adapters("default")
        try:
            pipe.disable_sequence_parallel()
            error = "no error was raised"
        except RuntimeError as caught:
            error = str(caught)
        results[f"{mode}-disable-refused"] = {
            "error": error,
            "still_parallel": pipe.sequence_parallel_enabled and get_weight_sharding(pipe.transformer) is not None,
            "images": [_call(pipe)],
        }

        # An offloaded transformer refuses sharding: refused on every rank before the text encoder is sharded (which cannot
        # be undone), so nothing stays applied, and without the offloading the same call enables.
        pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
        pipe.enable_model_cpu_offload(device="cpu")
        try:
            pipe.enable_sequence_parallel(ulysses_degree=2, shard_weights=True, text_encoder="sharded")
            error = "no error was raised"
        except ValueError as caught:
            error = str(caught)
        left = [pipe.sequence_parallel_enabled, pipe.text_encoder_placement, pipe.parallel_vae_enabled]
        pipe.remove_all_hooks()
        pipe.enable_sequence_parallel(ulysses_degree=2, shard_weights=True, text_encoder="sharded")
        results[f"{mode}-enable-refused"] = {"error": error, "left": left, "images": [_call(pipe)]}

    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    _add_lora(pipe.transformer)  # before sharding: the LoRA layers inside the blocks are sharded with them
    _enable(pipe, mode)
    results[f"{mode}-lora"] = {"images": [_call(pipe) for _ in range(CALLS)], "facts": _sharding_facts(pipe)}
    return results


def _run_all(rank, world_size):
    results = {}
    for mode in MODES[world_size]:
        results.update(_run_mode(rank, world_size, mode))
    return results


# About 15 s (world 2) and 35 s (world 4) on 2 busy cores.
spawned = spawn_fixture(_run_all, Spawn(2, timeout=240), Spawn(4, timeout=300))


@pytest.fixture(scope="module")
def references():
    """kind -> (images, TeaCache stats or None): single process, same seeds."""
    from diffusers import QwenImagePipeline

    stock = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImagePipeline)
    plain = _call(stock)
    _add_lora(stock.transformer)
    lora = _call(stock)
    ours = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    ours.enable_teacache(**TEACACHE)
    teacache = _call(ours)
    return {"plain": (plain, None), "lora": (lora, None), "teacache": (teacache, ours.teacache_stats())}


def _skip_lists(stats):
    return {branch: (entry["computed"], entry["skipped"]) for branch, entry in stats.items()}


def _check_images(rank, images, expected):
    assert len(images) >= 1
    for call, image in enumerate(images):
        diff = (image - expected).abs().max().item()
        assert diff <= TOLERANCE, f"rank {rank} call {call}: max abs diff {diff}"


def _check_sharded(per_rank_facts, world_size):
    for rank, facts in enumerate(per_rank_facts):
        # Every block parameter is a shard but block 0's img_mod (the TeaCache indicator's modulation), kept whole.
        assert facts["whole_names"] and all(name.startswith("0.img_mod.") for name in facts["whole_names"]), facts
        size = facts["shard_size"]
        assert size in (world_size, world_size // 2), facts
        # this rank's chunk of each sharded parameter: ceil(rows / size) rows at most
        assert facts["sharded_local"] <= facts["largest_shards"] < facts["sharded_whole"] / size * 1.1, (rank, facts)
        # at most 1/size of the blocks plus one block
        assert facts["local"] <= facts["whole"] / size + facts["block"], (rank, facts)
    # the chunks of each shard group add up to the whole (world / size groups)
    total = sum(facts["sharded_local"] for facts in per_rank_facts)
    assert total == facts["sharded_whole"] * world_size // size, (total, per_rank_facts)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("world_size, case", world_cases(CASES))
def test_matches_single_process(spawned, references, world_size, case):
    per_rank = spawned[world_size].case(case)
    mode, kind = case.split("-", 1)
    cfg = (MODES[2].get(mode) or MODES[4][mode])[0]
    if kind in ("plain", "teacache", "lora"):
        expected, expected_stats = references[kind]
    elif kind == "lora-after":
        expected, expected_stats = references["lora"]
    else:
        expected, expected_stats = references["plain"]
    if "facts" in per_rank[0]:
        _check_sharded([result["facts"] for result in per_rank], world_size)
    for rank, result in enumerate(per_rank):
        assert len(result["images"]) == (1 if kind in ("disable-refused", "enable-refused") else CALLS)
        _check_images(rank, result["images"], expected)
        if kind == "teacache":
            expected_skips = _skip_lists(expected_stats)
            assert any(skipped for _, skipped in expected_skips.values()), f"TeaCache skipped nothing: {expected_skips}"
            for call, (stats, all_gathers) in enumerate(zip(result["stats"], result["all_gathers"])):
                assert _skip_lists(stats) == expected_skips, f"rank {rank} call {call}: {stats}"
                # one all-gather per block per computed step of this rank's branches; a skipped step none
                computed = sum(len(expected_skips[branch][0]) for branch in result["branches"])
                assert all_gathers == computed * result["layers"], (
                    f"rank {rank} call {call}: {all_gathers} all-gathers for {computed} computed steps"
                )
            assert result["facts"]["shard_size"] == (world_size // 2 if cfg > 1 else world_size)
        if kind == "teacache-world-refused":
            assert "shard_weights='sp'" in result["error"], f"rank {rank}: {result['error']}"
        if kind == "enable-refused":
            assert "does not compose with offloading" in result["error"], f"rank {rank}: {result['error']}"
            assert result["left"] == [False, None, False], f"rank {rank}: half applied: {result['left']}"
        if kind == "disable-refused":
            assert "cannot be removed" in result["error"], f"rank {rank}: {result['error']}"
            assert result["still_parallel"], f"rank {rank}: the failed disable changed the pipeline"


def test_config_validation():
    with pytest.raises(ValueError, match="group must be one of"):
        WeightShardingConfig(group="cfg")
    with pytest.raises(ValueError, match="shard_weights must be False, True, 'world'"):
        SequenceParallelConfig(shard_weights="everything")
    assert SequenceParallelConfig(shard_weights=True).weight_sharding_group == "world"
    assert SequenceParallelConfig(shard_weights="sp").weight_sharding_group == "sp"
    assert SequenceParallelConfig().weight_sharding_group is None


def test_unsharded_model_needs_no_removal_and_single_process_cli_refuses():
    from diffusers_qwen_sp.cli import main
    from diffusers_qwen_sp.testing import tiny_transformer_config
    from diffusers_qwen_sp import QwenImageSPTransformer2DModel

    remove_weight_sharding(QwenImageSPTransformer2DModel(**tiny_transformer_config()))  # a no-op
    assert main(["generate", "--shard-weights", "--prompt", "a red circle on a white background"]) == 2

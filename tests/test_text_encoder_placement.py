"""Text-encoder placement under parallelism (one rank / replicated / sharded) and the batched prompt+negative encoding.

Every image is compared with the stock diffusers pipeline in this process (fp32, max abs diff <= 1e-6 for the batched
encoding in one process, <= 1e-4 under parallelism as the other parallel tests), every case calling the pipeline
twice. The encoder forwards are counted with a forward hook on the text encoder's language model (the compute; the
batching's bookkeeping calls of the root return before it). One spawn of 2 ranks (Ulysses 2, and CFG 2) runs every
distributed case, each reported as its own test.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from diffusers_qwen_sp.testing import (
    build_tiny_pipeline,
    small_reference_images,
    sp_pipeline_class,
    stock_pipeline_class,
    tiny_pipeline_call_kwargs,
)
from diffusers_qwen_sp.text_encoder_placement import (
    TEXT_ENCODER_PLACEMENTS,
    TextEncoderPlacementConfig,
    loads_text_encoder,
)
from diffusers_qwen_sp.weight_sharding import parameter_bytes

from _spawn import Spawn, spawn_fixture, world_cases


CALLS = 2
PARALLEL_TOLERANCE = 1e-4
# The batched forward pads the shorter prompt: its attention sums over more (masked) keys, so its embeddings may
# differ from the stock ones by fp32 rounding (measured: 0 for text-only prompts, 4.8e-7 with images).
BATCHED_TOLERANCE = 1e-6
MODES = {"ulysses2": dict(ulysses_degree=2), "cfg2": dict(cfg_degree=2, ulysses_degree=1)}
PLACEMENT_CASES = {"ulysses2": TEXT_ENCODER_PLACEMENTS, "cfg2": ("one_rank", "sharded")}
VARIANT_CASES = {"ulysses2-edit_plus-one_rank": "qwen_image_edit_plus", "ulysses2-layered-one_rank": "qwen_image_layered"}
CASES = {
    2: [f"{mode}-{placement}" for mode, placements in PLACEMENT_CASES.items() for placement in placements]
    + ["ulysses2-loaded-without-encoder", *VARIANT_CASES, "ulysses2-refusals"]
}


def _images(pipe, variant: str = "qwen_image"):
    with small_reference_images(), torch.no_grad():
        images = pipe(**tiny_pipeline_call_kwargs(variant)).images
    return torch.stack(images) if isinstance(images, list) else images


class _ForwardCounter:
    def __init__(self, pipe) -> None:
        self.count = 0
        if pipe.text_encoder is not None:
            pipe.text_encoder.model.language_model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


def _encoder_facts(pipe) -> dict:
    """This rank's text-encoder parameter bytes: all, of the decoder layers (local shard / whole), the rest."""
    if pipe.text_encoder is None:
        return {"held": 0, "layers_local": 0, "layers_whole": 0, "rest": 0}
    layers = pipe.text_encoder.model.language_model.layers
    held, whole = parameter_bytes(pipe.text_encoder)
    layers_local, layers_whole = parameter_bytes(layers)
    return {"held": held, "whole": whole, "layers_local": layers_local, "layers_whole": layers_whole,
            "rest": held - layers_local}


def _run(pipe, variant: str = "qwen_image") -> dict:
    counter = _ForwardCounter(pipe)
    images, forwards = [], []
    for _ in range(CALLS):
        before = counter.count
        images.append(_images(pipe, variant))
        forwards.append(counter.count - before)
    return {"images": images, "forwards": forwards, "facts": _encoder_facts(pipe)}


def _parallel_pipe(mode: str, placement: str, variant: str = "qwen_image", pipe=None):
    # The placement is a field of the SP config, applied by enable_sequence_parallel ("one_rank" by default).
    if pipe is None:
        pipe = build_tiny_pipeline(variant, pipeline_cls=sp_pipeline_class(variant))
    pipe.enable_sequence_parallel(**MODES[mode], text_encoder=placement)
    return pipe


def _error(function) -> str:
    try:
        function()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error was raised"


def _worker(rank: int, world_size: int) -> dict:
    from diffusers_qwen_sp import QwenImageSPPipeline

    # Refused alike on every rank, each on a pipeline that then runs a case (and must still work).
    results, refusals = {}, {}
    for mode, placements in PLACEMENT_CASES.items():
        for placement in placements:
            pipe = _parallel_pipe(mode, placement)
            if (mode, placement) == ("ulysses2", "one_rank"):
                refusals["one_rank_to_replicated"] = _error(lambda: pipe.set_text_encoder_placement("replicated"))
            if (mode, placement) == ("ulysses2", "sharded"):
                refusals["sharded_changed"] = _error(lambda: pipe.set_text_encoder_placement("one_rank"))
            results[f"{mode}-{placement}"] = {**_run(pipe), "placement": pipe.text_encoder_placement}

    # Rank 1 loads the saved pipeline without its text encoder: it never materialises one.
    holder = [tempfile.mkdtemp(prefix="tiny-qwen-image-") if rank == 0 else None]
    if rank == 0:
        build_tiny_pipeline("qwen_image").save_pretrained(holder[0])
    dist.broadcast_object_list(holder, src=0)
    dist.barrier()
    loaded = QwenImageSPPipeline.from_pretrained(holder[0], **({"text_encoder": None} if rank else {}))
    loaded.set_progress_bar_config(disable=True)
    # All or nothing: the refused placement leaves the pipeline unparallelised, and it can be enabled again.
    refusals["replicated_without_encoder"] = _error(
        lambda: loaded.enable_sequence_parallel(**MODES["ulysses2"], text_encoder="replicated")
    )
    refusals["left_unparallelised"] = str(loaded.sequence_parallel_enabled)
    results["ulysses2-loaded-without-encoder"] = _run(_parallel_pipe("ulysses2", "one_rank", pipe=loaded))
    results["ulysses2-refusals"] = {"errors": refusals}

    for case, variant in VARIANT_CASES.items():
        results[case] = _run(_parallel_pipe("ulysses2", "one_rank", variant), variant)
    return results


# About 15 s on 2 busy cores.
spawned = spawn_fixture(_worker, Spawn(2, timeout=240))


@pytest.fixture(scope="module")
def stock_runs():
    """variant -> (the stock pipeline's image, its text-encoder forwards): single process, same seeds, one thread as
    the tests (a module fixture is set up before conftest's per-test thread setting)."""
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for variant in ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "qwen_image_layered"):
            stock = build_tiny_pipeline(variant, pipeline_cls=stock_pipeline_class(variant))
            counter = _ForwardCounter(stock)
            runs[variant] = (_images(stock, variant), counter.count)
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size, case", world_cases(CASES))
def test_placement_matches_stock(spawned, stock_runs, world_size, case):
    per_rank = spawned[world_size].case(case)
    mode, rest = case.split("-", 1)
    placement = rest.rsplit("-", 1)[-1] if rest not in ("loaded-without-encoder", "refusals") else rest
    if placement == "refusals":
        for rank, result in enumerate(per_rank):
            errors = result["errors"]
            assert "from 'one_rank' to 'replicated'" in errors["one_rank_to_replicated"], (rank, errors)
            assert "ranks [1] have none" in errors["replicated_without_encoder"], (rank, errors)
            assert errors["left_unparallelised"] == "False", (rank, errors)
            assert errors["sharded_changed"].startswith("RuntimeError") and "cannot be removed" in (
                errors["sharded_changed"]
            ), (rank, errors)
        return
    expected = stock_runs[VARIANT_CASES.get(case, "qwen_image")][0]
    for rank, result in enumerate(per_rank):
        assert len(result["images"]) == CALLS
        for call, image in enumerate(result["images"]):
            diff = (image - expected).abs().max().item()
            assert diff <= PARALLEL_TOLERANCE, f"rank {rank} call {call}: max abs diff {diff}"
    facts = [result["facts"] for result in per_rank]
    forwards = [result["forwards"] for result in per_rank]
    if placement in ("one_rank", "loaded-without-encoder"):
        # the leader encodes prompt and negative in one forward per call; rank 1 holds no encoder parameter at all
        assert forwards == [[1] * CALLS, [0] * CALLS], forwards
        assert facts[1]["held"] == 0 and facts[0]["held"] == facts[0]["whole"] > 0, facts
    elif placement == "replicated":
        assert forwards == [[1] * CALLS] * 2, forwards
        assert all(rank_facts["held"] == rank_facts["whole"] > 0 for rank_facts in facts), facts
    else:
        assert forwards == [[1] * CALLS] * 2, forwards
        whole_layers = facts[0]["layers_whole"]
        # each rank: half of the decoder layers (row chunks: at most one row per parameter over half) + the rest whole
        assert sum(rank_facts["layers_local"] for rank_facts in facts) == whole_layers, facts
        for rank_facts in facts:
            assert rank_facts["layers_local"] <= whole_layers / 2 * 1.05, facts
            assert rank_facts["held"] == rank_facts["rest"] + rank_facts["layers_local"] < rank_facts["whole"], facts
    if "placement" in per_rank[0]:
        assert all(result["placement"] == placement for result in per_rank)


# ---------------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("variant", ["qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "qwen_image_layered"])
def test_prompt_and_negative_in_one_encoder_forward(stock_runs, variant):
    ours = build_tiny_pipeline(variant, pipeline_cls=sp_pipeline_class(variant))
    ours_counter = _ForwardCounter(ours)
    expected, stock_forwards = stock_runs[variant]
    assert stock_forwards == 2  # the stock pipeline: prompt, then negative prompt
    for call in range(CALLS):
        before = ours_counter.count
        diff = (_images(ours, variant) - expected).abs().max().item()
        assert diff <= BATCHED_TOLERANCE, f"call {call}: max abs diff {diff}"
        assert ours_counter.count - before == 1, f"call {call}: {ours_counter.count - before} encoder forwards"
    if variant == "qwen_image":  # without true CFG there is one prompt: one forward, the stock image
        stock = build_tiny_pipeline(variant, pipeline_cls=stock_pipeline_class(variant))
        kwargs = dict(true_cfg_scale=1.0, negative_prompt=None)
        with torch.no_grad():
            single = stock(**tiny_pipeline_call_kwargs(variant, **kwargs)).images
            before = ours_counter.count
            assert torch.equal(ours(**tiny_pipeline_call_kwargs(variant, **kwargs)).images, single)
        assert ours_counter.count - before == 1


def test_batched_embeddings_equal_separate_calls():
    from diffusers_qwen_sp.prompt_batching import encode_prompts_together

    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    prompts = (["a red cat sitting on a blue mat", "a dog"], ["blurry, low quality", "an old wooden house by a lake"])
    with torch.no_grad():
        separate = [pipe.encode_prompt(prompt=prompt, num_images_per_prompt=2) for prompt in prompts]
        together = encode_prompts_together(
            pipe, pipe.encode_prompt, [dict(prompt=prompt, num_images_per_prompt=2) for prompt in prompts]
        )
    for (embeds, mask), (batched_embeds, batched_mask) in zip(separate, together):
        assert embeds.shape == batched_embeds.shape  # each trimmed to its own batch's longest prompt
        assert (embeds - batched_embeds).abs().max().item() <= BATCHED_TOLERANCE
        assert torch.equal(mask, batched_mask)


def test_pipeline_without_text_encoder_in_one_process(stock_runs, tmp_path):
    from diffusers_qwen_sp import QwenImageSPPipeline

    build_tiny_pipeline("qwen_image").save_pretrained(tmp_path)
    pipe = QwenImageSPPipeline.from_pretrained(tmp_path, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None
    with pytest.raises(ValueError, match="has no text encoder.*Pass prompt_embeds"):
        _images(pipe)
    assert pipe.text_encoder is None  # the stand-in of the call is gone
    # with the embeddings given it needs no encoder: the stock image
    stock = build_tiny_pipeline("qwen_image", pipeline_cls=stock_pipeline_class("qwen_image"))
    with torch.no_grad():
        embeds = [stock.encode_prompt(prompt) for prompt in ("a red cat sitting on a blue mat", "blurry, low quality")]
    kwargs = tiny_pipeline_call_kwargs("qwen_image", prompt=None, negative_prompt=None)
    kwargs.update(prompt_embeds=embeds[0][0], prompt_embeds_mask=embeds[0][1],
                  negative_prompt_embeds=embeds[1][0], negative_prompt_embeds_mask=embeds[1][1])
    with torch.no_grad():
        image = pipe(**kwargs).images
    assert torch.equal(image, stock_runs["qwen_image"][0])


def test_config_validation_and_loading_rule():
    with pytest.raises(ValueError, match=r"must be one of \('one_rank', 'replicated', 'sharded'\), got 'one-rank'"):
        TextEncoderPlacementConfig(placement="one-rank")
    with pytest.raises(ValueError, match="prefetch must be a bool"):
        TextEncoderPlacementConfig(placement="sharded", prefetch="yes")
    assert TextEncoderPlacementConfig().placement == "one_rank"
    # replicas are contiguous blocks of ranks; their first rank is the leader
    assert [loads_text_encoder("one_rank", rank, 2) for rank in range(4)] == [True, False, True, False]
    assert all(loads_text_encoder(placement, 3, 4) for placement in ("replicated", "sharded"))
    build = build_tiny_pipeline("qwen_image", pipeline_cls=sp_pipeline_class("qwen_image"))
    with pytest.raises(RuntimeError, match="enable_sequence_parallel"):
        build.set_text_encoder_placement("one_rank")
    with pytest.raises(ValueError, match="got 'everywhere'"):
        build.set_text_encoder_placement("everywhere")


def test_cli_flag():
    from diffusers_qwen_sp.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x"]).text_encoder == "one-rank"
    assert parser.parse_args(["generate", "--prompt", "x", "--text-encoder", "sharded"]).text_encoder == "sharded"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--text-encoder", "everywhere"])

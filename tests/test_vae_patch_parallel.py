"""Patch-parallel VAE decode and encode (diffusers_qwen_sp.hooks.vae_patch_parallel) against the stock VAE.

Tolerance: max abs diff <= 1e-5 on decoded images in [-1, 1] and on encoded latents (fp32; measured <= 1.4e-6: the
slabs change only the convolutions' blocking, hence the summation order). The references are the stock
`vae.decode` / `vae.encode` in the pytest process; the spawned ranks return their outputs (every rank gets the whole
result), two calls per case, and how many rows their decoder's `conv_out` (encoder's `conv_in`) produced, which shows
that the work was split. VAEs: the tiny one of the tiny pipelines (spatial factor 4), a deep one with the real
architecture's depth (`dim_mult=(1, 2, 4, 4)`, 2 resnets per level, factor 8, 13-latent-row halo) and narrow
channels, and the RGBA one of Layered, decoded as a batch of layers as `QwenImageLayeredPipeline` does.

fp32 parity alone cannot prove the halo: a row missing early on the up path moves the output by ~1e-9, under fp32
rounding. `test_halo_is_needed_row_for_row` runs one rank's slab in float64, where the derived halo is bitwise exact
and one row less at any conv stage is not.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from diffusers_qwen_sp import PatchParallelVAEConfig, QwenImageEditSPPipeline, QwenImageSPPipeline
from diffusers_qwen_sp.distributed import ParallelGroups
from diffusers_qwen_sp.hooks import apply_patch_parallel_vae, get_patch_parallel_vae, remove_patch_parallel_vae
from diffusers_qwen_sp.hooks.vae_halo import StageOp, build_plan
from diffusers_qwen_sp.hooks.vae_patch_parallel import PatchParallelVAERuntime
from diffusers_qwen_sp.testing import (
    build_tiny_pipeline,
    small_reference_images,
    tiny_pipeline_call_kwargs,
    tiny_vae_config,
)

from _spawn import Spawn, spawn_fixture, world_cases


TOLERANCE = 1e-5
PIPELINE_TOLERANCE = 1e-4  # images in [0, 1] after 2 denoising steps under Ulysses (the SP suite's bound)
CALLS = 2

VAES = {
    "tiny": tiny_vae_config(),
    "deep": dict(  # the real VAE's depth (diffusers' defaults) with 8 instead of 96 base channels: factor 8
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ),
    "layered": tiny_vae_config("qwen_image_layered"),
}
# case -> (vae, batch, latent frames, latent height, latent width, split_dim)
DECODES = {
    "tiny-uneven": ("tiny", 1, 1, 7, 6, "auto"),  # 7 rows: 4 + 3 (world 2), 2 + 2 + 2 + 1 (world 4)
    "tiny-wide": ("tiny", 1, 1, 5, 11, "auto"),  # split along the width
    "tiny-video": ("tiny", 1, 2, 6, 5, "auto"),  # 2 latent frames -> 5: causal feature cache and time_conv
    "deep-small-slabs": ("deep", 1, 1, 9, 4, "auto"),  # every slab (5/4, 3/2/2/2 rows) under the 13-row halo
    "deep-tall": ("deep", 1, 1, 30, 3, "auto"),  # 15 / 8-7 rows per rank: halos reach over a neighbour
    "deep-height-forced": ("deep", 1, 1, 5, 12, "height"),
    "deep-fewer-rows-than-ranks": ("deep", 1, 1, 3, 4, "auto"),  # world 4: whole on every rank
    "layered-batch": ("layered", 3, 1, 6, 7, "auto"),  # Layered decodes (batch * layers, C, 1, H, W)
}
# case -> (vae, batch, frames, image height, image width, split_dim)
ENCODES = {
    "tiny": ("tiny", 1, 1, 60, 24, "auto"),  # 15 latent rows: slabs with a 13 / 16-row halo
    "tiny-video": ("tiny", 1, 5, 64, 16, "auto"),  # 5 frames: chunks 1 + 4, temporal downsampling
    "deep-uneven": ("deep", 1, 1, 200, 24, "auto"),  # 25 latent rows; the 61 / 68-row halo covers whole slabs
    "deep-wide": ("deep", 2, 1, 40, 152, "auto"),
}
PIPELINE_CASES = ["pipeline-qwen_image", "pipeline-qwen_image-reapplied", "pipeline-qwen_image_edit"]
CASES = {
    2: [f"decode-{name}" for name in DECODES] + [f"encode-{name}" for name in ENCODES] + PIPELINE_CASES,
    4: [f"decode-{name}" for name in DECODES] + [f"encode-{name}" for name in ENCODES],
}


def _build_vae(name: str) -> AutoencoderKLQwenImage:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLQwenImage(**VAES[name]).eval()


def _decode_input(case: str) -> torch.Tensor:
    name, batch, frames, height, width, _ = DECODES[case]
    generator = torch.Generator().manual_seed(height * 100 + width)
    return torch.randn(batch, VAES[name]["z_dim"], frames, height, width, generator=generator)


def _encode_input(case: str) -> torch.Tensor:
    name, batch, frames, height, width, _ = ENCODES[case]
    generator = torch.Generator().manual_seed(height * 100 + width)
    channels = VAES[name].get("input_channels", 3)
    return torch.rand(batch, channels, frames, height, width, generator=generator) * 2 - 1


def _probe(vae: AutoencoderKLQwenImage, kind: str) -> list[list[tuple[int, int]]]:
    """Per call: [(height, width) the probed conv would have whole, (height, width) it produced on this rank]."""
    calls: list[list[tuple[int, int]]] = []
    root, conv = (vae.decoder, vae.decoder.conv_out) if kind == "decode" else (vae.encoder, vae.encoder.conv_in)
    factor = vae.spatial_compression_ratio if kind == "decode" else 1

    def whole(_, args):
        calls.append([(args[0].shape[3] * factor, args[0].shape[4] * factor)])

    root.register_forward_pre_hook(whole)  # sees the input before our hook slices it
    conv.register_forward_hook(lambda _, __, output: calls[-1].append(tuple(output.shape[3:])))
    return calls


def _run_vae_cases(world_size: int) -> dict[str, dict]:
    results = {}
    for kind, table in (("decode", DECODES), ("encode", ENCODES)):
        for case, (name, *_, split_dim) in table.items():
            vae = _build_vae(name)
            apply_patch_parallel_vae(vae, PatchParallelVAEConfig(split_dim=split_dim))  # the world
            rows = _probe(vae, kind)
            with torch.no_grad():
                if kind == "decode":
                    outputs = [vae.decode(_decode_input(case)).sample for _ in range(CALLS)]
                else:
                    outputs = [vae.encode(_encode_input(case)).latent_dist.mode() for _ in range(CALLS)]
            remove_patch_parallel_vae(vae)
            results[f"{kind}-{case}"] = {"outputs": outputs, "probes": rows}
    return results


def _pipeline_call(pipe, variant):
    with small_reference_images(), torch.no_grad():
        return pipe(**tiny_pipeline_call_kwargs(variant)).images


def _run_pipelines() -> dict[str, dict]:
    results = {}
    for variant, cls in (("qwen_image", QwenImageSPPipeline), ("qwen_image_edit", QwenImageEditSPPipeline)):
        pipe = build_tiny_pipeline(variant, pipeline_cls=cls)
        pipe.enable_sequence_parallel(ulysses_degree=2)  # the parallel VAE comes with it (parallel_vae=True)
        assert pipe.parallel_vae_enabled
        decoded, encoded = _probe(pipe.vae, "decode"), _probe(pipe.vae, "encode")
        images = [_pipeline_call(pipe, variant) for _ in range(CALLS)]
        results[f"pipeline-{variant}"] = {"outputs": images, "decoded": list(decoded), "encoded": list(encoded)}
        if variant == "qwen_image":  # apply -> remove -> apply
            pipe.disable_parallel_vae()
            disabled = pipe.parallel_vae_enabled
            pipe.enable_parallel_vae()
            decoded.clear()
            results[f"pipeline-{variant}-reapplied"] = {
                "outputs": [_pipeline_call(pipe, variant)],
                "decoded": list(decoded),
                "encoded": [],
                "disabled": disabled,
                "enabled": pipe.parallel_vae_enabled,
            }
    return results


def _worker(rank: int, world_size: int) -> dict[str, dict]:
    results = _run_vae_cases(world_size)
    if world_size == 2:
        results.update(_run_pipelines())
    return results


# About 5 s (world 2, with the pipelines) and 2 s (world 4) on 2 cores.
spawned = spawn_fixture(_worker, Spawn(2, timeout=180), Spawn(4, timeout=180))


@pytest.fixture(scope="module")
def references():
    refs = {}
    vaes = {name: _build_vae(name) for name in VAES}
    with torch.no_grad():
        for case, (name, *_) in DECODES.items():
            refs[f"decode-{case}"] = vaes[name].decode(_decode_input(case)).sample
        for case, (name, *_) in ENCODES.items():
            refs[f"encode-{case}"] = vaes[name].encode(_encode_input(case)).latent_dist.mode()
    for variant in ("qwen_image", "qwen_image_edit"):
        stock = build_tiny_pipeline(variant)
        refs[f"pipeline-{variant}"] = _pipeline_call(stock, variant)
    refs["pipeline-qwen_image-reapplied"] = refs["pipeline-qwen_image"]
    return refs


def _split_dim(case: str, world_size: int) -> int | None:
    """Which of (height, width) the case splits; None when every rank runs it whole (fewer latent rows than ranks)."""
    kind, name = case.split("-", 1)
    vae, _, _, height, width, split_dim = (DECODES if kind == "decode" else ENCODES)[name]
    dim = 1 if split_dim == "width" or (split_dim == "auto" and width > height) else 0
    latent_rows = (height, width)[dim] // (1 if kind == "decode" else 2 ** len(VAES[vae]["temperal_downsample"]))
    return None if latent_rows < world_size else dim


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size, case", world_cases(CASES))
def test_matches_stock_vae(spawned, references, world_size, case):
    expected = references[case]
    for rank, result in enumerate(spawned[world_size].case(case)):
        assert len(result["outputs"]) >= 1
        for call, output in enumerate(result["outputs"]):
            assert output.shape == expected.shape, f"rank {rank} call {call}: {tuple(output.shape)}"
            diff = (output - expected).abs().max().item()
            bound = PIPELINE_TOLERANCE if case.startswith("pipeline") else TOLERANCE
            assert diff <= bound, f"rank {rank} call {call}: max abs diff {diff:.3g}"
        probes = result["decoded"] + result["encoded"] if case.startswith("pipeline") else result["probes"]
        assert probes, f"rank {rank}: the probed conv never ran"
        for whole, local in probes:
            if case.startswith("pipeline"):  # the convs ran on this rank's slab only
                assert local[0] * local[1] < whole[0] * whole[1], f"rank {rank}: {local} of {whole}"
            elif (dim := _split_dim(case, world_size)) is None:
                assert local == whole, f"rank {rank}: {local} of {whole}"
            else:
                assert local[dim] < whole[dim] and local[1 - dim] == whole[1 - dim], f"rank {rank}: {local} of {whole}"
        if "disabled" in result:
            assert result["disabled"] is False and result["enabled"] is True


# ---------------------------------------------------------------------------------------------------- single process


def test_halo_arithmetic_of_the_real_vae():
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()  # diffusers' defaults: the real Qwen-Image VAE
    runtime = PatchParallelVAERuntime(PatchParallelVAEConfig(), None, vae)
    # Decode a 1024-px image (128 latent rows) on 4 ranks; rank 1 owns latent rows [32, 64) = pixel rows [256, 512).
    plan = build_plan(runtime.ops["decode", 3], 128, 4, 1, 128, 3)
    assert plan.lengths == (256, 256, 256, 256)
    # The split: 13 latent rows of halo per side (vae_halo's docstring): [32 - 13, 64 + 13) of 128.
    assert (plan.crops[0].start, plan.crops[0].length, plan.crops[0].expected) == (19, 58, 128)
    # The last crop: conv_out reads 1 row per side, so it ran on [256 - 1, 512 + 1): 258 rows, cropped to 256.
    last = plan.crops[-1]
    assert (last.start, last.length, last.expected) == (1, 256, 258)
    # up_blocks[3] gets 7 rows per side at 8x: the crop after up_blocks[2]'s upsampler (crops: the split, then
    # 3 resnets + 1 upsampler per up block) keeps 256 + 14 rows.
    assert plan.crops[12].length == 270
    # Encode the same image: latent rows [32, 64) need image rows [256 - 61, 512 + 68) = [195, 580).
    plan = build_plan(runtime.ops["encode", 3], 1024, 4, 1, 128, 3)
    assert (plan.crops[0].start, plan.crops[0].length) == (195, 580 - 195)
    assert plan.crops[-1].length == 32 and plan.lengths == (32, 32, 32, 32)
    # The first rank's slab starts at the border: no halo above, 13 latent rows below.
    assert build_plan(runtime.ops["decode", 3], 128, 4, 0, 128, 3).crops[0].length == 32 + 13
    # Fewer latent rows than ranks: no split.
    assert build_plan(runtime.ops["decode", 3], 3, 4, 0, 3, 3) is None


def _one_rank_of_two(vae, latents, rank, shrink=None):
    """Rank `rank` of a simulated degree-2 decode in this process: its own rows (the gather returns them as they are).
    `shrink`: an index of the up path whose halo rule reads one row less per side than the module does."""
    runtime = apply_patch_parallel_vae(vae, PatchParallelVAEConfig(split_dim="height"), ParallelGroups())
    runtime.degree, runtime.rank = 2, rank
    runtime.gather = lambda local, plan: local
    if shrink is not None:
        ops = runtime.ops["decode", 3]
        ops[shrink] = StageOp(ops[shrink].kind, ops[shrink].radius - 1)
    try:
        with torch.no_grad():
            return vae.decode(latents).sample
    finally:
        remove_patch_parallel_vae(vae)


def test_halo_is_needed_row_for_row():
    # In float64: the halo the modules give is bitwise exact, and one row short at any conv stage of the up path (every
    # resnet, the head's conv_out) changes the output. A row short early on moves the output only by ~1e-9 (it reaches
    # the core through one kernel row of every later conv), under fp32 rounding: hence float64 here. (A row short at
    # an upsampler can be absorbed by the nearest x2's rounding, so only the conv stages are shortened.)
    vae = _build_vae("deep").double()
    latents = _decode_input("deep-tall").double()  # 30 latent rows: ranks own 15 + 15; the halo reaches no border
    with torch.no_grad():
        expected = vae.decode(latents).sample
    for rank, rows in ((0, slice(0, 120)), (1, slice(120, 240))):
        assert (_one_rank_of_two(vae, latents, rank) - expected[..., rows, :]).abs().max() <= 1e-12
    ops = PatchParallelVAERuntime(PatchParallelVAEConfig(), None, vae).ops["decode", 3]
    shortened = [index for index, op in enumerate(ops) if op.kind == "conv"]
    assert len(shortened) == 4 * 3 + 1  # 3 resnets per up block and the head
    for index in shortened:
        diff = (_one_rank_of_two(vae, latents, 0, index) - expected[..., :120, :]).abs().max()
        assert diff > 1e-11, f"stage {index}: a halo one row short changed nothing ({diff:.1e})"


def test_interval_rules_by_hand():
    # up (nearest x2 + 3x3): output rows [10, 20) read upsampled rows [9, 21), i.e. input rows [4, 11)
    assert StageOp("up", 1).needed_input(10, 20, 100) == (4, 11)
    # down (pad 1 after the end, 3x3 stride 2): output rows [5, 8) read input rows [10, 17); at the end, clipped
    assert StageOp("down").needed_input(5, 8, 100) == (10, 17)
    assert StageOp("down").needed_input(5, 8, 16) == (10, 16)
    assert StageOp("down").out_len(16) == 8 and StageOp("down").out_len(15) == 7
    # two resnets' convs: 4 rows per side, clipped at 0
    assert StageOp("conv", 4).needed_input(2, 10, 12) == (0, 12)


def test_config_validation():
    with pytest.raises(ValueError, match="split_dim must be 'auto', 'height' or 'width'"):
        PatchParallelVAEConfig(split_dim="depth")
    with pytest.raises(ValueError, match="splits nothing"):
        PatchParallelVAEConfig(decode=False, encode=False)
    with pytest.raises(TypeError, match="must be a bool"):
        PatchParallelVAEConfig(decode="yes")


def test_apply_remove_single_rank_and_refusals():
    vae = _build_vae("tiny")
    latents = _decode_input("tiny-uneven")
    with torch.no_grad():
        expected = vae.decode(latents).sample
        runtime = apply_patch_parallel_vae(vae, PatchParallelVAEConfig(), ParallelGroups())  # a one-rank replica
        assert runtime.degree == 1 and get_patch_parallel_vae(vae) is runtime
        with pytest.raises(RuntimeError, match="already applied"):
            apply_patch_parallel_vae(vae, PatchParallelVAEConfig(), ParallelGroups())
        assert torch.equal(vae.decode(latents).sample, expected)
        remove_patch_parallel_vae(vae)
        assert get_patch_parallel_vae(vae) is None
        assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in vae.modules())
        remove_patch_parallel_vae(vae)  # a no-op
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        apply_patch_parallel_vae(vae)
    with pytest.raises(TypeError, match="supports diffusers' AutoencoderKLQwenImage"):
        apply_patch_parallel_vae(torch.nn.Linear(2, 2), PatchParallelVAEConfig(), ParallelGroups())
    attention_in_encoder = AutoencoderKLQwenImage(**{**VAES["tiny"], "attn_scales": [1.0]})
    with pytest.raises(ValueError, match=r"encode=False"):
        apply_patch_parallel_vae(attention_in_encoder, PatchParallelVAEConfig(), ParallelGroups())
    assert get_patch_parallel_vae(attention_in_encoder) is None
    apply_patch_parallel_vae(attention_in_encoder, PatchParallelVAEConfig(encode=False), ParallelGroups())


def test_pipeline_needs_sequence_parallel():
    pipe = build_tiny_pipeline("qwen_image", pipeline_cls=QwenImageSPPipeline)
    with pytest.raises(RuntimeError, match="enable_sequence_parallel"):
        pipe.enable_parallel_vae()
    assert not pipe.parallel_vae_enabled
    pipe.disable_parallel_vae()  # a no-op


def test_bench_smoke():
    # The bench counts decode memory with bench.memory.LiveBytes (its exact counting: tests/test_bench_memory.py).
    from diffusers_qwen_sp.bench.memory import LiveBytes

    vae = _build_vae("tiny")
    with torch.no_grad(), LiveBytes() as counter:
        image = vae.decode(_decode_input("tiny-uneven")).sample
    # the decoded image is alive at the end, and the decode's intermediates came and went on top of it
    assert counter.current_bytes >= image.numel() * image.element_size()
    assert counter.peak_bytes > counter.current_bytes
    # `bench-vae` end to end on a narrow VAE: degree 2 equals degree 1 and its slabs hold less than the whole
    from diffusers_qwen_sp.cli import build_parser

    args = build_parser().parse_args(["bench-vae", "--sizes", "64", "--degrees", "1", "2", "--base-dim", "8"])
    rows = {(row.operation, row.degree): row for row in args.func(args).rows}
    assert set(rows) == {("decode", 1), ("decode", 2), ("encode", 1), ("encode", 2)}
    assert all(row.max_diff <= TOLERANCE for row in rows.values()), rows
    assert rows["decode", 2].peak_bytes < rows["decode", 1].peak_bytes, rows

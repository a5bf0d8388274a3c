"""`bench-memory`: the live-bytes counter on hand-computed examples, the meta-device traces against the same models run
on CPU, the computed model of the real configs (parameter counts against the published sizes, sharded bytes, a
monotonic fit table), and a `--quick` measured run at world 2 whose rows give back its ratios.

Every check runs twice (a counter or a cache left in a stale state shows on the second round).
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

from diffusers_qwen_sp.bench.memory import (
    CONFIGURATIONS,
    MODELS,
    QUICK_MODELS,
    QWEN25_VL_7B,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
    LiveBytes,
    fit_table,
    text_encoder_parameters,
    transformer_parameters,
    vae_parameters,
)
from diffusers_qwen_sp.bench.memory.fit import CARDS_GIB, DEGREES
from diffusers_qwen_sp.bench.memory.model_sizes import (
    PUBLISHED_PARAMETERS,
    transformer_forward_peak,
    vae_decode_peak,
    vae_encode_peak,
)
from diffusers_qwen_sp.bench.rows import mid_size_config


REPEATS = 2


# ---------------------------------------------------------------------------------------------------- the counter


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_live_bytes_hand_computed(device):
    for _ in range(REPEATS):
        before = torch.empty(250, device=device)  # 1000 bytes, alive before: not counted
        with LiveBytes() as counter:
            a = torch.empty(1000, device=device)  # 4000 live
            b = torch.empty(2000, device=device)  # 4000 + 8000 = 12000: the peak
            view = b[:10]  # a view: no new storage
            before.add_(1)  # in place: no new storage
            del a  # 8000
            c = torch.empty(100, device=device)  # 8400
            del b  # the view keeps b's storage alive: still 8400
        assert counter.peak_bytes == 12000
        assert counter.current_bytes == 8400
        del view  # b's storage dies: 400
        assert counter.current_bytes == 400
        del c, before


def test_live_bytes_follows_storage_resizes():
    # FSDP2 frees and re-allocates unsharded parameters by resizing their storage, which no aten op reports.
    for _ in range(REPEATS):
        weight = torch.empty(1000)  # 4000 bytes, allocated before
        with LiveBytes() as counter:
            weight.untyped_storage().resize_(0)  # -4000
            temporary = torch.empty(500)  # -4000 + 2000
            weight.untyped_storage().resize_(4000)  # -2000 + 4000 = 2000: the peak
            del temporary  # 0
        assert (counter.peak_bytes, counter.current_bytes) == (2000, 0)
        assert torch.UntypedStorage.resize_ is torch._C.StorageBase.resize_  # the watch is gone after the block


def test_meta_trace_equals_cpu_run():
    # The computed tables trace the stock models on the meta device; the same models run on CPU allocate exactly that.
    vae_config = dict(QWEN_IMAGE_VAE, base_dim=8)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**vae_config).eval()
    transformer_config = mid_size_config(2, 4, 16)
    latents, pixels = torch.randn(1, 16, 1, 6, 4), torch.randn(1, 3, 1, 48, 32)  # inputs allocated before: not counted
    hidden, text, timestep = torch.randn(1, 48, 64), torch.randn(1, 7, 64), torch.ones(1)
    for _ in range(REPEATS):
        with torch.no_grad(), LiveBytes() as decode:
            vae.decode(latents, return_dict=False)
        with torch.no_grad(), LiveBytes() as encode:
            vae.encode(pixels).latent_dist.mode()
        assert decode.peak_bytes == vae_decode_peak(vae_config, 48, 32, 1, torch.float32)
        assert encode.peak_bytes == vae_encode_peak(vae_config, 48, 32, 1, torch.float32)
        transformer = QwenImageTransformer2DModel(**transformer_config).eval()  # fresh: its rope cache is empty
        with torch.no_grad(), LiveBytes() as forward:
            transformer(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                        timestep=timestep, img_shapes=[[(1, 6, 8)]], return_dict=False)
        assert forward.peak_bytes == transformer_forward_peak(transformer_config, (48,), 7, 8, torch.float32)


# ---------------------------------------------------------------------------------------------------- computed model


def _defaults(cls):
    parameters = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not p.empty}


def test_real_configs_and_parameter_counts():
    # The constants are diffusers' defaults, which are the real configs.
    transformer_defaults = _defaults(QwenImageTransformer2DModel)
    vae_defaults = _defaults(AutoencoderKLQwenImage)
    for name, value in QWEN_IMAGE_TRANSFORMER.items():
        assert transformer_defaults[name] == value, name
    for name, value in QWEN_IMAGE_VAE.items():
        assert vae_defaults[name] == value, name
    for _ in range(REPEATS):
        counts = {"transformer": transformer_parameters().total, "text_encoder": text_encoder_parameters().total,
                  "vae": vae_parameters()}
        for name, count in counts.items():
            assert abs(count / PUBLISHED_PARAMETERS[name] - 1) <= 0.02, (name, count)
        assert counts["transformer"] == 20_430_401_088  # 60 blocks of 339,831,296 + 40,523,328 outside them
        assert counts["text_encoder"] == 8_292_166_656


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_sharded_bytes_are_replicated_over_degree_plus_the_unsharded_root(degree):
    for _ in range(REPEATS):
        tp = transformer_parameters(QWEN_IMAGE_TRANSFORMER)
        shardable = tp.total - tp.kept_whole
        # Every block parameter's rows divide by 2, 4 and 8: no FSDP2 padding, the split is exact.
        assert tp.sharded(degree) == tp.kept_whole + shardable // degree
        assert shardable % degree == 0
        te = text_encoder_parameters(QWEN25_VL_7B)
        assert te.sharded(degree) == te.kept_whole + math.ceil(te.layer * te.layers / degree)
        assert te.kept_whole == te.total - 28 * te.layer  # embeddings, LM head, vision tower, norm


def test_fit_table_is_monotonic():
    rows = fit_table(QUICK_MODELS)
    again = fit_table(QUICK_MODELS)
    assert rows == again
    assert len(rows) == len(CONFIGURATIONS) * len(DEGREES)
    for config in CONFIGURATIONS:
        peaks = [row for row in rows if row["configuration"] == config.key]
        peaks.sort(key=lambda row: row["gpus"])
        for fewer, more in zip(peaks, peaks[1:]):
            assert more["peak_gib"] <= fewer["peak_gib"] + 1e-9, config.key  # more GPUs never need more
            for card in CARDS_GIB:
                assert more["fits"][f"{card}GB"] >= fewer["fits"][f"{card}GB"], (config.key, card)
        for row in peaks:  # a card that fits, every larger card fits
            fits = [row["fits"][f"{card}GB"] for card in CARDS_GIB]
            assert fits == sorted(fits)
    by_key = {(row["configuration"], row["gpus"]): row for row in rows}
    # Everything replicated: 28.8 B parameters in bf16 (53.7 GiB) on every GPU: only an 80 GB card.
    replicated = by_key["replicated", 2]
    assert replicated["weights_gib"] == pytest.approx((20.430401088 + 8.292166656 + 0.126892531) * 2e9 / 2**30)
    assert replicated["fits"] == {"24GB": False, "48GB": False, "80GB": True}
    # All sharded with the parallel VAE on 8 GPUs fits a 24 GB card.
    assert by_key["all-sharded-pvae", 8]["fits"]["24GB"]
    assert {model.key for model in MODELS} >= {"qwen-image", "edit-2509", "edit-2511", "layered"}


# ---------------------------------------------------------------------------------------------------- measured


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from diffusers_qwen_sp.cli import main

    output = tmp_path_factory.mktemp("bench-memory")
    assert main(["bench-memory", "--quick", "--measured-only", "--output-dir", str(output)]) == 0
    return json.loads((output / "memory.json").read_text()), (output / "memory.md").read_text()


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_quick_measured_run(quick_run):
    report, markdown_text = quick_run
    measured = report["measured"]
    world = measured["worlds"]["2"]
    ranks = world["ranks"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    for stage in ("forward replicated", "forward sharded", "encode replicated", "encode one_rank", "encode sharded",
                  "decode whole", "decode parallel"):
        for rank in ranks:
            assert isinstance(rank[stage], int), (stage, rank[stage])  # measured, not skipped
    # The ratio, recomputed from the rows: at most half of the replicated bytes plus one block.
    replicated = max(rank["held replicated"]["transformer"] for rank in ranks)
    sharded = max(rank["held sharded"]["transformer"] for rank in ranks)
    ratio = sharded / replicated
    assert ratio == pytest.approx(world["targets"]["sharded_bytes_ratio"])
    assert sharded <= replicated / 2 + measured["block_bytes"]
    # ... and exactly what the computed model says FSDP2 keeps (fp32: 4 bytes), for the text encoder too.
    assert sharded == transformer_parameters(measured["configs"]["transformer"]).sharded(2) * 4
    te_sharded = text_encoder_parameters(measured["configs"]["text_encoder"]).sharded(2) * 4
    assert [rank["held te sharded"]["text_encoder"] for rank in ranks] == [te_sharded] * 2
    # The text encoder on one rank: the other rank saves its whole size, rank 0 keeps it.
    whole = ranks[0]["held replicated"]["text_encoder"]
    assert whole > 0
    assert ranks[1]["held sharded"]["text_encoder"] == 0
    assert ranks[0]["held sharded"]["text_encoder"] == whole
    assert world["targets"]["one_rank"]["met"]
    assert ranks[1]["encode one_rank"] < ranks[0]["encode one_rank"]  # rank 1 only receives the embeddings
    # Sharded transformer: the forward needs the all-gathered blocks on top.
    assert all(rank["forward sharded"] > rank["forward replicated"] for rank in ranks)
    assert "sharded / replicated transformer bytes per rank" in markdown_text
    assert "met" in markdown_text and "MISSED" not in markdown_text

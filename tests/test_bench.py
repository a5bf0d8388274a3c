"""`python -m diffusers_qwen_sp bench` on its --quick configuration: every row measured, numbers consistent.

No timing thresholds: the machine may be loaded. The checks are on what must hold whatever the speed: every row ran
with finite positive times, every ratio is the quotient of the times it names, bytes are at least the analytic
minimum (equal here: the token counts divide the degree), TeaCache's ideal speed-up is calls / computed.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from diffusers_qwen_sp.bench import (
    BenchSettings,
    RowSpec,
    add_bench_arguments,
    analytic_bytes_per_forward,
    materialize_random_transformer,
    mid_size_config,
    plan_rows,
    psnr,
    run_bench,
    settings_from_args,
)
from diffusers_qwen_sp.bench.plot import _plot_with_pil


QUICK_ROWS = [
    "stock diffusers",
    "ours, no SP",
    "ours Ulysses 2",
    "ours Ring 2",
    "diffusers CP Ulysses 2",
    "ours CFG parallel 2",
    "ours + TeaCache 0.1",
    "ours + TeaCache 0.2",
    "ours + TeaCache 0.4",
    "ours Ulysses 2 + TeaCache 0.2",
]
FORWARD_ROWS = QUICK_ROWS[:5]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, object]:
    output_dir = tmp_path_factory.mktemp("bench")
    report = run_bench(_parse(["--quick", "--device", "cpu", "--output-dir", str(output_dir)]))
    on_disk = json.loads((output_dir / "bench.json").read_text())
    return report, on_disk, output_dir


def _rows(data: dict) -> dict[str, dict]:
    return {row["name"]: row for row in data["rows"]}


def _finite_positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(180)
def test_quick_bench_writes_json_markdown_and_png(quick: tuple) -> None:
    report, on_disk, output_dir = quick
    assert [row["name"] for row in on_disk["rows"]] == QUICK_ROWS
    assert on_disk["settings"]["preset"] == "quick"
    markdown = (output_dir / "bench.md").read_text()
    rows = _rows(on_disk)
    ratio = rows["ours Ulysses 2"]["per_forward_s"] / rows["diffusers CP Ulysses 2"]["per_forward_s"]
    assert f"ours Ulysses 2 / diffusers CP Ulysses 2, forward time: {ratio:.3f}" in markdown
    for name in QUICK_ROWS:
        assert f"| {name} |" in markdown
    assert (output_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["json"] == str(output_dir / "bench.json")


@pytest.mark.timeout(180)
def test_quick_bench_every_row_has_finite_positive_times(quick: tuple) -> None:
    _, data, _ = quick
    settings = data["settings"]
    for name, row in _rows(data).items():
        assert row["status"] == "ok", (name, row["reason"])
        assert _finite_positive(row["per_image_s"]), name
        assert len(row["image_times_s"]) == settings["image_repeats"]
        assert all(_finite_positive(t) for t in row["image_times_s"]), name
        if name in FORWARD_ROWS:
            assert _finite_positive(row["per_forward_s"]), name
            assert len(row["forward_times_s"]) == settings["forward_repeats"]
            assert all(_finite_positive(t) for t in row["forward_times_s"]), name
        else:
            assert "per_forward_s" not in row  # TeaCache and CFG parallel act across calls: per image only
        memory = row["peak_memory_per_rank_bytes"]
        assert len(memory) == data["environment"]["processes"] and all(m > 0 for m in memory), name


@pytest.mark.timeout(180)
def test_quick_bench_ratios_are_the_quotients_of_its_times(quick: tuple) -> None:
    _, data, _ = quick
    rows = _rows(data)
    stock = rows["stock diffusers"]
    assert stock["forward_speedup_vs_stock"] == pytest.approx(1.0)
    for name, row in rows.items():
        assert row["image_speedup_vs_stock"] == pytest.approx(stock["per_image_s"] / row["per_image_s"]), name
        if name in FORWARD_ROWS:
            assert row["forward_speedup_vs_stock"] == pytest.approx(stock["per_forward_s"] / row["per_forward_s"])
    calls = 2 * data["inputs"]["steps"]  # true CFG: cond + uncond per step
    for name in ("ours + TeaCache 0.1", "ours + TeaCache 0.2", "ours + TeaCache 0.4", "ours Ulysses 2 + TeaCache 0.2"):
        row = rows[name]
        assert row["transformer_calls"] == calls
        computed = sum(len(steps) for steps in row["computed_steps"].values())
        assert row["computed_calls"] == computed
        # first and last step of both branches always computed
        assert 4 <= computed <= calls
        assert row["ideal_speedup"] == pytest.approx(calls / computed)
        uncached = rows[row["uncached_row"]]
        assert row["image_speedup_vs_uncached"] == pytest.approx(uncached["per_image_s"] / row["per_image_s"])
        assert row["teacache_decisions_identical_across_calls_and_ranks"]
    # Higher thresholds never compute more steps.
    computed = [rows[f"ours + TeaCache {t}"]["computed_calls"] for t in ("0.1", "0.2", "0.4")]
    assert computed == sorted(computed, reverse=True)
    # TeaCache under Ulysses takes the single-process decisions.
    assert rows["ours Ulysses 2 + TeaCache 0.2"]["computed_steps"] == rows["ours + TeaCache 0.2"]["computed_steps"]


@pytest.mark.timeout(180)
def test_quick_bench_bytes_match_the_analytic_minimum(quick: tuple) -> None:
    _, data, _ = quick
    rows = _rows(data)
    for name in ("stock diffusers", "ours, no SP"):
        assert rows[name]["bytes_per_forward_per_rank"] == 0
        assert rows[name]["analytic_min_bytes_per_forward"] == 0
    for name in ("ours Ulysses 2", "ours Ring 2", "diffusers CP Ulysses 2"):
        row = rows[name]
        minimum = row["analytic_min_bytes_per_forward"]
        assert minimum > 0
        assert row["bytes_per_forward_per_rank"] >= minimum * (1 - 1e-12), name
        # 64 image and 16 text tokens split evenly over 2 ranks: nothing is padded, so the minimum is reached.
        assert row["bytes_per_forward_per_rank"] == pytest.approx(minimum), name
        assert row["bytes_measured_over_minimum"] == pytest.approx(row["bytes_per_forward_per_rank"] / minimum)
        assert len(set(row["bytes_per_forward_all_ranks"])) == 1, name
        assert sum(row["analytic_terms"].values()) == pytest.approx(minimum)
        # The pipeline's calls have the shapes of the timed forward: an image is `calls` forwards of bytes.
        assert row["bytes_per_image_per_rank"] == row["transformer_calls"] * row["bytes_per_forward_per_rank"], name
    # TeaCache under SP skips the blocks (and their all-to-alls) but not the decision's all-reduce or the gather.
    combined, ulysses = rows["ours Ulysses 2 + TeaCache 0.2"], rows["ours Ulysses 2"]
    assert 0 < combined["bytes_per_image_per_rank"] < ulysses["bytes_per_image_per_rank"]
    assert rows["ours CFG parallel 2"]["bytes_per_image_per_rank"] > 0


@pytest.mark.timeout(180)
def test_quick_bench_parallel_rows_match_stock(quick: tuple) -> None:
    _, data, _ = quick
    rows = _rows(data)
    for name in ("ours, no SP", "ours Ulysses 2", "ours Ring 2"):
        assert rows[name]["forward_max_abs_diff_vs_stock"] <= 1e-4, name
    for name in ("ours, no SP", "ours Ulysses 2", "ours Ring 2", "ours CFG parallel 2"):
        assert rows[name]["image_max_abs_diff_vs_stock"] <= 1e-4, name
    # A cache that computed every call returns the uncached latents; one that skipped drifts by a finite PSNR.
    for name in ("ours + TeaCache 0.1", "ours + TeaCache 0.2", "ours + TeaCache 0.4", "ours Ulysses 2 + TeaCache 0.2"):
        row = rows[name]
        if row["computed_calls"] == row["transformer_calls"]:
            assert row["identical_to_stock"] or row["image_max_abs_diff_vs_stock"] <= 1e-4, name
        else:
            assert not row["identical_to_stock"] and math.isfinite(row["psnr_vs_stock_db"]), name


# ------------------------------------------------------------------------------------------------ pieces, no spawn


def test_analytic_bytes_by_hand() -> None:
    # B=1, S=64 image, T=16 text tokens, H=4 x D=16, L=2, P=2, fp32: row = 1*4*16*4 = 256 B; C = 2*2*16 = 64.
    settings = BenchSettings(layers=2, heads=4, head_dim=16, height=128, width=128, text_tokens=16, text_padding=4)
    config = mid_size_config(2, 4, 16)
    gather = 1 * 32 * 64 * 4 * 1  # (S/P) * C * 4 B to the other rank = 8192
    ulysses = analytic_bytes_per_forward(RowSpec("ulysses", "u", "ours", ulysses=2), config, settings)
    # q,k,v: 2 * 3 * 32 * 256 / 2 = 24576; out: 2 * 32 * 256 / 2 = 8192; text: 2 * 16 * 128 * 1 = 4096
    assert ulysses == {"proj_out gather": gather, "q,k,v all-to-all": 24576, "out all-to-all (image)": 8192,
                       "text heads gather": 4096}
    ring = analytic_bytes_per_forward(RowSpec("ring", "r", "ours", ring=2), config, settings)
    assert ring == {"proj_out gather": gather, "K/V ring passes": 2 * 1 * 2 * 32 * 256}  # 32768
    cp = analytic_bytes_per_forward(RowSpec("diffusers-cp", "c", "diffusers_cp", ulysses=2), config, settings)
    # joint chunk (64 + 16) / 2 = 40 tokens: 2 * 4 * 40 * 256 / 2 = 40960; bool mask chunk 2 * 40 * 1 = 80
    assert cp == {"proj_out gather": gather, "q,k,v,out all-to-all (joint)": 40960, "joint mask all-gather": 80}
    assert analytic_bytes_per_forward(RowSpec("ours", "o", "ours"), config, settings) == {}


def test_plan_marks_rows_that_cannot_run() -> None:
    one = plan_rows(BenchSettings(world=1), heads=8)
    reasons = {row.key: row.unavailable for row in one}
    assert reasons["stock"] == "" and reasons["ours"] == "" and reasons["teacache"] == ""
    for key in ("ulysses", "ring", "diffusers-cp", "cfg-parallel", "sp-teacache"):
        assert "needs >= 2 processes" in reasons[key]
    three = {row.key: row.unavailable for row in plan_rows(BenchSettings(world=3), heads=8)}
    assert "does not divide the 8 attention heads" in three["ulysses"]
    assert three["ring"] == ""
    assert "even number" in three["cfg-parallel"]
    four = [row.name for row in plan_rows(BenchSettings(world=4), heads=8)]
    assert "ours Ulysses 2 x Ring 2" in four and "ours CFG parallel 2 x Ulysses 2" in four
    forward_only = plan_rows(BenchSettings(phases=("forward",)), heads=8)
    assert all(row.per_forward and not row.per_image for row in forward_only)
    assert "teacache" not in {row.key for row in forward_only}


def test_settings_validate_and_resolve_presets() -> None:
    settings = settings_from_args(_parse(["--device", "cpu"]))
    assert (settings.preset, settings.world, settings.dtype, settings.layers) == ("cpu", 2, "float32", 4)
    settings = settings_from_args(_parse(["--quick", "--device", "cpu", "--steps", "3", "--thresholds", "0.3"]))
    assert (settings.preset, settings.steps, settings.thresholds) == ("quick", 3, (0.3,))
    with pytest.raises(ValueError, match="multiple of 16"):
        BenchSettings(height=100)
    with pytest.raises(ValueError, match="includes 'stock'"):
        BenchSettings(rows=("ours",))
    with pytest.raises(ValueError, match="text_padding"):
        BenchSettings(text_tokens=8, text_padding=8)


def test_materialized_random_transformer_runs_like_a_stock_one() -> None:
    config = mid_size_config(1, 2, 16)
    model = materialize_random_transformer(config, torch.device("cpu"), torch.float32, seed=0)
    again = materialize_random_transformer(config, torch.device("cpu"), torch.float32, seed=0)
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name  # seeded: every rank builds the same weights
    assert torch.equal(model.txt_norm.weight, torch.ones_like(model.txt_norm.weight))
    hidden = torch.randn(1, 16, config["in_channels"])
    text = torch.randn(1, 4, config["joint_attention_dim"])
    with torch.no_grad():
        out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                    img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    assert out.shape == (1, 16, config["patch_size"] ** 2 * config["out_channels"]) and torch.isfinite(out).all()


def test_psnr() -> None:
    reference = torch.tensor([0.0, 1.0, 0.5, 0.25])
    assert psnr(reference, reference) == math.inf
    # range 1, mse 0.01 -> 20 dB
    assert psnr(reference + 0.1, reference) == pytest.approx(20.0)


def test_pil_plot_fallback(quick: tuple, tmp_path: object) -> None:
    _, data, _ = quick
    path = tmp_path / "plot.png"
    _plot_with_pil(data, path)
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 100

"""`python -m diffusers_qwen_sp doctor`: its attention reference on hand-computed numbers, its verdict machinery, and
`doctor --small` end to end (the CPU proof of the GPU check), including the multi-GPU section's code on gloo."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from diffusers_qwen_sp.attention import attention_with_lse
from diffusers_qwen_sp.cli import doctor as doctor_cli
from diffusers_qwen_sp.doctor import (
    SECTIONS,
    TOLERANCES,
    DoctorSettings,
    range_scaled_diff,
    reference_attention,
    run_doctor,
    unsupported_reason,
)


def _tiny_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # One query, two keys, one head, D = 2: (B, S, H, D)
    query = torch.tensor([[[[1.0, 0.0]]]])
    key = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    value = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    return query, key, value


def test_reference_attention_hand_computed() -> None:
    query, key, value = _tiny_problem()
    out, lse = reference_attention(query, key, value, scale=1.0)
    # scores = q . k = [1, 0]; lse = log(e + 1) = 1.3132617; weights = [e, 1] / (e + 1) = [0.7310586, 0.2689414]
    # out = 0.7310586 * [1, 2] + 0.2689414 * [3, 4] = [1.5378828, 2.5378828]
    assert out.shape == (1, 1, 1, 2) and lse.shape == (1, 1, 1)
    assert lse.item() == pytest.approx(1.3132617, abs=1e-6)
    assert out.flatten().tolist() == pytest.approx([1.5378828, 2.5378828], abs=1e-6)
    # masking the second key leaves the first alone: out = v0 = [1, 2], lse = score 1
    out, lse = reference_attention(query, key, value, key_mask=torch.tensor([[True, False]]), scale=1.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0], abs=1e-6)
    assert lse.item() == pytest.approx(1.0, abs=1e-6)
    # the default scale is D ** -0.5: scores [0.7071068, 0]; lse = log(e^0.7071068 + 1) = log(3.0281150) = 1.1079403
    _, lse = reference_attention(query, key, value)
    assert lse.item() == pytest.approx(1.1079403, abs=1e-6)


@pytest.mark.parametrize("backend", ["math", "_native_flash", "auto"])
def test_reference_agrees_with_attention_with_lse(backend: str) -> None:
    query, key, value = _tiny_problem()
    for mask in (None, torch.tensor([[True, False]])):
        out, lse = attention_with_lse(query, key, value, key_mask=mask, scale=1.0, backend=backend)
        ref_out, ref_lse = reference_attention(query, key, value, key_mask=mask, scale=1.0)
        assert (out - ref_out).abs().max().item() <= TOLERANCES["float32"][0]
        assert (lse - ref_lse).abs().max().item() <= TOLERANCES["float32"][1]


def test_unsupported_reasons_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert "CUDA" in unsupported_reason("_native_efficient", cpu, torch.bfloat16, masked=False)
    assert "CUDA" in unsupported_reason("flash", cpu, torch.bfloat16, masked=False)
    for backend in ("_native_flash", "math", "auto"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert unsupported_reason(backend, cpu, dtype, masked=True) is None, (backend, dtype)


def test_range_scaled_diff_hand_computed() -> None:
    # reference range 4 - 0 = 4; |diff| = [0, 0, 2] / 4 = [0, 0, 0.5]: mean 1/6, max 0.5
    diff = range_scaled_diff(torch.tensor([0.0, 2.0, 6.0]), torch.tensor([0.0, 2.0, 4.0]))
    assert diff == pytest.approx({"mean": 1 / 6, "max": 0.5})
    assert range_scaled_diff(torch.tensor([math.nan]), torch.tensor([1.0]))["max"] == math.inf


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="sections"):
        DoctorSettings.from_preset(small=True, sections=("attention", "typo"))
    with pytest.raises(ValueError, match="timeout"):
        DoctorSettings.from_preset(small=True, timeout=0.0)
    with pytest.raises(ValueError, match="cpu_world"):
        DoctorSettings.from_preset(small=True, cpu_world=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--small"):
            DoctorSettings.from_preset(small=False)


def test_spent_budget_skips_and_fails(tmp_path) -> None:
    settings = DoctorSettings.from_preset(small=True, output_dir=str(tmp_path), timeout=1e-9,
                                          sections=("environment", "attention"))
    report = run_doctor(settings, progress=lambda line: None)
    sections = report["sections"]
    assert sections["environment"]["skipped"] and "time budget" in sections["environment"]["reason"]
    assert sections["transformer"]["reason"] == "not selected (--sections)"
    assert report["verdict"] == "fail" and not report["within_budget"]
    assert json.loads((tmp_path / "doctor.json").read_text())["verdict"] == "fail"


def _run_cli(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    doctor_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *argv])
    return args.func(args)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_doctor_small_through_the_cli(tmp_path) -> None:
    try:
        _run_cli(["--small", "--output-dir", str(tmp_path)])
    except SystemExit as exit_:  # a failed check: show which, from the report it wrote
        report = json.loads((tmp_path / "doctor.json").read_text())
        failed = {name: s for name, s in report["sections"].items() if s.get("verdict") in ("fail", "error")}
        pytest.fail(f"doctor --small exited with {exit_.code}: {json.dumps(failed)[:3000]}")
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["verdict"] == "pass" and report["device"] == "cpu-small"
    assert report["within_budget"] and 0 < report["wall_s"] < 120
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    for name, section in sections.items():
        assert section["wall_s"] >= 0, name

    environment = sections["environment"]
    assert environment["torch"] == torch.__version__ and environment["device_count"] == 0
    assert environment["cpu"]["logical_cpus"] >= 1 and environment["flash_attn"]["available"] in (True, False)

    attention = sections["attention"]
    assert attention["verdict"] == "pass"
    assert attention["dtypes"]["float32"] == "checked" and attention["dtypes"]["bfloat16"] == "checked"
    ran = [row for row in attention["rows"] if row["status"] != "skipped"]
    assert {row["backend"] for row in ran} == {"auto", "_native_flash", "math"}
    assert {(row["seq_q"], row["seq_k"]) for row in ran} == {(1027, 1027), (37, 61)}
    assert {row["masked"] for row in ran} == {True, False}
    for row in ran:
        assert row["status"] == "pass", row
        assert 0 <= row["out_max_abs_err"] <= row["out_tolerance"], row
        assert 0 <= row["lse_max_abs_err"] <= row["lse_tolerance"], row
        assert row["time_s"] > 0, row
    skipped = [row for row in attention["rows"] if row["status"] == "skipped"]
    assert {row["backend"] for row in skipped} == {"_native_efficient", "flash"}
    assert all(row["reason"] for row in skipped)

    transformer = sections["transformer"]
    assert transformer["verdict"] == "pass"
    assert transformer["model"]["config"]["num_layers"] == 2 and transformer["model"]["parameters"] > 0
    assert set(transformer["eager"]) == {"128x128", "176x176"}
    for size, entry in transformer["eager"].items():
        for name in ("stock", "ours"):
            assert entry[name]["time_s"] > 0 and entry[name]["memory"]["peak_bytes"] > 0, (size, name)
            done = transformer["compiled"]["sizes"][size][name]
            assert done["time_s"] > 0 and done["first_call_s"] > 0 and done["compile_s"] >= 0, (size, name)
            assert done["vs_eager_stock"]["max"] <= 1e-4, (size, name)
        assert entry["overhead_ratio"] > 0 and entry["ours_vs_stock"]["max"] <= 1e-4, size
    assert transformer["compiled"]["backend"] == "aot_eager" and transformer["compiled"]["graph_breaks"] == 0

    teacache = sections["teacache"]
    assert teacache["steps"] == 10 and teacache["threshold"] == 0.2
    assert teacache["uncached_s"] > 0 and teacache["teacache_s"] > 0 and teacache["speedup"] > 0
    assert 1 <= teacache["ideal_speedup"] and teacache["computed_calls"] <= teacache["transformer_calls"] == 20
    for branch in ("cond", "uncond"):  # the first and the last step are always computed
        assert {0, 9} <= set(teacache["computed_steps"][branch]), teacache["computed_steps"]

    multi_gpu = sections["multi_gpu"]
    assert multi_gpu["skipped"] is True and "GPU" in multi_gpu["reason"]

    markdown = (tmp_path / "doctor.md").read_text()
    assert "doctor: PASS" in markdown and "### attention" in markdown and "### transformer" in markdown


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_multi_gpu_section_runs_on_gloo(tmp_path) -> None:
    # The section a GPU run only reaches with >= 2 GPUs, proven on 2 gloo CPU processes with the tiny model.
    settings = DoctorSettings.from_preset(small=True, output_dir=str(tmp_path), sections=("multi_gpu",),
                                          cpu_world=2, multi_gpu_worlds=(2,))
    report = run_doctor(settings, progress=lambda line: None)
    section = report["sections"]["multi_gpu"]
    assert section["verdict"] == "pass", section
    (world,) = section["worlds"]
    rows = {row["mode"]: row for row in world["rows"]}
    assert set(rows) == {"1 device", "Ulysses 2", "Ring 2"}
    for name in ("Ulysses 2", "Ring 2"):
        row = rows[name]
        assert row["time_s"] > 0 and row["speedup"] > 0, row
        assert row["parity"]["max"] <= 1e-4 and row["parity_ok"], row
        assert row["bytes_sent"] > 0 and row["bytes_ratio"] == pytest.approx(1.0), row  # 64 tokens split evenly


def test_plan_modes() -> None:
    from diffusers_qwen_sp.doctor import plan_modes

    # USP from 4 processes (Ulysses P/2 x Ring 2); a Ulysses degree that does not divide the heads is not run
    assert plan_modes(2, 24) == [("Ulysses 2", 2, 1, ""), ("Ring 2", 1, 2, "")]
    assert [mode[:3] for mode in plan_modes(8, 24)] == [("Ulysses 8", 8, 1), ("Ring 8", 1, 8),
                                                        ("Ulysses 4 x Ring 2", 4, 2)]
    assert plan_modes(5, 24)[0][3] == "Ulysses degree 5 does not divide the 24 heads"

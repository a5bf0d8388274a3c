"""`python -m diffusers_qwen_sp bench-serve --quick`, end to end: real services on free ports, real HTTP clients.

No timing thresholds (the machine may be loaded): every row measured with positive numbers, p50 <= p95, every target
the quotient of the numbers of its rows, the three files written, and no process of the run left behind.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffusers_qwen_sp.bench.serving import (
    PRESETS,
    ServeBenchSettings,
    ServerSpec,
    is_alive,
    point_at,
    server_command,
    target_ratios,
)
from diffusers_qwen_sp.cli import build_parser, main
from diffusers_qwen_sp.cli.bench_serve import settings_from_args


for _module in ("fastapi", "uvicorn", "multipart", "httpx"):
    pytest.importorskip(_module)

QUICK = ServeBenchSettings(**PRESETS["quick"])
SERVER_KEYS = ["batch-dp1", "nobatch-dp1"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench-serve")
    assert main(["bench-serve", "--quick", "--output-dir", str(output)]) == 0
    return json.loads((output / "serve.json").read_text()), output


def _rows(report: dict) -> dict[str, dict]:
    return {row["key"]: row for row in report["rows"]}


@pytest.mark.timeout(180)
def test_every_row_is_measured_with_positive_numbers(quick):
    report, _ = quick
    rows = _rows(report)
    assert list(rows) == [*SERVER_KEYS, "in-process", "generate"]
    counts = dict(zip(QUICK.concurrencies, QUICK.requests))
    for key, row in rows.items():
        assert row["status"] == "ok", row
        expected = list(QUICK.concurrencies) if row["kind"] == "server" else [1]
        assert [point["concurrency"] for point in row["points"]] == expected, key
        for point in row["points"]:
            requests = QUICK.generate_runs if key == "generate" else counts[point["concurrency"]] * QUICK.rounds
            assert point["requests"] == point["images"] == requests and point["errors"] == 0, (key, point)
            assert len(point["latencies_s"]) == requests and min(point["latencies_s"]) > 0
            assert point["images_per_s"] > 0 and point["wall_s"] > 0
            assert 0 < point["latency_p50_s"] <= point["latency_p95_s"] <= max(point["latencies_s"]), (key, point)
            # images/s is images over the summed wall-clock of the rounds
            assert point["images_per_s"] == pytest.approx(point["images"] / point["wall_s"])
            # one image per pipeline call without batching (counted by the service), at least one with it
            if row.get("batching") is not True:
                assert point["images_per_batch"] == 1.0, (key, point)
            assert 1.0 <= point["images_per_batch"] <= QUICK.max_batch_size, (key, point)
            assert point["cpu_s_per_image"] > 0, (key, point)
    assert rows["batch-dp1"]["max_batch_size"] == QUICK.max_batch_size and rows["nobatch-dp1"]["max_batch_size"] == 1
    assert all(row["threads_per_process"] >= 1 for row in rows.values())
    assert report["threads_per_process"] == rows["in-process"]["threads_per_process"]  # the service's own choice
    assert report["inputs"]["steps"] == QUICK.steps and report["inputs"]["width"] == 64


@pytest.mark.timeout(180)
def test_targets_are_the_ratios_of_their_rows(quick):
    report, _ = quick
    rows, targets, top = _rows(report), report["targets"], max(QUICK.concurrencies)
    batching = point_at(rows["batch-dp1"], top)["images_per_s"] / point_at(rows["nobatch-dp1"], top)["images_per_s"]
    assert targets["batching_speedup"]["value"] == pytest.approx(batching)
    assert targets["batching_speedup"]["passed"] == (batching >= 2.0)
    cpu = point_at(rows["nobatch-dp1"], top)["cpu_s_per_image"] / point_at(rows["batch-dp1"], top)["cpu_s_per_image"]
    assert targets["batching_speedup"]["cpu_time_value"] == pytest.approx(cpu)
    # The overhead target reads the batching server (it waits for batch-mates) against the in-process call.
    overhead = point_at(rows["batch-dp1"], 1)["latency_p50_s"] / point_at(rows["in-process"], 1)["latency_p50_s"] - 1
    assert targets["server_overhead"]["value"] == pytest.approx(overhead)
    assert targets["server_overhead"]["passed"] == (overhead <= 0.10)
    cpu = point_at(rows["batch-dp1"], 1)["cpu_s_per_image"] / point_at(rows["in-process"], 1)["cpu_s_per_image"] - 1
    assert targets["server_overhead"]["cpu_time_value"] == pytest.approx(cpu)
    assert targets["dp_speedup"]["value"] is None and targets["dp_speedup"]["passed"] is None
    assert targets["dp_speedup"]["status"] == "skipped: no dp 2 row in this run"


@pytest.mark.timeout(180)
def test_markdown_and_png_are_written(quick):
    report, output = quick
    markdown = (output / "serve.md").read_text()
    assert "| configuration | processes | concurrency |" in markdown
    for row in report["rows"]:
        assert f"| {row['name']} |" in markdown
    assert "| batching on / off, images/s at concurrency 4 (dp 1) |" in markdown and ">= 2x" in markdown
    with Image.open(output / "serve.png") as plot:
        assert plot.format == "PNG" and plot.width >= 800
    assert report["files"]["plot"] == str(output / "serve.png")


@pytest.mark.timeout(180)
def test_no_process_of_the_run_is_left(quick):
    report, _ = quick
    for key in SERVER_KEYS:
        row = _rows(report)[key]
        assert row["pids"] and row["pids_alive_after_stop"] == [], row
        assert not [pid for pid in row["pids"] if is_alive(pid)]
        assert row["exit_code"] == 0 and row["drained"], row  # drained on SIGTERM, not killed


def test_settings_presets_and_commands():
    with pytest.raises(ValueError, match="must include 1"):
        ServeBenchSettings(concurrencies=(4, 16), requests=(8, 16))
    with pytest.raises(ValueError, match="one count per concurrency"):
        ServeBenchSettings(requests=(10, 20))
    with pytest.raises(ValueError, match=r"as many requests as clients, got \(clients, requests\) \[\(16, 8\)\]"):
        ServeBenchSettings(requests=(4, 8, 8))
    args = build_parser().parse_args(["bench-serve", "--quick", "--dp-degrees", "1", "2", "--batching", "on"])
    settings = settings_from_args(args)
    assert settings.preset == "quick" and settings.dp_degrees == (1, 2) and settings.batching == (True,)
    assert [spec.key for spec in settings.servers] == ["batch-dp1", "batch-dp2"]
    two = server_command(ServerSpec(dp=2, max_batch_size=16, batch_wait_ms=10), settings)
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert two[two.index("--dp-degree") + 1] == "2" and two[two.index("--port") + 1] == "0"
    one = server_command(ServerSpec(dp=1, max_batch_size=1, batch_wait_ms=0), settings)
    assert "--dp-degree" not in one and one[one.index("--max-batch-size") + 1] == "1"


def _row(key: str, kind: str, dp: int | None, batching: bool | None, points: dict[int, tuple[float, float]],
         status: str = "ok") -> dict:
    """A report row; `points` maps concurrency -> (images/s, p50 latency)."""
    return dict(key=key, name=key, kind=kind, dp=dp, batching=batching, status=status, reason="dp 2 failed",
                points=[dict(concurrency=c, images_per_s=rate, latency_p50_s=p50) for c, (rate, p50) in points.items()])


def test_targets_from_hand_made_rows():
    rows = [
        _row("batch-dp1", "server", 1, True, {1: (2.0, 0.50), 16: (9.0, 1.8)}),
        _row("nobatch-dp1", "server", 1, False, {1: (2.1, 0.48), 16: (3.0, 5.0)}),
        _row("batch-dp2", "server", 2, True, {1: (2.0, 0.5), 16: (15.3, 1.0)}),
        _row("in-process", "in-process", None, None, {1: (2.2, 0.40)}),
    ]
    targets = target_ratios(rows, 16)
    assert targets["batching_speedup"]["value"] == pytest.approx(3.0)  # 9 / 3
    assert targets["batching_speedup"]["status"] == "pass"
    assert targets["server_overhead"]["value"] == pytest.approx(0.25)  # 0.50 / 0.40 - 1
    assert targets["server_overhead"]["status"] == "FAIL"
    assert targets["dp_speedup"]["value"] == pytest.approx(1.7)  # 15.3 / 9
    assert targets["dp_speedup"]["numerator"]["row"] == "batch-dp2"
    assert targets["dp_speedup"]["cpu_time_value"] is None  # no CPU seconds in these rows
    rows[2]["status"] = "skipped"
    skipped = target_ratios(rows, 16)["dp_speedup"]
    assert skipped["value"] is None and skipped["status"] == "skipped: dp 2: skipped: dp 2 failed"

"""The CPU thread choice: by the size of the work, the cores and the processes sharing them (worked by hand)."""

from __future__ import annotations

import pytest
import torch

from diffusers_qwen_sp.threads import SMALL_WORK, apply_cpu_threads, choose_cpu_threads


def test_small_work_gets_one_thread_whatever_the_cores():
    # the scene model: 8x8 = 64 image tokens x 4 heads x 32 = 128 wide -> 8,192 < SMALL_WORK
    for cores in (1, 2, 64):
        choice = choose_cpu_threads(image_tokens=64, width=128, cores=cores)
        assert choice.num_threads == 1 and "small work" in choice.reason
    assert 64 * 128 < SMALL_WORK <= 1024 * 3072  # real Qwen-Image (1024 tokens x 3072) is never "small"


def test_large_work_shares_the_cores_between_processes():
    # 1328x1328 px -> 83x83 = 6,889 tokens x 3,072 wide
    assert choose_cpu_threads(image_tokens=6889, width=3072, cores=16).num_threads == 16
    assert choose_cpu_threads(image_tokens=6889, width=3072, cores=16, processes_per_host=4).num_threads == 4
    assert choose_cpu_threads(image_tokens=6889, width=3072, cores=2, processes_per_host=4).num_threads == 1


def test_a_requested_count_wins_and_is_validated():
    choice = choose_cpu_threads(image_tokens=64, width=128, requested=2, cores=2)
    assert (choice.num_threads, choice.reason) == (2, "requested")
    assert str(choice) == "2 intra-op threads (requested)"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            choose_cpu_threads(image_tokens=64, width=128, requested=bad)


def test_apply_sets_torch_threads():
    previous = torch.get_num_threads()
    try:
        for count in (2, 1):
            assert apply_cpu_threads(choose_cpu_threads(64, 128, requested=count)).num_threads == count
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(previous)

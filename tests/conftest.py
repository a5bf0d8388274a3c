"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors are tiny: one thread is as fast as two, and far faster when other processes compete for the 2 CI
    # cores (spinning OpenMP workers made single calls take 5-15 s instead of 0.3 s on a loaded machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

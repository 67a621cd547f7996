"""Shared set-up for the tests."""
from __future__ import annotations

import pytest
import torch

# The tests run small tensors on shared CPUs: with several intra-op threads competing for busy cores
# a 32x32 forward took seconds instead of ~50 ms. One thread is faster here and reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)

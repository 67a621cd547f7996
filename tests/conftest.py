"""Shared set-up for the tests."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

import elanet.kernels as kernels

# The tests run small tensors on shared CPUs: with several intra-op threads competing for busy cores
# a 32x32 forward took seconds instead of ~50 ms. One thread is faster here and reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


# the native CPU kernels (src/elanet/kernels) need Linux and a C compiler
CAN_BUILD = sys.platform.startswith("linux") and shutil.which("cc") is not None


@pytest.fixture
def use_kernels(monkeypatch):
    """Switch the native kernels on (build them) or off for one test, then restore the module state."""
    monkeypatch.setattr(kernels, "_tried", kernels._tried)
    monkeypatch.setattr(kernels, "_lib", kernels._lib)
    monkeypatch.setattr(kernels, "_error", kernels._error)

    def switch(on: bool) -> None:
        kernels._tried, kernels._lib = (not on, None) if not on else (False, None)
        if on:
            monkeypatch.delenv("ELANET_KERNELS", raising=False)
            assert kernels.epilogue_lib() is not None, kernels.build_error()

    return switch

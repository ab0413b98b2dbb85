"""Shared test set-up: fast hypothesis profile, deterministic torch, small thread count."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    # derandomize: CI runs the same examples every time (no new random draw can turn it red)
    "foveal", deadline=None, derandomize=True, max_examples=int(os.environ.get("FOVEAL_HYPOTHESIS_EXAMPLES", "30")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("foveal")
# Tests use tiny models, for which one thread is fastest and deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

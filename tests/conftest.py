"""Shared test set-up: fast hypothesis profile, deterministic torch, small thread count."""

from __future__ import annotations

import os
import sys

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


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for third-party plugin distributions written by a test (``tp_*``
    modules), with every third-party plugin allowed; the modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FOVEAL_LOAD_PLUGINS", raising=False)
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[mod]

"""`foveal demo --quick` end to end, and its report looked at in headless Chromium.

The run writes to ``demo-output/`` at the repository root (git-ignored) so that CI keeps the
report and its screenshot as artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foveal.cli import main

from .browser import chromium_path, inspect_page, screenshot

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-output"


@pytest.fixture(scope="module")
def demo():
    assert main(["demo", "--quick", "--out", str(OUT)]) == 0
    return json.loads((OUT / "summary.json").read_text())


@pytest.mark.heavy
def test_demo_runs_every_step(demo):
    seg = demo["segmentation"]["SynthA"]
    assert seg["meanDice"] > 0.5 and seg["dice@0.5"] > 0.5  # far above an empty prediction (0)
    explained = demo["segmenter_explanations"]
    for method in ("grad-cam", "grad-cam++", "score-cam", "abs-cam", "attention-guided-cam", "xgrad-cam",
                   "layer-cam", "smoothgrad-cam++"):
        row = explained[method]
        assert 0 <= row["deletion"] <= 1 and 0 <= row["insertion"] <= 1, row
    assert set(demo["pooling"]["accuracy"]) == {"gap", "ca"}
    assert demo["wsss"]["refined_miou"] > demo["wsss"]["seed_miou"]
    assert (OUT / "report.html").stat().st_size > 10_000


@pytest.mark.heavy
def test_report_opens_in_chromium(demo):
    if chromium_path() is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get (not root or no apt)")
    page = inspect_page(OUT / "report.html")
    assert len(page["images"]) >= 5
    assert all(i["complete"] and i["w"] > 0 for i in page["images"]), page["images"]
    assert page["tables"] and all(t["rows"] > 0 for t in page["tables"]), page["tables"]
    screenshot(OUT / "report.html", OUT / "report-screenshot.png", height=6000)

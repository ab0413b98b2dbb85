"""The HTML report, opened in headless Chromium: every image loads, every table has rows."""

from __future__ import annotations

import numpy as np
import pytest

from foveal.report import Report, plot_curves

from .browser import chromium_path, inspect_page, screenshot


def make_report(path):
    rng = np.random.default_rng(0)
    r = Report("foveal test report", "synthetic")
    r.section("Curves").image(plot_curves({"loss": [1.0, 0.5, 0.3]}, ylabel="loss"), "training loss")
    r.section("Pictures").image((rng.random((24, 32, 3)) * 255).astype(np.uint8), "noise <&>")
    r.table([{"method": "a", "score": 0.5}, {"method": "b", "score": float("nan"), "extra": 3}], "scores")
    return r.write(path)


def test_report_is_self_contained(tmp_path):
    page = make_report(tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "src=\"http" not in page and "<script" not in page
    assert "noise &lt;&amp;&gt;" in page and "<td>nan</td>" in page


def test_empty_table_is_an_error():
    with pytest.raises(ValueError, match="has no rows"):
        Report("x").table([], "empty")


def test_report_in_chromium(tmp_path):
    if chromium_path() is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get (not root or no apt)")
    path = make_report(tmp_path / "report.html")
    found = inspect_page(path)
    assert len(found["images"]) == 2 and all(i["complete"] and i["w"] > 0 for i in found["images"])
    assert [t["rows"] for t in found["tables"]] == [2]
    shot = screenshot(path, tmp_path / "shot.png", height=900)
    assert shot.stat().st_size > 1000

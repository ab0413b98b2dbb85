"""The README stays true: its first commands, and a table row for every registered component."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from foveal import registry

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_registered_component_has_a_readme_row():
    table = README.split("## Components", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("backbone", "decoder", "model", "pooling", "explainer", "refiner",
                                           "metric"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[1]
    for name in registry.names():
        assert name in rows, f"README component table has no row for {name!r}"
        assert rows[name] == registry.entry(name).kind, f"README says {name!r} is a {rows[name]}"
        assert registry.info(name)["doc"], f"{name} has no docstring"
    stale = sorted(set(rows) - set(registry.names()))
    assert not stale, f"README component table lists names that are not registered: {stale}"


def test_benchmarks_md_covers_every_script():
    text = (ROOT / "BENCHMARKS.md").read_text()
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert script.name in text, f"BENCHMARKS.md does not mention {script.name}"


@pytest.mark.heavy
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """The Python quickstart, executed verbatim (a full-size RTA-Former-M and ResNet-50; about a
    minute on one CPU thread), prints an insertion AUC in [0, 1] and round-trips the checkpoint."""
    block = README.split("## Python quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md quickstart", "exec"), scope)
    assert scope["logits"].shape == (1, 1, 352, 352)
    assert scope["maps"].shape == (4, 224, 224) and 0 <= float(scope["maps"].min()) <= float(scope["maps"].max()) <= 1
    auc = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= auc <= 1.0
    a, b = scope["segmenter"].state_dict(), scope["same"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The README stays true: its first commands, and a table row for every registered component."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_benchmarks_md_covers_every_script():
    text = (ROOT / "BENCHMARKS.md").read_text()
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert script.name in text, f"BENCHMARKS.md does not mention {script.name}"

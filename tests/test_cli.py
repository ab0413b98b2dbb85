"""The foveal command line: listing, info, plugins, error lines, demo."""

from __future__ import annotations

import pytest

from foveal.cli import main


def test_list_and_kind_filter(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "timm-backbone" in out and "gap" in out
    assert main(["list", "--kind", "pooling"]) == 0
    out = capsys.readouterr().out
    assert "gap" in out and "timm-backbone" not in out


def test_info_shows_fields(capsys):
    assert main(["info", "timm_backbone"]) == 0
    out = capsys.readouterr().out
    assert "timm-backbone  (backbone" in out and "model_name: str = 'resnet50'" in out


def test_errors_are_one_line_without_traceback(capsys):
    assert main(["info", "timm-backbon"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean: timm-backbone" in err and "Traceback" not in err


def test_debug_shows_the_exception():
    from foveal.core.errors import RegistryError

    with pytest.raises(RegistryError):
        main(["--debug", "info", "nope"])


def test_plugins(capsys):
    assert main(["plugins"]) == 0
    assert "foveal.plugins.pooling  [foveal" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: foveal" in capsys.readouterr().out

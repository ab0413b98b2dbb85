"""The example third-party plugin, installed with pip, found through its entry point."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "foveal-plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example into a private target folder (the test venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    # build from a private copy: the build writes into the source tree (build/, *.egg-info), and
    # parallel test workers must not share it
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"pip install of the example failed:\n{proc.stdout}\n{proc.stderr}"
    assert list(target.glob("foveal_plugin_example-*.dist-info"))
    return target


def run_python(code: str, site: Path, **env: str) -> str:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    environ = {**os.environ, "PYTHONPATH": path, **env}
    environ.pop("FOVEAL_LOAD_PLUGINS", None) if "FOVEAL_LOAD_PLUGINS" not in env else None
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_listed_by_foveal_plugins(installed):
    out = run_python("from foveal.cli import main; main(['plugins'])", installed)
    assert re.search(r"gradient-x-input\s+\[foveal-plugin-example 0\.1\.0\]\s+1 components", out)


def test_builds_runs_and_round_trips(installed, tmp_path):
    code = f"""
import torch, foveal
from foveal import registry
from foveal.testing import check_component, check_explainer
e = check_component("Gradient_X_Input")
assert registry.entry("input-x-gradient").distribution == "foveal-plugin-example"
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
x = torch.randn(2, 3, 8, 8)
maps = check_explainer(e, model, x, targets=[0, 2])
# gradient x input by hand
xr = x.clone().requires_grad_(True)
out = model(xr)
g, = torch.autograd.grad(out[0, 0] + out[1, 2], xr)
ref = (x * g).abs().sum(1)
ref = (ref - ref.flatten(1).min(1).values[:, None, None])
ref = ref / ref.flatten(1).max(1).values[:, None, None]
assert torch.allclose(maps, ref, atol=1e-5), (maps - ref).abs().max()
foveal.save(e, r"{tmp_path / 'gxi.safetensors'}")
meta = foveal.core.checkpoint.read_metadata(r"{tmp_path / 'gxi.safetensors'}")
assert meta["plugin"] == "foveal-plugin-example" and meta["plugin_version"] == "0.1.0", meta
print(type(foveal.load(r"{tmp_path / 'gxi.safetensors'}")).__name__)
"""
    assert run_python(code, installed).strip() == "GradientXInput"


def test_tutorial_contract_test_passes(installed):
    """The test shown in CONTRIBUTING.md ("Writing a plugin", step 4) passes on the example."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("**4. Test it**", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "def test_contract" in block
    assert run_python(block + "\ntest_contract()\nprint('ok')\n", installed).strip() == "ok"


def test_env_var_can_exclude_it(installed):
    code = "from foveal import registry; print(registry.has('gradient-x-input'))"
    assert run_python(code, installed, FOVEAL_LOAD_PLUGINS="").strip() == "False"
    assert run_python(code, installed, FOVEAL_LOAD_PLUGINS="foveal-plugin-example").strip() == "True"


def test_checkpoint_of_uninstalled_plugin_names_the_package(installed, tmp_path):
    path = tmp_path / "gxi.safetensors"
    run_python(f"import foveal; from foveal import registry; "
               f"foveal.save(registry.build('gradient-x-input'), r'{path}')", installed)
    import foveal  # this process does not have the plugin on its path
    from foveal.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"pip install foveal-plugin-example==0\.1\.0"):
        foveal.load(path)


def test_docs_hook_reference_matches_hookspecs():
    from foveal.registry import hookspecs

    specs = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "foveal_spec")}
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Hook reference", 1)[1]
    documented = set(re.findall(r"^### `(\w+)\(", section, flags=re.M))
    assert specs == documented == {"register_components"}
    for name in specs:
        sig = str(inspect.signature(getattr(hookspecs, name)))
        assert f"`{name}{sig}`" in section

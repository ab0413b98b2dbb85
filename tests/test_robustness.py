"""Issue 17 items 5 and 6: grad modes, plugins that exit, dtype and mask-size mismatches.

Each test here failed before the fix (the behaviour is described in each docstring).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from foveal import registry
from foveal.core.errors import InputError, PluginWarning
from foveal.metrics.explanation import insertion
from foveal.registry import Registry
from tests.test_registry import GOOD, make_dist


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


EXPLAINERS = ["grad-cam", "grad-cam++", "score-cam", "layer-cam"]


# ---------------------------------------------------------------------------------------------
# Grad modes (item 5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPLAINERS)
def test_explainers_under_no_grad_and_inference_mode(name):
    """Before: gradient explainers under inference_mode failed with "element 0 of tensors does
    not require grad" (and with inference-mode images even outside it)."""
    model = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    e = registry.build(name, target_layer="conv")
    expected = e.explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(e.explain(model, x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor
        maps = e.explain(model, x_inf)
        assert torch.is_inference_mode_enabled(), "the caller's mode is restored"
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    torch.testing.assert_close(e.explain(model, x_inf), expected, rtol=0, atol=0)  # inference images, normal mode
    assert all(p.grad is None for p in model.parameters())


def test_inference_mode_model_is_a_clear_error():
    """A model built under inference_mode has inference-tensor parameters: gradient explainers
    cannot use them (one-line error saying what to do); gradient-free ones still work."""
    with torch.inference_mode():
        model = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(InputError, match="inference tensors.*outside inference mode") as e:
        registry.build("grad-cam", target_layer="conv").explain(model, x)
    assert "\n" not in str(e.value)
    maps = registry.build("score-cam", target_layer="conv").explain(model, x)
    assert maps.shape == (2, 12, 12)


@pytest.mark.parametrize("name", ["insertion", "road"])
def test_metrics_under_no_grad_and_inference_mode(name):
    model = Net().eval()
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    metric = registry.build(name, **({"steps": 8} if name == "insertion" else {"score": "probability"}))
    expected = metric(model, x, s)
    with torch.no_grad():
        torch.testing.assert_close(metric(model, x, s), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(metric(model, x.clone(), s.clone()), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Plugins that exit (item 6)
# ---------------------------------------------------------------------------------------------


def load(reg: Registry) -> list:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        reg.load()
    return [x for x in w if issubclass(x.category, PluginWarning)]


@pytest.mark.parametrize("where", ["import", "hook"])
def test_plugin_calling_sys_exit_is_isolated(site, where):
    """Before: SystemExit (not an Exception) went through the isolation and ended the program."""
    if where == "import":
        make_dist(site, "tp-exit", "tp_exit", "import sys\nsys.exit(3)\n")
    else:
        make_dist(site, "tp-exit", "tp_exit", GOOD.format(name="exit-one", alias="exit-alias").replace(
            'register("exit-one"', 'register("exit-one", Const)\n    import sys\n    sys.exit(3)\n    register("x"'))
    make_dist(site, "tp-good", "tp_good", GOOD.format(name="const-metric", alias="constant"))
    reg = Registry()
    caught = load(reg)
    assert reg.has("const-metric") and reg.has("gap") and not reg.has("exit-one") and not reg.has("exit-alias")
    assert any("tp-exit" in str(w.message) and "sys.exit(3)" in str(w.message) for w in caught)
    info = [p for p in reg.list_plugins() if p.distribution == "tp-exit"][0]
    assert info.components == [] and "SystemExit" in info.error


def test_keyboard_interrupt_propagates_and_leaves_no_half_loaded_registry(site):
    """Before: an exception escaping load() left the registry marked loaded with only the
    plugins before it: later lookups silently missed components."""
    make_dist(site, "tp-ctrlc", "tp_ctrlc", "raise KeyboardInterrupt\n")
    reg = Registry()
    with pytest.raises(KeyboardInterrupt):
        reg.load()
    assert not reg._loaded and not reg._entries
    (site / "tp_ctrlc.py").write_text(GOOD.format(name="back-again", alias="again"))
    sys.modules.pop("tp_ctrlc", None)
    load(reg)
    assert reg.has("back-again") and reg.has("gap")


# ---------------------------------------------------------------------------------------------
# dtype mismatches (item 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_image_dtype_differs_from_the_model(dtype):
    """Before: torch's "Input type (double) and bias type (float) should be the same" from deep
    inside the forward (or a silent half-precision map)."""
    model = Net().eval()
    x, s = torch.randn(2, 3, 8, 8, dtype=dtype), torch.rand(2, 8, 8)
    for call in (lambda: registry.build("grad-cam", target_layer="conv").explain(model, x),
                 lambda: registry.build("score-cam", target_layer="conv").explain(model, x),
                 lambda: insertion(model, x, s, steps=4),
                 lambda: registry.build("road")(model, x, s)):
        with pytest.raises(InputError, match=rf"images: dtype {dtype} does not match the model's parameters "
                                             r"\(torch.float32\); convert") as e:
            call()
        assert "\n" not in str(e.value)
    model.to(dtype)
    assert registry.build("grad-cam", target_layer="conv").explain(model, x).dtype == dtype


def test_ambiguous_model_dtypes_are_not_checked():
    model = Net().eval()
    model.bn.double()  # mixed float32 / float64 parameters: no single dtype to ask for
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError) as e:  # torch's own error, not a foveal guess
        registry.build("grad-cam", target_layer="conv").explain(model, x)
    assert not isinstance(e.value, InputError)


# ---------------------------------------------------------------------------------------------
# Pointing-game mask sizes (item 6)
# ---------------------------------------------------------------------------------------------
def test_pointing_game_mask_size_mismatch():
    """Before: "saliency: expected shape (2, 16, 16) to match the images", naming images that
    the pointing game never sees."""
    pg = registry.build("pointing-game")
    with pytest.raises(InputError, match=r"saliency \(2, 8, 8\) and masks \(2, 16, 16\): expected masks of the "
                                         r"maps' size.*resize") as e:
        pg(torch.rand(2, 8, 8), torch.ones(2, 16, 16, dtype=torch.bool))
    assert "\n" not in str(e.value) and "images" not in str(e.value)
    with pytest.raises(InputError, match="expected one mask per map, got 2 maps and 1 masks"):
        pg(torch.rand(2, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match=r"masks \(2, 16, 16\)"):
        registry.build("saliency-segmentation")(torch.rand(2, 8, 8), torch.ones(2, 16, 16, dtype=torch.bool))
    assert pg(torch.rand(2, 1, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)).shape == (2,)

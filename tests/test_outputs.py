"""Models whose output is not a plain logits tensor (issue 16, targets beyond classification).

A Hugging Face-style model (a dataclass with ``.logits``, or a ``ModelOutput``-like ordered
dict), a torchvision-style segmentation model (``{"out": ..., "aux": ...}``) and a
tuple-returning model must give, with every explainer and explanation metric, exactly what the
same network returning the bare tensor gives (automatic selection); anything else is chosen
with ``output_selector=`` (a key, an index or a callable) or a clear one-line error.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from foveal import registry
from foveal.core import OutputSelector, SegmentationTarget, select_output, target_scores
from foveal.core.errors import InputError
from foveal.metrics.sanity import mprt
from foveal.testing import check_explainer


@dataclass
class DataclassOutput:  # transformers' ImageClassifierOutput shape: loss, logits, hidden states
    logits: torch.Tensor
    hidden_states: tuple | None = None
    loss: torch.Tensor | None = None


class ModelOutput(OrderedDict):
    """The behaviour of transformers.utils.ModelOutput that matters: a mapping with attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class Net(nn.Module):
    """One network, several output containers; ``kind`` selects the container."""

    def __init__(self, kind: str = "tensor", classes: int = 4, segmentation: bool = False) -> None:
        super().__init__()
        self.kind, self.segmentation = kind, segmentation
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.head = nn.Conv2d(8, classes, 1) if segmentation else nn.Linear(8, classes)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        y = self.head(f) if self.segmentation else self.head(f.mean((2, 3)))
        if self.kind == "dataclass":
            return DataclassOutput(logits=y, hidden_states=(f,))
        if self.kind == "modeloutput":
            return ModelOutput(logits=y, hidden_states=(f,))
        if self.kind == "dict":  # torchvision segmentation models
            return {"out": y, "aux": f}
        if self.kind == "tuple":
            return (y, f)
        if self.kind == "custom":  # needs an explicit selector
            return {"pred": y, "features": f}
        if self.kind == "second":
            return (f, y)
        return y


def twin(kind: str, **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = Net("tensor", **kw).eval()
    other = Net(kind, **kw).eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


CLASSIFIERS = ["dataclass", "modeloutput", "dict", "tuple"]


def test_select_output_rules_and_errors():
    y, f = torch.randn(2, 3), torch.randn(2, 5)
    assert select_output(y) is y
    assert select_output(DataclassOutput(y)) is y
    assert select_output(ModelOutput(logits=y, hidden_states=(f,))) is y
    assert select_output({"out": y, "aux": f}) is y
    assert select_output({"aux": f, "logits": y, "out": f}) is y, "'logits' before 'out'"
    assert select_output((y, f)) is y and select_output([None, y, f]) is y
    assert select_output((f, y), 1) is y and select_output((f, y), -1) is y
    assert select_output({"pred": y}, "pred") is y and select_output(DataclassOutput(f, loss=y), "loss") is y
    assert select_output({"pred": (f, y)}, lambda o: o["pred"][1]) is y
    cases = [
        (({"pred": y}, None), r"got a dict with keys \['pred'\].*output_selector="),
        ((None, None), "got a NoneType"),
        (((y, f), 2), r"output_selector=2: the model returned a tuple"),
        (({"out": y}, "logits"), "has no key or attribute 'logits'"),
        (({"pred": "text"}, "pred"), "selected a str, expected a tensor"),
        ((y, 1.5), "expected None .*got float"),
        ((y, True), "got bool"),
    ]
    for (output, selector), message in cases:
        with pytest.raises(InputError, match=message) as e:
            select_output(output, selector)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", CLASSIFIERS)
@pytest.mark.parametrize("name", ["grad-cam", "score-cam", "grad-cam++"])
def test_explainers_select_the_logits(kind, name):
    plain, other = twin(kind)
    x = torch.randn(2, 3, 12, 12)
    e = registry.build(name, target_layer="conv")
    expected = e.explain(plain, x)
    torch.testing.assert_close(check_explainer(e, other, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(e.explain(other, x, [1, 2]), e.explain(plain, x, [1, 2]), rtol=0, atol=0)


def test_automatic_layer_choice_and_target_scores_on_raw_outputs():
    plain, other = twin("dataclass")
    x = torch.randn(2, 3, 12, 12)
    e = registry.build("grad-cam")  # no target_layer: the probe forward sees the selected tensor
    torch.testing.assert_close(e.explain(other, x), e.explain(plain, x), rtol=0, atol=0)
    torch.testing.assert_close(target_scores(other(x), [0, 3]), target_scores(plain(x), [0, 3]))


@pytest.mark.parametrize("name", ["grad-cam", "score-cam"])
def test_torchvision_style_segmentation_dict(name):
    plain, other = twin("dict", classes=3, segmentation=True)
    x = torch.randn(2, 3, 10, 10)
    e = registry.build(name, target_layer="conv")
    torch.testing.assert_close(e.explain(other, x), e.explain(plain, x), rtol=0, atol=0)
    t = SegmentationTarget(2)
    torch.testing.assert_close(e.explain(other, x, t), e.explain(plain, x, t), rtol=0, atol=0)


def test_explicit_selector_for_other_outputs():
    plain, custom = twin("custom")
    _, second = twin("second")
    x = torch.randn(2, 3, 12, 12)
    e = registry.build("grad-cam", target_layer="conv")
    expected = e.explain(plain, x)
    with pytest.raises(InputError, match=r"keys \['pred', 'features'\].*output_selector=") as err:
        e.explain(custom, x)
    assert "\n" not in str(err.value)
    assert not custom._forward_hooks, "the selector hook is removed after a failure too"
    torch.testing.assert_close(e.explain(custom, x, output_selector="pred"), expected, rtol=0, atol=0)
    torch.testing.assert_close(e.explain(custom, x, output_selector=lambda o: o["pred"]), expected, rtol=0, atol=0)
    # automatic takes the first tensor of a tuple (documented); (features, logits) needs the index
    assert not torch.equal(e.explain(second, x), expected)
    torch.testing.assert_close(e.explain(second, x, output_selector=1), expected, rtol=0, atol=0)
    with pytest.raises(InputError, match="output_selector: expected None"):
        e.explain(plain, x, output_selector=1.0)


@pytest.mark.parametrize("kind", [*CLASSIFIERS, "custom"])
@pytest.mark.parametrize("name", ["insertion", "deletion", "average-drop", "perturbation-auc", "road"])
def test_metrics_select_the_logits(kind, name):
    plain, other = twin(kind)
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    kw = {"insertion": {"steps": 8}, "deletion": {"steps": 8},
          "road": {"score": "probability", "fractions": (0.2, 0.6)}}
    metric = registry.build(name, **kw.get(name, {}))
    selector = "pred" if kind == "custom" else None
    torch.testing.assert_close(metric(other, x, s, output_selector=selector), metric(plain, x, s), rtol=0, atol=0)
    assert not other._forward_hooks


def test_metric_on_segmentation_dict_and_curve():
    plain, other = twin("dict", classes=3, segmentation=True)
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    ins = registry.build("insertion", steps=8)
    torch.testing.assert_close(ins(other, x, s), ins(plain, x, s), rtol=0, atol=0)
    torch.testing.assert_close(ins.curve(other, x, s)[1], ins.curve(plain, x, s)[1], rtol=0, atol=0)


def test_output_selector_wrapper_and_mprt():
    plain, other = twin("custom")
    x = torch.randn(3, 3, 12, 12)
    wrapped = OutputSelector(other, "pred")
    torch.testing.assert_close(wrapped(x), plain(x))
    e = registry.build("grad-cam", target_layer="model.conv")
    torch.testing.assert_close(e.explain(wrapped, x), registry.build("grad-cam", target_layer="conv").explain(plain, x))
    a = mprt(plain, registry.build("grad-cam", target_layer="conv"), x)
    b = mprt(other, registry.build("grad-cam", target_layer="conv"), x, output_selector="pred")
    torch.testing.assert_close(a.per_layer["spearman"], b.per_layer["spearman"], rtol=0, atol=0)

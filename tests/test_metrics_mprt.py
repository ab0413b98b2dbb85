"""MPRT summary (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018) against
Quantus' ``MPRT`` on a tiny model: the same layers, the same re-initialisation (each layer's
``reset_parameters`` under ``torch.manual_seed(seed + 1)`` in Quantus, ``layer_seeds`` here),
the same per-layer Spearman correlations per image."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.metrics.sanity import MPRTResult, model_randomisation, mprt, mprt_table


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


class Gradient:
    """|d score / d x| summed over channels: a map that depends on every layer."""

    def explain(self, model, images, targets):
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            score = out.gather(1, torch.tensor(targets)[:, None]).sum()
            (g,) = torch.autograd.grad(score, x)
        m = g.abs().sum(1)
        return m / m.flatten(1).amax(1)[:, None, None]


def quantus_mprt(model, explainer, x, order, **kw):
    quantus = pytest.importorskip("quantus")
    y = model(x).argmax(1).numpy()

    def explain_func(model, inputs, targets, **_):
        return explainer.explain(model, torch.as_tensor(inputs), [int(t) for t in targets]).numpy()[:, None]

    with warnings.catch_warnings(), torch.random.fork_rng():  # Quantus seeds torch's global generator
        warnings.simplefilter("ignore")
        return quantus.MPRT(seed=42, layer_order=order, disable_warnings=True, **kw)(
            model=model, x_batch=x.numpy(), y_batch=y, explain_func=explain_func, device="cpu", batch_size=2)


@pytest.mark.parametrize("mode,order", [("cascading", "top_down"), ("independent", "independent")])
@pytest.mark.parametrize("explainer", ["grad-cam", "gradient"])
def test_mprt_equals_quantus(mode, order, explainer):
    model = tiny_model()
    x = torch.randn(5, 3, 12, 12)
    e = Gradient() if explainer == "gradient" else registry.build("grad-cam", target_layer="2")
    theirs = quantus_mprt(model, e, x, order)
    ours = mprt(model, e, x, mode=mode, layer_seeds=[43, 43, 43], batch_size=2)
    # output side first; Quantus lists independent layers input side first (same per-layer values)
    assert ours.layers == ["6", "2", "0"] and set(theirs) == {"original", *ours.layers}
    expected = torch.tensor(np.array([theirs[k] for k in ours.layers]).T)
    torch.testing.assert_close(ours.per_layer["spearman"], expected, rtol=0, atol=1e-10)
    assert float(ours.per_layer["spearman"].abs().max()) < 0.999, "randomisation changed the maps"
    # Quantus' per-sample average also averages in the trained model's similarity (1): (1 + L mean) / (L + 1)
    avg = quantus_mprt(model, e, x, order, return_average_correlation=True)
    torch.testing.assert_close((1 + 3 * ours.mean()) / 4, torch.tensor(avg, dtype=torch.float64), rtol=0, atol=1e-10)
    last = quantus_mprt(model, e, x, order, return_last_correlation=True)  # its last listed layer
    ours_last = ours.last() if mode == "cascading" else ours.per_layer["spearman"][:, ours.layers.index("6")]
    torch.testing.assert_close(ours_last, torch.tensor(last, dtype=torch.float64), rtol=0, atol=1e-10)


def test_batching_top_k_and_model_untouched():
    model = tiny_model(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 12, 12)
    e = registry.build("grad-cam", target_layer="2")
    whole = mprt(model, e, x, top_k=2)
    chunked = mprt(model, e, x, top_k=2, batch_size=2)
    assert whole.layers == ["6", "2"]
    for k in ("spearman", "ssim"):
        assert whole.per_layer[k].shape == (5, 2)
        torch.testing.assert_close(whole.per_layer[k], chunked.per_layer[k], rtol=0, atol=1e-5)  # float32 maps
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), "the user's model is untouched"
    # independent step 1 and cascading step 1 randomise the same first layer with the same seed
    ind = mprt(model, e, x, mode="independent", top_k=2)
    torch.testing.assert_close(ind.per_layer["spearman"][:, 0], whole.per_layer["spearman"][:, 0])
    # independent: only layer 2 randomised at step 2 (restored layer 1), as a fresh copy would be
    solo = model_randomisation(model, e, x, layers=["2"], layer_seeds=[1], modes=("cascading",))
    torch.testing.assert_close(ind.per_layer["spearman"][:, 1], solo.per_image[("cascading", 1)]["spearman"])


def test_summary_table_and_errors():
    model = tiny_model(2)
    x = torch.randn(3, 3, 10, 10)
    results = {name: mprt(model, registry.build(name, target_layer="2"), x) for name in ("grad-cam", "grad-cam++")}
    table = mprt_table(results)
    assert table.count("\n") == 4 and "| grad-cam | cascading | 3 |" in table
    r = results["grad-cam"]
    assert isinstance(r, MPRTResult) and set(r.summary()) == {"mean_spearman", "last_spearman", "mean_ssim",
                                                              "last_ssim"}
    assert r.to_markdown().count("\n") == 2 + 3
    e = registry.build("grad-cam", target_layer="2")
    with pytest.raises(InputError, match="mode"):
        mprt(model, e, x, mode="top_down")
    with pytest.raises(InputError, match="top_k"):
        mprt(model, e, x, top_k=0)
    with pytest.raises(InputError, match="layer_seeds: expected 3 seeds"):
        mprt(model, e, x, layer_seeds=[1])
    with pytest.raises(InputError, match="batch_size"):
        mprt(model, e, x, batch_size=0)

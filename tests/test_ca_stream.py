"""CA-Stream pooling (ca-stream.txt, sections 3.2-3.3, eq. 4-10), its classifiers and the
``ca-attention`` explainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from foveal import registry
from foveal.core.errors import InputError
from foveal.models.ca_stream import CaStream, TimmClassifier, wrap_classifier
from foveal.testing import check_component, check_explainer

TINY = {"model_name": "resnet18", "model_kwargs": {"channels": [16, 32, 64, 128]}, "num_classes": 3}


def tiny_gap(**kw) -> TimmClassifier:
    return registry.build("gap-classifier", **{**TINY, **kw}).eval()


# --- eq. 6 and 10 against a float64 re-derivation ---------------------------------------------

def reference_stream(pool: CaStream, feats: list[torch.Tensor], heads: int = 1, qk: bool = False):
    """The stream written literally per image from eq. 4, 6 and 10: F (p, d) is the reshaped
    feature tensor, a = softmax(F q / sqrt(d)), CA = F^T a, q_{l+1} = W_l CA + b_l."""
    outs, logits_last = [], []
    for b in range(feats[0].shape[0]):
        q = pool.q0.detach().double()
        for block, proj, x in zip(pool.blocks, pool.proj, feats):
            d = x.shape[1]
            fmat = x[b].double().reshape(d, -1).T  # (p, d)
            c = d // heads
            ca, logit_heads = torch.zeros(d, dtype=torch.float64), []
            for h in range(heads):
                sl = slice(h * c, (h + 1) * c)
                if qk:
                    keys = fmat @ block.k_proj.weight.double().T  # rows: W_k phi^i
                    query = block.q_proj.weight.double() @ q
                    logit = keys[:, sl] @ query[sl] / math.sqrt(d)
                else:
                    logit = fmat[:, sl] @ q[sl] / math.sqrt(d)
                a = torch.softmax(logit, dim=0)
                ca[sl] = fmat[:, sl].T @ a  # eq. 6/7: sum_i a_i phi^i
                logit_heads.append(logit)
            q = proj.weight.double() @ ca + (proj.bias.double() if proj.bias is not None else 0)
        outs.append(q)
        logits_last.append(torch.stack(logit_heads).mean(0).reshape(feats[-1].shape[-2:]))
    return torch.stack(outs), torch.stack(logits_last)


@pytest.mark.parametrize("heads,qk", [(1, False), (2, False), (2, True)])
def test_stream_matches_float64_rederivation(heads, qk):
    pool = CaStream(backbone=None, channels=[4, 8, 12], out_features=6, heads=heads, qk_proj=qk).double()
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, d, s, s + 1, generator=g, dtype=torch.float64) for d, s in ((4, 6), (8, 4), (12, 3))]
    out = pool(feats)
    ref, ref_logits = reference_stream(pool, feats, heads=heads, qk=qk)
    assert out.shape == (2, 6) and pool.out_features == 6
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert pool.last_attention.shape == (2, 3, 4)
    torch.testing.assert_close(pool.last_attention, ref_logits, rtol=1e-12, atol=1e-12)


def test_attention_pooling_of_constant_features_is_the_feature():
    # eq. 7: a convex combination of identical patch features is that feature, whatever q is
    pool = CaStream(backbone=None, channels=[5], proj_bias=False).double()
    torch.nn.init.eye_(pool.proj[0].weight)
    v = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    out = pool([v.expand(3, 5, 4, 4)])
    torch.testing.assert_close(out, v[:, :, 0, 0], rtol=0, atol=1e-14)


def test_widths_from_timm_feature_info():
    pool = registry.build("ca-stream", backbone="resnet50")
    assert pool.widths == [64, 256, 512, 1024, 2048] and pool.out_features == 2048 and pool.multi_stage
    assert [tuple(p.weight.shape) for p in pool.proj] == [(256, 64), (512, 256), (1024, 512), (2048, 1024),
                                                          (2048, 2048)]
    assert pool.q0.shape == (64,)
    conv = registry.build("ca-stream", backbone="convnext_atto")
    assert conv.widths == [40, 80, 160, 320] and conv.out_features == 320
    single = registry.build("ca-stream", backbone="resnet50", single_block=True)
    assert single.widths == [2048] and single.taps == [4] and single.q0.shape == (2048,)
    # all five stage maps are accepted and the single block reads the last one
    feats = [torch.randn(1, d, 2, 2) for d in (64, 256, 512, 1024, 2048)]
    torch.testing.assert_close(single(feats), single(feats[-1:]))


def test_bad_inputs_raise_clear_errors():
    pool = CaStream(backbone=None, channels=[4, 8])
    with pytest.raises(InputError, match="expected 2 stage feature maps"):
        pool([torch.randn(1, 4, 2, 2)])
    with pytest.raises(InputError, match=r"stage 1: expected features \(B, 8, h, w\)"):
        pool([torch.randn(1, 4, 2, 2), torch.randn(1, 7, 2, 2)])
    with pytest.raises(InputError, match="heads=3 must divide"):
        CaStream(backbone=None, channels=[4, 8], heads=3)
    with pytest.raises(ValidationError, match="backbone"):
        CaStream(backbone=None)
    with pytest.raises(InputError, match="not-a-model"):
        CaStream(backbone="not-a-model")


def test_components_round_trip():
    check_component("ca-stream", backbone="resnet18", heads=2, qk_proj=True)
    check_component("gap-classifier", **TINY)
    model = check_component("ca-stream-classifier", **TINY, single_block=True)
    assert model.task == "classification" and model.pool.widths == [128]
    check_component("ca-attention")


# --- classifiers ----------------------------------------------------------------------------

def test_wrapper_shares_every_backbone_and_classifier_weight():
    gap = tiny_gap()
    ca = wrap_classifier(gap)
    assert ca.registry_name == "ca-stream-classifier" and ca.net is gap.net
    gap_state, ca_state = gap.state_dict(), ca.state_dict()
    assert set(ca_state) - set(gap_state) == {k for k in ca_state if k.startswith("pool.")}
    for k, v in gap_state.items():
        assert ca_state[k].data_ptr() == v.data_ptr(), k
    # the stream is the only addition
    extra = sum(p.numel() for n, p in ca.named_parameters() if n.startswith("pool."))
    assert extra == sum(p.numel() for p in ca.stream_parameters()) > 0


def test_wrap_a_timm_instance_and_round_trip(tmp_path):
    import timm

    from foveal import load, save

    net = timm.create_model("resnet18", num_classes=3, channels=[16, 32, 64, 128]).eval()
    ca = wrap_classifier(net, heads=2, model_kwargs={"channels": [16, 32, 64, 128]}).eval()
    assert ca.net is net and ca.config.model_name == "resnet18" and ca.config.heads == 2
    save(ca, tmp_path / "ca.safetensors")
    again = load(tmp_path / "ca.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), ca(x))
    with pytest.raises(InputError, match="expected a timm classifier"):
        wrap_classifier(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("name,kwargs,size", [("resnet18", {"channels": [16, 32, 64, 128]}, 64),
                                              ("convnext_atto", {}, 64)])
def test_uniform_attention_reduces_to_gap(name, kwargs, size):
    """With q_L = 0 the last attention is uniform, so q_{L+1} = W_L GAP(F_L); with W_L = I the
    CA-Stream model must give the GAP model's logits: the classifier head is unchanged."""
    gap = registry.build("gap-classifier", model_name=name, model_kwargs=kwargs, num_classes=3).eval()
    ca = wrap_classifier(gap, single_block=True).eval()
    with torch.no_grad():
        ca.pool.q0.zero_()
        torch.nn.init.eye_(ca.pool.proj[0].weight)
        ca.pool.proj[0].bias.zero_()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ca(x), gap(x), rtol=1e-5, atol=1e-5)
        full = wrap_classifier(gap).eval()
        assert not torch.allclose(full(x), gap(x), atol=1e-3)  # a random stream is not GAP


def test_stage_taps_resnet_and_convnext():
    seen = []
    ca = wrap_classifier(tiny_gap())
    ca.pool.register_forward_pre_hook(lambda m, args: seen.append([tuple(f.shape) for f in args[0]]))
    logits = ca(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    # stem tap after the max-pool (stride 4), as in the authors' code, then layer1..layer4
    assert seen[0] == [(2, 64, 16, 16), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert ca.tap_modules == ["maxpool", "layer1", "layer2", "layer3", "layer4"] and ca.target_layer == "net.layer4"
    assert ca.last_attention.shape == (2, 2, 2)
    conv = registry.build("ca-stream-classifier", model_name="convnext_atto", num_classes=4).eval()
    assert conv.tap_modules == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert conv(torch.randn(1, 3, 64, 64)).shape == (1, 4) and conv.last_attention.shape == (1, 2, 2)
    assert conv.target_layer == "net.stages.3"


def test_classifier_from_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    gap = tiny_gap()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in gap.net.state_dict().items()}, str(path))
    ca = registry.build("ca-stream-classifier", **TINY, weights=str(path))
    for k, v in gap.net.state_dict().items():
        assert torch.equal(ca.net.state_dict()[k], v), k
    with pytest.raises(Exception, match="shape"):
        registry.build("ca-stream-classifier", **{**TINY, "num_classes": 5}, weights=str(path))


def test_gradients_flow_through_the_attention_to_layer4():
    """CAM explainers differentiate the class score w.r.t. layer4: with GAP that gradient is
    the same at every position (w_c / hw); through CA-Stream it depends on the attention."""
    gap = tiny_gap()
    ca = wrap_classifier(gap).eval()
    x = torch.randn(2, 3, 64, 64)
    grads = {}
    for name, model in (("gap", gap), ("ca", ca)):
        acts = []
        handle = model.net.layer4.register_forward_hook(lambda m, i, o, acts=acts: acts.append(o))
        try:
            score = model(x)[:, 1].sum()
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(score, acts[0])
        grads[name] = g
    g_gap, g_ca = grads["gap"], grads["ca"]
    torch.testing.assert_close(g_gap, g_gap[:, :, :1, :1].expand_as(g_gap))
    assert g_ca.abs().sum() > 0
    assert (g_ca - g_ca[:, :, :1, :1]).abs().amax() > 1e-6
    assert all(p.grad is None for p in ca.parameters())


def test_cam_explainer_on_ca_stream_model():
    if not registry.has("grad-cam"):
        pytest.skip("grad-cam explainer not available")
    ca = wrap_classifier(tiny_gap()).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = registry.build("grad-cam", target_layer=ca.target_layer)
    maps = check_explainer(cam, ca, x, targets=[0, 2])
    assert maps.shape == (2, 64, 64) and maps.amax() > 0


# --- ca-attention explainer -----------------------------------------------------------------

def test_ca_attention_explainer_is_the_raw_last_attention():
    ca = wrap_classifier(tiny_gap()).eval()
    x = torch.randn(3, 3, 64, 64)
    explainer = registry.build("ca-attention")
    maps = check_explainer(explainer, ca, x)
    with torch.no_grad():
        ca(x)
    raw = ca.last_attention  # (3, 2, 2) pre-softmax logits
    up = torch.nn.functional.interpolate(raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(maps, (up - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    # class-agnostic: the target does not matter
    torch.testing.assert_close(explainer.explain(ca, x, [0, 1, 2]), explainer.explain(ca, x, 1))
    soft = registry.build("ca-attention", softmax=True).explain(ca, x)
    assert torch.equal(soft.flatten(1).argmax(1), maps.flatten(1).argmax(1))
    with pytest.raises(InputError, match="no ca-stream pooling"):
        explainer.explain(tiny_gap(), x)


# --- Table 1 example ------------------------------------------------------------------------

@pytest.mark.heavy
def test_table1_example_on_synthetic_data(tmp_path):
    import importlib.util
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from foveal.pipelines import pooling_study

    path = Path(__file__).resolve().parents[1] / "examples" / "ca_stream_table1.py"
    spec = importlib.util.spec_from_file_location("ca_stream_table1", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--synthetic", "--out", str(tmp_path), "--limit", "8", "--steps", "16", "--quiet",
                            "--figure-images", "2"])
    assert results["images"] == 8
    assert set(results["accuracy"]) == {"gap", "ca"} and min(results["accuracy"].values()) >= 75  # 4 classes
    assert set(results["scores"]) == {"grad-cam", "grad-cam++", "score-cam"}
    for by_pool in results["scores"].values():
        assert set(by_pool) == {"gap", "ca"}
        for vals in by_pool.values():
            assert set(vals) == set(pooling_study.METRICS)
            assert all(0.0 <= v <= 100.0 for v in vals.values()), vals
    table = (tmp_path / "table1.md").read_text()
    assert "| grad-cam++ | CA |" in table and "AD↓ | AG↑ | AI↑ | I↑ | D↓" in table
    assert json.loads((tmp_path / "table1.json").read_text())["scores"] == results["scores"]
    fig = np.asarray(Image.open(tmp_path / "figure.png"))
    assert fig.shape[0] > 2 * 128 and fig.shape[1] > 8 * 128  # 2 rows, input + 6 maps + raw attention
    # the CA checkpoint trained by the example kept the GAP network bit-identical
    from foveal import load

    gap, ca = load(tmp_path / "gap" / "model.safetensors"), load(tmp_path / "ca" / "model.safetensors")
    for k, v in gap.state_dict().items():
        assert torch.equal(ca.state_dict()[k], v), k

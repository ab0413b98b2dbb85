"""CAM explainers against independent references: captum, pytorch-grad-cam, and float64
re-derivations of the papers' formulas written out literally here."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from foveal import registry
from foveal.core.modules import preserved_model_state

SIZE = 64


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0).view_as(x)


def upsample(maps: torch.Tensor) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=6).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def act_and_grad64(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]):
    """Reference activations/gradients: float64 copy, plain hook, gradient through the whole graph
    (input requires grad), no foveal code involved. Returns (A, g, logits)."""
    import copy

    m = copy.deepcopy(model).double()
    name = next(n for n, mod in model.named_modules() if mod is layer)
    store = {}
    h = dict(m.named_modules())[name].register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    xx = x.double().requires_grad_(True)
    out = m(xx)
    h.remove()
    s = out[torch.arange(len(targets)), torch.tensor(targets)]
    (g,) = torch.autograd.grad(s.sum(), store["a"])
    return store["a"].detach(), g, s.detach()


def test_grad_cam_equals_captum(resnet, images):
    from captum.attr import LayerAttribution, LayerGradCam

    targets = [0, 3, 5]
    for layer_name in ("layer3", "layer4"):
        layer = dict(resnet.named_modules())[layer_name]
        ref = LayerGradCam(resnet, layer).attribute(images, target=targets, relu_attributions=True)
        ref = LayerAttribution.interpolate(ref, (SIZE, SIZE), interpolate_mode="bilinear")[:, 0]
        ref = minmax(ref.detach())
        ours = registry.build("grad-cam", target_layer=layer_name).explain(resnet, images, targets)
        assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_grad_cam_plus_plus_equals_eq19_float64(resnet, images):
    targets = [1, 2, 4]
    layer = resnet.layer3
    a, g, s = act_and_grad64(resnet, layer, images, targets)
    # eq. 19 with Y = exp(S): dY/dA = e g, d2Y = e g^2, d3Y = e g^3 (piecewise-linear net)
    e = torch.exp(s)[:, None, None, None]
    d1, d2, d3 = e * g, e * g**2, e * g**3
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    denom = 2 * d2 + sum_a * d3
    alpha = torch.where(g != 0, d2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    w = (alpha * torch.relu(d1)).sum(dim=(2, 3), keepdim=True)
    ref = minmax(upsample(torch.relu((w * a).sum(1)))).float()
    ours = registry.build("grad-cam++", target_layer="layer3").explain(resnet, images, targets)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    # and not simply Grad-CAM (the oracle must be able to tell them apart)
    gc = registry.build("grad-cam", target_layer="layer3").explain(resnet, images, targets)
    assert (gc - ref).abs().max() > 1e-3


def test_xgrad_cam_and_layer_cam_formulas_float64(resnet, images):
    targets = [0, 1, 2]
    a, g, _ = act_and_grad64(resnet, resnet.layer3, images, targets)
    s = a.sum(dim=(2, 3), keepdim=True)
    w = torch.where(s != 0, (a / s * g).sum(dim=(2, 3), keepdim=True), 0)  # XGrad-CAM eq. 9 (dead channel: 0)
    ref_x = minmax(upsample(torch.relu((w * a).sum(1)))).float()
    ref_l = minmax(upsample(torch.relu((torch.relu(g) * a).sum(1)))).float()  # Layer-CAM eq. 5-6
    ours_x = registry.build("xgrad-cam", target_layer="layer3").explain(resnet, images, targets)
    ours_l = registry.build("layer-cam", target_layer="layer3").explain(resnet, images, targets)
    assert torch.allclose(ours_x, ref_x, atol=1e-5), float((ours_x - ref_x).abs().max())
    assert torch.allclose(ours_l, ref_l, atol=1e-5), float((ours_l - ref_l).abs().max())


def test_abs_cam_init_formula_float64(resnet, images):
    targets = [2, 2, 3]
    a, g, _ = act_and_grad64(resnet, resnet.layer3, images, targets)
    ref = minmax(upsample((g.abs().mean(dim=(2, 3), keepdim=True) * a).sum(1))).float()  # eq. 2-3
    ours = registry.build("abs-cam-init", target_layer="layer3").explain(resnet, images, targets)
    assert torch.allclose(ours, ref, atol=1e-5)


class SmallCNN(nn.Module):
    """Small CNN with duplicated and dead channels, to exercise Score-CAM's exact shortcuts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            conv = self.features[3]
            conv.weight[6:9] = conv.weight[0:3]  # duplicate channels
            conv.bias[6:9] = conv.bias[0:3]
            conv.weight[9:] = 0  # dead channels: constant (all-zero after ReLU) maps
            conv.bias[9:] = -1.0
        self.head = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


def score_reference64(model, x, targets, *, align_corners: bool, maps_fn=None):
    """Score-CAM / Abs-CAM phase 2 written as the plain per-channel loop, float64."""
    import copy

    m = copy.deepcopy(model).double()
    x = x.double()
    a = m.features(x)
    masks_src = a if maps_fn is None else maps_fn(a)
    b, c = a.shape[:2]
    scores = torch.empty(b, c, dtype=torch.float64)
    masks = torch.empty(b, c, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        for i in range(b):
            for k in range(c):
                up = F.interpolate(masks_src[i : i + 1, k : k + 1], size=(SIZE, SIZE), mode="bilinear",
                                   align_corners=align_corners)[0, 0]
                span = up.max() - up.min()
                mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
                masks[i, k] = mask
                scores[i, k] = m(x[i : i + 1] * mask)[0, targets[i]]
    return a.detach(), masks, torch.softmax(scores, dim=1)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_score_cam_equals_per_channel_loop(batch_size):
    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    targets = [1, 4]
    a, _, w = score_reference64(model, x, targets, align_corners=False)
    ref = minmax(upsample(torch.relu((w[..., None, None] * a).sum(1)))).float()
    e = registry.build("score-cam", target_layer="features", batch_size=batch_size, progress=False)
    ours = e.explain(model, x, targets)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_score_cam_matches_pytorch_grad_cam_weights():
    """Same conventions (mask upsampling with align_corners=True, channel softmax of the logit
    scores): our raw map equals ReLU(sum_k w_k A^k) with pytorch-grad-cam's ScoreCAM weights."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    targets = [0, 3]
    with torch.no_grad():
        a = model.features(x)
    cam = ScoreCAM(model=model, target_layers=[model.features])
    try:
        w = cam.get_cam_weights(x, model.features, [ClassifierOutputTarget(t) for t in targets], a.numpy(), None)
    finally:
        cam.activations_and_grads.release()
    ref = torch.relu((torch.as_tensor(w)[..., None, None] * a).sum(1))
    e = registry.build("score-cam", target_layer="features", mask_align_corners=True, progress=False)
    with preserved_model_state(model) as hooks:
        raw = e.attribute(model, x, targets, hooks)
    assert torch.allclose(raw, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), float((raw - ref).abs().max())


def test_abs_cam_equals_per_channel_reading_float64():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    targets = [2, 0]
    a, g, _ = act_and_grad64(model, model.features, x, targets)
    weight = g.abs().mean(dim=(2, 3), keepdim=True)  # eq. 2
    _, masks, w = score_reference64(model, x, targets, align_corners=False, maps_fn=lambda act: weight * act)
    ref = minmax(torch.relu((w[..., None, None] * masks).sum(1))).float()  # eq. 5, per channel
    ours = registry.build("abs-cam", target_layer="features", batch_size=4, progress=False,
                          normalization="per-channel", score="channel-softmax").explain(model, x, targets)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def abs_cam_default_reference64(model, x, targets, weight_fn=lambda g: g.abs().mean(dim=(2, 3), keepdim=True)):
    """Abs-CAM, default reading, as a plain float64 loop: M_0^k = S(U(W_k A^k)) with S one min-max
    over all channels of the image (eq. 3), M_1^k = M_0^k X (eq. 4), Y_c = softmax(f(M_1^k))_c
    (class probability, "after softmax"), L = ReLU(sum_k Y_c(M_1^k) M_0^k) (eq. 5)."""
    import copy

    a, g, _ = act_and_grad64(model, model.features, x, targets)
    m = copy.deepcopy(model).double()
    ups = F.interpolate((weight_fn(g) * a).flatten(0, 1)[:, None], size=(SIZE, SIZE), mode="bilinear",
                        align_corners=False)[:, 0].view(a.shape[0], a.shape[1], SIZE, SIZE)
    out = []
    with torch.no_grad():
        for i in range(a.shape[0]):
            lo, hi = ups[i].min(), ups[i].max()
            m0 = (ups[i] - lo) / (hi - lo)  # shared over the channels of image i
            y = torch.stack([torch.softmax(m(x[i : i + 1].double() * m0[k]), 1)[0, targets[i]]
                             for k in range(a.shape[1])])
            out.append(torch.relu((y[:, None, None] * m0).sum(0)))
    return minmax(torch.stack(out)).float()


def test_abs_cam_default_reading_float64():
    """Default reading: shared normalisation S and class probabilities (issue 15 item 1)."""
    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    targets = [2, 0]
    ref = abs_cam_default_reference64(model, x, targets)
    for bs in (4, 64):
        ours = registry.build("abs-cam", target_layer="features", batch_size=bs, progress=False).explain(
            model, x, targets)
        assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_abs_cam_gradient_weights_matter_under_default_only():
    """The paper's |gradient| weights W_k (eq. 2) change the map under the default (shared) S and
    cancel under the per-channel S: replacing W_k by the indicator W_k > 0 (same channels, no
    weighting) leaves the per-channel map unchanged and changes the default one."""
    from foveal.explainers.score_cams import AbsCAM

    class Unweighted(AbsCAM):
        def channel_weights(self, g):
            return (super().channel_weights(g) > 0).to(g.dtype)

    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    targets = [1, 3]
    for normalization, score in (("shared", "probability"), ("per-channel", "channel-softmax"),
                                 ("per-channel", "probability")):
        kw = dict(target_layer="features", progress=False, normalization=normalization, score=score)
        weighted = AbsCAM(**kw).explain(model, x, targets)
        unweighted = Unweighted(**kw).explain(model, x, targets)
        diff = float((weighted - unweighted).abs().max())
        if normalization == "shared":
            assert diff > 0.05, f"W_k has no effect under the default reading ({diff})"
        else:
            assert diff < 1e-5, f"W_k > 0 should cancel under per-channel min-max ({diff})"


def test_score_cam_never_forwards_more_than_one_chunk():
    model = SmallCNN().eval()
    seen = []
    h = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        registry.build("score-cam", target_layer="features", batch_size=3, progress=False).explain(
            model, torch.randn(4, 3, SIZE, SIZE)
        )
    finally:
        h.remove()
    assert max(seen) <= 4 and max(seen[1:]) <= 3
    # 9 live channels with 3 duplicates -> 6 unique masks per image (+1 black image for the dead
    # channels, shared by the batch), never 12 per image
    assert sum(seen[1:]) <= 4 * 6 + 1


def test_smoothgrad_cam_pp_equals_averaged_eq19(resnet, images):
    targets = [0, 1, 2]
    e = registry.build("smoothgrad-cam++", target_layer="layer3", n_samples=3, noise_level=0.2, seed=11)
    ours = e.explain(resnet, images, targets)
    # every image's 3 noise samples: one (3, C, H, W) draw of a generator seeded with 11
    draw = torch.randn((3, *images.shape[1:]), generator=torch.Generator().manual_seed(11))
    span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1)
    a, _, _ = act_and_grad64(resnet, resnet.layer3, images, targets)
    d1 = d2 = d3 = 0
    for s in range(3):
        noisy = images + 0.2 * span * draw[s]
        _, g, _ = act_and_grad64(resnet, resnet.layer3, noisy, targets)
        d1, d2, d3 = d1 + g / 3, d2 + g**2 / 3, d3 + g**3 / 3
    denom = 2 * d2 + a.sum(dim=(2, 3), keepdim=True) * d3
    alpha = torch.where(d1 != 0, d2 / denom, torch.zeros_like(d2))
    w = (alpha * torch.relu(d1)).sum(dim=(2, 3), keepdim=True)
    ref = minmax(upsample(torch.relu((w * a).sum(1)))).float()
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    # batch independence: an image explained alone gets the same noise, hence the same map
    alone = e.explain(resnet, images[2:], targets[2:])
    assert torch.allclose(alone, ours[2:], atol=1e-5)

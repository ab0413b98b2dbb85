"""HiResCAM, Shapley-CAM, Finer-CAM, Ablation-CAM, Eigen-CAM and KPCA-CAM against pytorch-grad-cam
(the oracle: same model, layer, targets; its final maps are ReLU, min-max at feature resolution,
OpenCV bilinear resize and a second min-max, which equals our upsample-then-min-max), and the
parts pytorch-grad-cam does not have against float64 re-derivations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.core.explainer import SegmentationTarget
from foveal.core.modules import preserved_model_state

SIZE = 64


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0).view_as(x)


def upsample(maps: torch.Tensor, size=(SIZE, SIZE)) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def pgc_maps(cls, model, layer, x, targets, **call_kw):
    """pytorch-grad-cam's final maps as a tensor (hooks released afterwards)."""
    cam = cls(model=model, target_layers=[layer])
    try:
        out = cam(input_tensor=x, targets=targets, **call_kw)
    finally:
        cam.activations_and_grads.release()
    return torch.as_tensor(out)


def raw_map(explainer, model, x, targets=None):
    """Our raw (B, h, w) map, before upsampling and normalisation."""
    with preserved_model_state(model) as hooks:
        return explainer.attribute(model, x, targets, hooks)


def classes(targets):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(t) for t in targets]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


class SmoothHead(nn.Module):
    """CNN whose head is smooth (Softplus, squared pooling), so the logit is not linear in the
    features and the Hessian term of Shapley-CAM is non-zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Softplus())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc((self.head(self.features(x)) ** 2).mean((2, 3)))


# --- HiResCAM ------------------------------------------------------------------------------------

def test_hirescam_equals_pytorch_grad_cam(resnet, images):
    from pytorch_grad_cam import HiResCAM

    targets = [0, 3, 7]
    for layer in ("layer3", "layer4"):
        ref = pgc_maps(HiResCAM, resnet, dict(resnet.named_modules())[layer], images, classes(targets))
        ours = registry.build("hirescam", target_layer=layer).explain(resnet, images, targets)
        assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    gradcam = registry.build("grad-cam", target_layer="layer3").explain(resnet, images, targets)
    hires = registry.build("hirescam", target_layer="layer3").explain(resnet, images, targets)
    assert float((gradcam - hires).abs().max()) > 1e-2
    # relu=False keeps the signed map: the raw sum of gradient x activation
    signed = raw_map(registry.build("hirescam", target_layer="layer3", relu=False), resnet, images, targets)
    assert bool((signed < 0).any()) and torch.allclose(signed.clamp_min(0), raw_map(
        registry.build("hirescam", target_layer="layer3"), resnet, images, targets))


# --- Shapley-CAM ---------------------------------------------------------------------------------

def test_shapley_cam_equals_pytorch_grad_cam_with_hessian_term(images):
    """A smooth head (logit utility) and ReST on a ReLU ResNet: H A is non-zero in both, and the
    map equals pytorch-grad-cam's ShapleyCAM (double back-propagation, weights mean(g - HA/2))."""
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    model = SmoothHead().eval()
    targets = [0, 2, 4]
    ref = pgc_maps(ShapleyCAM, model, model.features, images, classes(targets))
    ours = registry.build("shapley-cam", target_layer="features").explain(model, images, targets)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    gradcam = registry.build("grad-cam", target_layer="features").explain(model, images, targets)
    assert float((gradcam - ours).abs().max()) > 1e-2  # the Hessian term matters here

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=10).eval()
    ref = pgc_maps(ShapleyCAM, resnet, resnet.layer3, images, [ClassifierOutputReST(t) for t in (1, 5, 9)])
    ours = registry.build("shapley-cam", target_layer="layer3", utility="rest").explain(resnet, images, [1, 5, 9])
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_shapley_cam_is_grad_cam_where_the_score_is_linear(resnet, images):
    """ResNet logit at layer4 (avg-pool + linear after it): H A = 0, Shapley-CAM = Grad-CAM."""
    a = registry.build("shapley-cam", target_layer="layer4").explain(resnet, images, [1, 2, 3])
    b = registry.build("grad-cam", target_layer="layer4").explain(resnet, images, [1, 2, 3])
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(InputError, match="class indices"):
        registry.build("shapley-cam", utility="rest").explain(resnet, images, lambda out: out[:, 0])


# --- Finer-CAM -----------------------------------------------------------------------------------

def test_finer_cam_equals_pytorch_grad_cam(resnet, images):
    from pytorch_grad_cam import FinerCAM, HiResCAM

    for target_idx in (None, 4):
        for base, cls_ in (("grad-cam", None), ("hirescam", HiResCAM)):
            kw = {} if cls_ is None else {"base_method": cls_}
            cam = FinerCAM(model=resnet, target_layers=[resnet.layer3], **kw)
            try:
                ref = torch.as_tensor(cam(images, targets=None, alpha=0.7, target_idx=target_idx))
            finally:
                cam.base_cam.activations_and_grads.release()
            e = registry.build("finer-cam", target_layer="layer3", alpha=0.7, base=base)
            ours = e.explain(resnet, images, target_idx)
            assert torch.allclose(ours, ref, atol=1e-5), (target_idx, base, float((ours - ref).abs().max()))
    # alpha = 0: the base CAM of the target class
    plain = registry.build("finer-cam", target_layer="layer3", alpha=0.0).explain(resnet, images, [2, 3, 4])
    assert torch.allclose(plain, registry.build("grad-cam", target_layer="layer3").explain(resnet, images, [2, 3, 4]),
                          atol=1e-6)


def test_finer_cam_segmentation_region_score_float64():
    """Segmentation generalisation: class scores summed over the target region, similar classes
    and weights from the region means; equals Grad-CAM of that score written out by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 5, 1)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    region = torch.zeros(16, 16)
    region[4:12, 2:10] = 1
    target = SegmentationTarget(2, region)

    def finer_score(out):
        total = (out * region).flatten(2).sum(2)
        mean = total / region.sum()
        dist = (mean - mean[:, 2:3]).abs().detach()
        dist[:, 2] = float("inf")
        comp = dist.argsort(1)[:, :3]
        w = torch.softmax(mean.gather(1, comp), 1)
        return (w * (total[:, 2:3] - 0.5 * total.gather(1, comp))).sum(1)

    ours = registry.build("finer-cam", target_layer="2", alpha=0.5).explain(model, x, target)
    ref = registry.build("grad-cam", target_layer="2").explain(model.double(), x.double(), finer_score).float()
    model.float()
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    # None: the default category's predicted region; a list of per-image targets works too
    registry.build("finer-cam", target_layer="2").explain(model, x, None)
    registry.build("finer-cam", target_layer="2").explain(model, x, [target, SegmentationTarget(1)])


def test_finer_cam_errors(resnet, images):
    e = registry.build("finer-cam", target_layer="layer3")
    with pytest.raises(InputError, match="class indices"):
        e.explain(resnet, images, lambda out: out[:, 0])
    with pytest.raises(InputError, match="out of range"):
        e.explain(resnet, images, 10)
    single = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(InputError, match="single output"):
        registry.build("finer-cam", target_layer="1").explain(single, images)


# --- Ablation-CAM --------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Small CNN whose target layer (features) ends in a ReLU and has dead channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[3].weight[9:] = 0  # dead channels
            self.features[3].bias[9:] = -1.0
        self.head = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


def ablation_reference64(model, x, targets):
    """Plain float64 loop: zero channel k of the layer output, score drop / |score| (eq. of sec. 3)."""
    m = copy.deepcopy(model).double()
    x = x.double()
    with torch.no_grad():
        a = m.features(x)
        base = m.head(a)[torch.arange(len(targets)), targets]
        w = torch.zeros(a.shape[:2], dtype=torch.float64)
        for i in range(a.shape[0]):
            for k in range(a.shape[1]):
                ab = a[i : i + 1].clone()
                ab[0, k] = 0
                w[i, k] = (base[i] - m.head(ab)[0, targets[i]]) / base[i].abs()
    return minmax(upsample(torch.relu((w[..., None, None] * a).sum(1)))).float(), base


def test_ablation_cam_equals_pytorch_grad_cam_and_float64():
    from pytorch_grad_cam import AblationCAM

    model = SmallCNN().eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1).tolist()
    ref64, base = ablation_reference64(model, x, targets)
    assert bool((base > 0).all())  # positive scores: the paper's ratio and ours agree
    for bs in (1, 7, 64):
        ours = registry.build("ablation-cam", target_layer="features", batch_size=bs, progress=False).explain(
            model, x, targets)
        assert torch.allclose(ours, ref64, atol=1e-5), float((ours - ref64).abs().max())
    cam = AblationCAM(model=model, target_layers=[model.features])
    try:
        ref = torch.as_tensor(cam(input_tensor=x, targets=classes(targets)))
    finally:
        cam.activations_and_grads.release()
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    # a negative target score: weights divided by |y_c| (the paper's ratio would flip them)
    neg = logits.argmin(1).tolist()
    ref64, base = ablation_reference64(model, x, neg)
    assert bool((base < 0).any())
    ours = registry.build("ablation-cam", target_layer="features", progress=False).explain(model, x, neg)
    assert torch.allclose(ours, ref64, atol=1e-5), float((ours - ref64).abs().max())


def test_ablation_cam_skips_dead_channels_and_chunks():
    model = SmallCNN().eval()
    seen = []
    h = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        registry.build("ablation-cam", target_layer="features", batch_size=4, progress=False).explain(
            model, torch.randn(2, 3, SIZE, SIZE))
    finally:
        h.remove()
    assert seen[0] == 2 and max(seen[1:]) <= 4
    # per image: the reference forward + 9 live channels, in chunks of 4 (4 + 4 + 2); the 3 dead
    # channels are not ablated
    assert seen[1:] == [4, 4, 2, 4, 4, 2]


def test_ablation_cam_does_not_run_the_target_layer_and_restores_it():
    """The target layer's output is replaced, so the layer itself runs only in the recording
    forward; its forward is restored afterwards, also when the model raises mid-way."""
    model = SmallCNN().eval()
    calls = []
    h = model.features[3].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        e = registry.build("ablation-cam", target_layer="features", batch_size=4, progress=False)
        e.explain(model, torch.randn(2, 3, SIZE, SIZE))
    finally:
        h.remove()
    assert calls == [2] and "forward" not in model.features.__dict__

    class Flaky(SmallCNN):
        n = 0

        def forward(self, x):
            Flaky.n += 1
            if Flaky.n == 3:
                raise RuntimeError("boom")
            return super().forward(x)

    flaky = Flaky().eval()
    with pytest.raises(RuntimeError, match="boom"):
        registry.build("ablation-cam", target_layer="features", batch_size=4, progress=False).explain(
            flaky, torch.randn(1, 3, SIZE, SIZE))
    assert "forward" not in flaky.features.__dict__
    with torch.no_grad():
        x = torch.randn(1, 3, SIZE, SIZE)
        assert torch.equal(flaky.features(x), SmallCNN().eval().features(x))  # the real layer again


# --- Eigen-CAM and KPCA-CAM ----------------------------------------------------------------------

def layer_output(model, module, x):
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return store["a"]


def oriented(proj: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's projection with our sign rule: positive correlation with sum_k A^k."""
    total = act.sum(1).flatten(1)
    total = total - total.mean(1, keepdim=True)
    sign = torch.where((proj.flatten(1) * total).sum(1) < 0, -1.0, 1.0)
    return proj * sign[:, None, None]


def test_eigen_cam_equals_pytorch_grad_cam_up_to_sign(resnet, images):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    for layer in ("layer2", "layer3"):
        mod = dict(resnet.named_modules())[layer]
        act = layer_output(resnet, mod, images)
        ref = oriented(torch.as_tensor(get_2d_projection(act.numpy())), act)
        ours = raw_map(registry.build("eigen-cam", target_layer=layer, relu=False), resnet, images, None)
        assert torch.allclose(ours, ref, atol=1e-5 * float(ref.abs().max())), float((ours - ref).abs().max())
        # the final maps: ReLU of the oriented projection, upsampled, min-max
        final = registry.build("eigen-cam", target_layer=layer).explain(resnet, images)
        assert torch.allclose(final, minmax(upsample(ref.clamp_min(0))), atol=1e-4)
    # not class-discriminative, but targets are validated
    e = registry.build("eigen-cam", target_layer="layer3")
    assert torch.equal(e.explain(resnet, images, [0, 1, 2]), e.explain(resnet, images, [5, 6, 7]))
    with pytest.raises(InputError, match="out of range"):
        e.explain(resnet, images, 10)


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "poly", "cosine"])
def test_kpca_cam_equals_pytorch_grad_cam_up_to_sign(resnet, images, kernel):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    act = layer_output(resnet, resnet.layer2, images)
    gamma = None if kernel != "rbf" else 0.01
    ref = oriented(torch.as_tensor(get_2d_projection_kernel(act.numpy(), kernel, gamma)), act)
    kw = {} if gamma is None else {"gamma": gamma}
    ours = raw_map(registry.build("kpca-cam", target_layer="layer2", relu=False, kernel=kernel, **kw),
                   resnet, images, None)
    assert ours.shape == ref.shape == (3, 8, 8)
    assert torch.allclose(ours, ref, atol=1e-4 * float(ref.abs().max())), float((ours - ref).abs().max())


def test_kpca_linear_kernel_is_eigen_cam(resnet, images):
    a = registry.build("kpca-cam", target_layer="layer3", kernel="linear").explain(resnet, images)
    b = registry.build("eigen-cam", target_layer="layer3").explain(resnet, images)
    assert torch.allclose(a, b, atol=1e-4)
    assert not np.allclose(a.numpy(), registry.build("kpca-cam", target_layer="layer3").explain(resnet, images).numpy(),
                           atol=1e-3)


# --- CUDA (skipped without a GPU; tests/test_cuda.py covers every CAMBase explainer) ---------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["grad-x-input", "integrated-gradients", "smoothgrad", "ablation-cam"])
def test_on_cuda_equal_cpu_float64(name):
    from foveal.testing import check_explainer

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5).eval().double()
    perturbation = name in ("ablation-cam", "abs-cam")
    x = torch.randn((1, 3, 32, 32) if perturbation else (2, 3, 64, 64), dtype=torch.float64)
    kw = {"progress": False} if perturbation else {}
    if name not in ("grad-x-input", "integrated-gradients", "smoothgrad"):
        kw["target_layer"] = "layer2" if perturbation else "layer3"
    kw.update({"smoothgrad": {"n_samples": 4}, "integrated-gradients": {"steps": 8},
               "smoothgrad-cam++": {"n_samples": 2}}.get(name, {}))
    out = []
    for dev in ("cpu", "cuda"):
        maps = check_explainer(registry.build(name, **kw), model.to(dev), x.to(dev), [3, 1][: len(x)])
        assert maps.device.type == dev and maps.dtype == torch.float64
        out.append(maps.cpu())
    model.cpu()
    torch.testing.assert_close(out[1], out[0], rtol=1e-7, atol=1e-7)

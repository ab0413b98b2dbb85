"""CAM explainers: contract on CNN / ViT / segmentation models, localisation on a trained tiny
CNN, error handling, resource hygiene, save/load, CLI. Formula oracles: test_cam_oracles.py."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch
from torch import nn

import foveal
from foveal import registry
from foveal.core.errors import InputError
from foveal.core.explainer import SegmentationTarget
from foveal.explainers.cam import CAMBase
from foveal.explainers.gradient_cams import GradCAM
from foveal.explainers.input_gradients import InputGradientExplainer
from foveal.explainers.score_cams import AblationCAM, ScoreWeightedCAM
from foveal.testing import _hook_count, check_explainer

CLASSES = (CAMBase, InputGradientExplainer)
METHODS = [n for n in registry.names("explainer") if issubclass(registry.entry(n).cls, CLASSES)]
QUIET = {"score-cam": {"progress": False}, "abs-cam": {"progress": False}, "ablation-cam": {"progress": False},
         "smoothgrad-cam++": {"n_samples": 2}, "smoothgrad": {"n_samples": 4}, "integrated-gradients": {"steps": 8}}
INPUT_SPACE = {n for n in METHODS if issubclass(registry.entry(n).cls, InputGradientExplainer)}  # no target layer
# one forward per channel
PERTURBATION = {n for n in METHODS if issubclass(registry.entry(n).cls, (ScoreWeightedCAM, AblationCAM))}


def build(name: str, **kw):
    if name in INPUT_SPACE:
        kw.pop("target_layer", None)
    return registry.build(name, **{**QUIET.get(name, {}), **kw})


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class TinySeg(nn.Module):
    """timm-backbone (resnet18 to layer3) + 1 x 1 conv head, logits upsampled to the input."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = registry.build("timm-backbone", model_name="resnet18", out_indices=[3])
        self.head = nn.Conv2d(256, classes, 1)

    def forward(self, x):
        f = self.backbone(x)[-1]
        return nn.functional.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


# --- contract on three model families -----------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    return TinySeg().eval()


@pytest.mark.parametrize("name", METHODS)
def test_contract_resnet_vit_segmentation(name, resnet, vit, seg):
    # score-weighted methods run one forward per channel: one small image and a 128-channel layer
    scored = name in PERTURBATION
    x = torch.randn((1, 3, 32, 32) if scored else (2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    layer = "layer2" if scored else "layer3"
    resnet.train()  # the explainer must evaluate in eval mode and restore train mode
    try:
        maps = check_explainer(build(name, target_layer=layer), resnet, x, [1, 4][: len(x)])
    finally:
        resnet.eval()
    assert maps.max() == 1.0  # a real (non-constant) map
    xv = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    maps = check_explainer(build(name), vit, xv, None)  # auto layer: blocks.1.norm1, 16 tokens -> 4 x 4
    assert maps.max() == 1.0
    region = torch.zeros(x.shape[-2:])
    region[: x.shape[-2] // 2] = 1  # explain class 1's logits in the top half
    for targets in (SegmentationTarget(1, region), None):
        maps = check_explainer(build(name, target_layer=f"backbone.body.{layer}"), seg, x, targets)
        assert maps.max() == 1.0


def test_vit_tokens_reshaped_and_prefix_dropped(vit):
    """The grid comes from the 16 patch tokens: a reshape that does the same by hand agrees, and
    a reshape that keeps the class token in the grid would not fit a 4 x 4 grid."""
    x = torch.randn(1, 3, 32, 32)
    auto = build("grad-cam", target_layer="blocks.1.norm1").explain(vit, x, 2)
    by_hand = build("grad-cam", target_layer="blocks.1.norm1")
    by_hand.reshape = lambda t: t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)
    assert torch.allclose(auto, by_hand.explain(vit, x, 2))
    bad = GradCAM(target_layer="blocks.1.norm1", reshape=lambda t: t)
    with pytest.raises(InputError, match="reshape"):
        bad.explain(vit, x, 2)


def test_torchvision_and_auto_layers():
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    e = build("grad-cam")
    assert e.find_layer(tv, x) is tv.layer4
    assert torch.allclose(check_explainer(e, tv, x), build("grad-cam", target_layer="layer4").explain(tv, x))
    assert build("grad-cam").find_layer(timm.create_model("resnet18"), x).__class__.__name__ == "Sequential"
    cnx = timm.create_model("convnext_atto", num_classes=3).eval()
    assert build("grad-cam").find_layer(cnx, x) is cnx.stages[3]
    check_explainer(build("grad-cam++"), cnx, x)
    vgg = timm.create_model("vgg11", num_classes=3, mlp_ratio=1 / 16).eval()
    check_explainer(build("layer-cam"), vgg, x)
    # a module given directly
    direct = GradCAM(target_layer=tv.layer3)
    assert direct.find_layer(tv, x) is tv.layer3


# --- localisation on a trained tiny CNN ----------------------------------------------------------

def synthetic(n: int, gen: torch.Generator):
    """32 x 32 noise images with one 6 x 6 square; class 0 = red square, class 1 = blue square."""
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    pos = torch.randint(0, 27, (n, 2), generator=gen)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, 0 if y[i] == 0 else 2, r : r + 6, c : c + 6] += 2.0
    return x, y, pos


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, y, _ = synthetic(32, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():  # start from a clean state: no .grad
        p.grad = None
    x, y, pos = synthetic(40, gen)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    return model, x, y, pos


# SmoothGrad's default |gradient| saliency is a weak localiser on this GAP model: the gradient
# magnitude barely depends on where the square is (0.55-0.58 with 4 or 50 samples); its signed
# positive part points at the square every time (second case).
POINTING = [(name, {}, 0.5 if name == "smoothgrad" else 0.85) for name in METHODS] + [
    ("smoothgrad", {"absolute": False, "reduction": "positive"}, 0.85)]


@pytest.mark.parametrize("name,kw,bar", POINTING)
def test_pointing_game_on_trained_cnn(name, kw, bar, trained):
    model, x, y, pos = trained
    maps = build(name, target_layer="features", **kw).explain(model, x, y)
    hits = 0
    for i in range(len(x)):
        r, c = divmod(int(maps[i].argmax()), 32)
        r0, c0 = pos[i].tolist()
        hits += (r0 - 2 <= r < r0 + 8) and (c0 - 2 <= c < c0 + 8)  # the square with a 2 px margin
    chance = 100 / 1024
    assert hits / len(x) >= bar, f"{name}: pointing accuracy {hits / len(x):.2f} (chance {chance:.2f})"


# --- errors -------------------------------------------------------------------------------------

def test_input_errors(resnet):
    e = build("grad-cam", target_layer="layer4")
    x = torch.randn(1, 3, 32, 32)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        e.explain(resnet, bad)
    with pytest.raises(InputError, match="4-D"):
        e.explain(resnet, x[0])
    with pytest.raises(InputError, match="expects 3 channels"):
        e.explain(resnet, torch.randn(1, 1, 32, 32))
    with pytest.raises(InputError, match="out of range"):
        e.explain(resnet, x, 7)
    for name in ("score-cam", "abs-cam", "smoothgrad-cam++", "ablation-cam", "finer-cam", "shapley-cam", "eigen-cam",
                 "kpca-cam"):
        with pytest.raises(InputError, match="out of range"):
            build(name, target_layer="layer4").explain(resnet, x, 5)
    with pytest.raises(InputError, match="layer4"):
        build("grad-cam", target_layer="layr4").explain(resnet, x)
    with pytest.raises(InputError, match="does not depend"):
        _unused_layer(resnet, x)
    assert _hook_count(resnet) == 0


def _unused_layer(resnet, x):
    """A layer that runs but does not feed the score: a detached side branch."""
    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet
            self.side = nn.Conv2d(3, 2, 3)

        def forward(self, images):
            self.side(images).detach()
            return self.net(images)

    return build("grad-cam", target_layer="side").explain(Side().eval(), x)


def test_exception_inside_model_restores_state():
    class Boom(TinyCNN):
        def forward(self, x):
            self.features(x)
            raise RuntimeError("boom")

    model = Boom()
    model.train()
    model.head.weight.requires_grad_(False)
    for name in METHODS:
        with pytest.raises(RuntimeError, match="boom"):
            build(name, target_layer="features").explain(model, torch.randn(1, 3, 16, 16), 0)
        assert _hook_count(model) == 0
        assert all(m.training for m in model.modules())
        assert not model.head.weight.requires_grad and model.head.bias.requires_grad
        assert all(p.grad is None for p in model.parameters())


def test_constant_maps_are_zero_not_nan():
    model = TinyCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
    model.eval()
    for name in METHODS:
        maps = build(name, target_layer="features").explain(model, torch.randn(2, 3, 16, 16), 1)
        assert torch.equal(maps, torch.zeros_like(maps)), name


def test_smoothgrad_is_seeded(resnet):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    a = build("smoothgrad-cam++", target_layer="layer3", seed=3).explain(resnet, x, 0)
    b = build("smoothgrad-cam++", target_layer="layer3", seed=3).explain(resnet, x, 0)
    c = build("smoothgrad-cam++", target_layer="layer3", seed=4).explain(resnet, x, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_thousand_explains_leave_no_hooks_and_no_growth():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    explainers = [build("grad-cam", target_layer="features"), build("layer-cam")]  # explicit and auto layer
    for e in explainers:  # warm-up (allocator, caches, the auto-layer cache)
        e.explain(model, x)
    gc.collect()
    objects_before = len(gc.get_objects())
    tensors_before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for i in range(1000):
        maps = explainers[i % 2].explain(model, x)
    del maps
    gc.collect()
    tensors_after = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    assert _hook_count(model) == 0
    assert tensors_after <= tensors_before
    assert len(gc.get_objects()) - objects_before < 100, "python objects accumulate over 1000 explains"


# --- attention-guided CAM weights ---------------------------------------------------------------

def test_attention_guided_trained_weights_survive_save_load(tmp_path, trained):
    model, x, y, _ = trained
    e = registry.build("attention-guided-cam", target_layer="features", channels=32, reduction=4)
    torch.manual_seed(1)
    for p in e.attention.parameters():
        nn.init.normal_(p, std=0.5)
    maps = e.explain(model, x[:4], y[:4])
    foveal.save(e, tmp_path / "ag.safetensors")
    again = foveal.load(tmp_path / "ag.safetensors")
    assert torch.equal(again.explain(model, x[:4], y[:4]), maps)
    # weights from a plain file, and a clear error when they do not fit
    torch.save(e.state_dict(), tmp_path / "w.pth")
    from_file = registry.build("attention-guided-cam", target_layer="features", channels=32, reduction=4,
                               weights=str(tmp_path / "w.pth"))
    assert torch.equal(from_file.explain(model, x[:4], y[:4]), maps)
    with pytest.raises(foveal.CheckpointError):
        registry.build("attention-guided-cam", channels=32, reduction=8, weights=str(tmp_path / "w.pth"))
    wrong = registry.build("attention-guided-cam", target_layer="features", channels=16)
    with pytest.raises(InputError, match="16 channels"):
        wrong.explain(model, x[:1])
    # the trained attention changes the map; the training-free default differs from Grad-CAM too
    default = registry.build("attention-guided-cam", target_layer="features").explain(model, x[:4], y[:4])
    gradcam = registry.build("grad-cam", target_layer="features").explain(model, x[:4], y[:4])
    assert not torch.allclose(default, maps) and not torch.allclose(default, gradcam)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_explain_writes_overlays_and_grid(tmp_path, capsys):
    from PIL import Image

    from foveal.cli import main

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    code = main(["explain", "--model", "resnet18", "--num-classes", "3", "--method", "grad-cam", "--method",
                 "layer-cam", "--size", "64", str(tmp_path), "--out", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "im0_grad-cam.png", "im0_layer-cam.png", "im1_grad-cam.png", "im1_layer-cam.png"]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] > 3 * 64 and grid.shape[1] > 2 * 64  # 3 rows (image + 2 methods) x 2 columns
    assert main(["explain", "--model", "no-such-net", str(tmp_path), "--out", str(out)]) == 1
    assert "not a file, a registry model or a timm model" in capsys.readouterr().err


def test_rta_former_predicted_region():
    """A registry segmentation model: auto layer (a decoder feature, not the 1-channel logit head)
    and the predicted region as target."""
    model = registry.build("rta-former-t").eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layer = build("grad-cam").find_layer(model, x)
    assert layer is not model.decoder.head
    for name in ("grad-cam", "layer-cam"):
        maps = check_explainer(build(name), model, x, None)
        assert maps.max() == 1.0

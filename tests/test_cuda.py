"""GPU checks, skipped where CUDA is absent (CI has no GPU; run them on a GPU machine with
``pytest tests/test_cuda.py``). Every explainer runs on a CUDA model, keeps the contract there
(maps on the input's device, model left as found) and equals its CPU result computed in float64;
training, evaluation, checkpoint loading and the WSSS pipeline run with ``device="cuda"``."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from foveal import load, registry
from foveal.explainers.cam import CAMBase
from foveal.explainers.relevance import ViTExplainer
from foveal.explainers.score_cams import ScoreWeightedCAM
from foveal.testing import check_explainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CAMS = [n for n in registry.names("explainer") if issubclass(registry.entry(n).cls, CAMBase)]
VIT = [n for n in registry.names("explainer") if issubclass(registry.entry(n).cls, ViTExplainer)]
QUIET = {"score-cam": {"progress": False}, "abs-cam": {"progress": False}, "smoothgrad-cam++": {"n_samples": 2}}


def _both(model: torch.nn.Module, x: torch.Tensor, name: str, targets, **kw):
    """The maps of one explainer on CPU and on CUDA (float64, so TF32 and kernel choice cannot
    blur a device bug)."""
    out = []
    for dev in ("cpu", "cuda"):
        e = registry.build(name, **{**QUIET.get(name, {}), **kw})
        m, xi = model.to(dev), x.to(dev)
        maps = check_explainer(e, m, xi, targets)
        assert maps.device.type == dev and maps.dtype == torch.float64
        out.append(maps.cpu())
    model.cpu()
    return out


@pytest.mark.parametrize("name", CAMS)
def test_cams_on_cuda_equal_cpu(name):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5).eval().double()
    scored = issubclass(registry.entry(name).cls, ScoreWeightedCAM)
    x = torch.randn((1, 3, 32, 32) if scored else (2, 3, 64, 64), dtype=torch.float64)
    cpu, cuda = _both(model, x, name, [3, 1][: len(x)], target_layer="layer2" if scored else "layer3")
    assert cpu.amax() == 1.0
    torch.testing.assert_close(cuda, cpu, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", VIT)
def test_vit_explainers_on_cuda_equal_cpu(name):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4)
    model = model.eval().double()
    cpu, cuda = _both(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), name, None)
    torch.testing.assert_close(cuda, cpu, rtol=1e-7, atol=1e-7)


def test_segmentation_training_evaluation_and_loading_on_cuda(tmp_path):
    from foveal.data.polyp import make_synthetic_polyps
    from foveal.training.segmentation import evaluate, load_model, train

    data = make_synthetic_polyps(tmp_path / "data", num_train=8, num_test=4, test_sets=("SynthA",), size=48, seed=0)
    kw = dict(data=str(data), model="rta-former-t", model_options={"width": 16}, epochs=2, batch_size=4, size=32,
              scales=[1.0], progress=False, seed=0)
    gpu = train(out=str(tmp_path / "gpu"), device="cuda", **kw)
    assert next(gpu["model"].parameters()).is_cuda
    cpu = train(out=str(tmp_path / "cpu"), device="cpu", **kw)
    # same seed, same batches: the losses agree up to GPU arithmetic (TF32 convolutions included)
    for a, b in zip(gpu["history"], cpu["history"]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-2), (a["loss"], b["loss"])
    for name in ("model.safetensors", "last.safetensors"):  # a saved model and a training state
        model = load_model(tmp_path / "gpu" / name, device="cuda")
        assert next(model.parameters()).is_cuda
    scores = evaluate(model, data, size=32, progress=False)["SynthA"]
    assert 0.0 <= scores["meanDice"] <= 1.0 and 0.0 <= scores["meanIoU"] <= scores["meanDice"] + 1e-9


def test_segmentation_resume_on_cuda_restores_gpu_generators(tmp_path):
    """On the CPU resume is bit-exact (test_segmentation_training.py). On CUDA two uninterrupted
    runs already differ (cuDNN's backward kernels add atomically; measured on an H100: 7e-3 in a
    BN running variance after 2 epochs), so a resumed run must be as close to an uninterrupted one
    as two uninterrupted runs are to each other, and the GPU generators must be in the state."""
    from foveal.core.checkpoint import load_state
    from foveal.data.polyp import make_synthetic_polyps
    from foveal.training.segmentation import train

    data = make_synthetic_polyps(tmp_path / "data", num_train=8, num_test=0, test_sets=(), size=32, seed=1)
    kw = dict(data=str(data), model="rta-former-t", model_options={"width": 16}, batch_size=4, size=32,
              scales=[1.0], progress=False, seed=3, device="cuda")
    first = train(out=str(tmp_path / "a"), epochs=2, **kw)
    second = train(out=str(tmp_path / "a2"), epochs=2, **kw)
    train(out=str(tmp_path / "b"), epochs=1, **kw)
    state = load_state(tmp_path / "b" / "last.safetensors")
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count() and state["epoch"] == 1
    resumed = train(out=str(tmp_path / "b"), epochs=2, resume=True, **kw)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]

    def gap(a, b):
        pa, pb = dict(a["model"].named_parameters()), dict(b["model"].named_parameters())
        return max(float((pa[k].detach().double() - pb[k].detach().double()).abs().max()) for k in pa)

    noise = gap(first, second)
    assert gap(first, resumed) <= 4 * noise + 1e-6, (gap(first, resumed), noise)


def test_classifier_training_on_cuda(tmp_path):
    from foveal.data.classification import make_synthetic_classes
    from foveal.training.classification import train_classifier

    data = make_synthetic_classes(tmp_path / "syn", num_classes=3, train_per_class=16, val_per_class=4, size=32,
                                  seed=0)
    fast = dict(batch_size=16, image_size=32, crop_scale=(0.7, 1.0), workers=0, progress=False, device="cuda",
                model_name="resnet18", model_kwargs={"channels": [16, 32, 64, 128]})
    gap = train_classifier(data=str(data), out=str(tmp_path / "gap"), pooling="gap", epochs=2, lr=0.1, **fast)
    before = {k: v.clone() for k, v in load(gap["model_path"]).state_dict().items()}
    stream = train_classifier(data=str(data), out=str(tmp_path / "ca"), pooling="ca-stream", epochs=1, lr=0.01,
                              init=str(gap["model_path"]), **fast)
    for run in (gap, stream):
        assert next(run["model"].parameters()).is_cuda
        assert all(math.isfinite(r["train_loss"]) and 0 <= r["val_acc"] <= 1 for r in run["history"])
    # stream mode on the GPU: weights and BN statistics outside CA-Stream stay bit-identical
    after = stream["model"].state_dict()
    for k, v in before.items():
        assert torch.equal(after[k].cpu(), v), f"{k} changed during stream training"
    assert any(k.startswith("pool.") for k in after)


def test_wsss_pipeline_on_cuda(tmp_path):
    from foveal.pipelines.wsss import run_wsss

    result = run_wsss(
        out=str(tmp_path), progress=False, device="cuda", images=48, size=64, cls_epochs=25, aff_epochs=6,
        vit_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3},
        affinity_options={"backbone_options": {"model_name": "test_resnet"}, "levels": [1, 2, 3],
                          "level_channels": [16, 16, 32], "feature_dim": 32, "walk": "sparse"},
    )
    assert result.classifier_accuracy > 0.8
    assert result.refined_miou > result.seed_miou + 0.01, result.summary()
    assert result.pseudo_masks.shape == (48, 64, 64)

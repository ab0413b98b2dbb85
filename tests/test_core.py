"""Core utilities: input checks, normalisation, targets, layer lookup, model-state guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foveal.core import (
    InputError,
    SegmentationTarget,
    check_images,
    check_masks,
    normalize_maps,
    preserved_model_state,
    resolve_layer,
    target_scores,
)
from foveal.core.modules import _all_modules


def test_check_images_messages():
    with pytest.raises(InputError, match=r"4-D batch .* got tensor of shape \(3, 8, 8\).*images\[None\]"):
        check_images(torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="floating-point"):
        check_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="expected 3 channels"):
        check_images(torch.zeros(1, 1, 8, 8))
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="1 NaN/Inf"):
        check_images(x)
    with pytest.raises(InputError, match="expected a torch.Tensor, got list"):
        check_images([1, 2])


def test_check_masks():
    assert check_masks(torch.tensor([[[0, 1]]])).dtype == torch.bool
    with pytest.raises(InputError, match="binary"):
        check_masks(torch.tensor([[[0.5, 1.0]]]))


def test_normalize_maps_range_and_constant_maps():
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    out = normalize_maps(maps)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4, 4)) and torch.equal(out[1], torch.zeros(4, 4))
    assert out[2].min() == 0 and out[2].max() == 1
    torch.testing.assert_close(out[2], maps[2] / 15)
    noisy = torch.ones(1, 4, 4) + 1e-7 * torch.randn(1, 4, 4)  # float noise on a constant map
    assert torch.equal(normalize_maps(noisy), torch.zeros(1, 4, 4))


def test_target_scores_forms():
    out = torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 1.0]])
    torch.testing.assert_close(target_scores(out, None), torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(target_scores(out, 2), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(target_scores(out, torch.tensor([0, 1])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(target_scores(out, [lambda o: o[0, 0] * 2, 1]), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(target_scores(out, lambda o: o.sum(1)), torch.tensor([8.0, 8.0]))
    with pytest.raises(InputError, match=r"class 3 out of range for a model with 3 outputs"):
        target_scores(out, 3)
    with pytest.raises(InputError, match="expected 2 targets"):
        target_scores(out, [0])


def test_segmentation_target_predicted_region_and_mask():
    logits = torch.tensor([[[[2.0, -1.0], [3.0, -4.0]]]])  # (1, 1, 2, 2)
    assert float(SegmentationTarget(0)(logits)[0]) == 5.0  # positives only
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(SegmentationTarget(0, mask)(logits)[0]) == 1.0
    two = torch.randn(2, 3, 4, 4)
    scores = target_scores(two, None)  # K>1: largest non-background class area
    assert scores.shape == (2,)
    with pytest.raises(InputError, match="category 5 out of range"):
        SegmentationTarget(5)(two)


def test_resolve_layer_close_matches():
    model = nn.Sequential()
    model.add_module("layer4", nn.Conv2d(3, 3, 1))
    assert resolve_layer(model, "layer4") is model.layer4
    with pytest.raises(InputError, match="close matches: layer4"):
        resolve_layer(model, "layer_4")
    with pytest.raises(InputError, match="not a sub-module"):
        resolve_layer(model, nn.ReLU())
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert resolve_layer(nested, "0.1") is nested[0][1] and resolve_layer(nested, "") is nested
    for bad in ("0.0.weight", "0.", "0.5"):  # a parameter, an empty part, an index past the end
        with pytest.raises(InputError, match="no module named"):
            resolve_layer(nested, bad)


def test_preserved_model_state_restores_on_exception():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[0].bias.requires_grad_(False)
    grad_before = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad_before
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_model_state(model) as hooks:
            assert not model.training
            hooks.append(model[0].register_forward_hook(lambda *a: None))
            model[0].weight.requires_grad_(False)
            model[0].weight.grad = None
            raise RuntimeError("boom")
    assert model.training and model[1].training
    assert not model[0]._forward_hooks
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert model[0].weight.grad is grad_before


def test_preserved_model_state_mixed_modes_shared_and_missing_modules():
    """Modes are restored module by module (a model in eval with one module in train, a module
    switched inside), shared modules count once, ``None`` children are skipped."""
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.add_module("again", shared)
    model.register_module("missing", None)
    model.eval()
    model[1].train()
    assert {id(m) for m in _all_modules(model)} == {id(m) for m in model.modules()}
    assert len(_all_modules(model)) == len(list(model.modules())) == 4
    with preserved_model_state(model):
        assert not any(m.training for m in model.modules())
        model[2].train()  # code inside flips a module: restored on exit
        shared.weight.requires_grad_(False)
    assert [model[i].training for i in range(3)] == [False, True, False]
    assert shared.weight.requires_grad
    with preserved_model_state(model, eval_mode=False):
        assert model[1].training
    assert model[1].training and not model.training


@pytest.mark.parametrize(("device", "cuda", "expected"), [
    ("cpu", True, "gloo"),  # a CPU run on a GPU machine: NCCL has no CPU tensors
    (None, True, "nccl"), ("cuda:0", True, "nccl"), (None, False, "gloo"),
])
def test_init_distributed_backend_follows_the_training_device(monkeypatch, device, cuda, expected):
    import torch.distributed as dist

    from foveal.core.training import init_distributed

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert init_distributed(device=device) == (1, 2)
    assert chosen == [expected]


def test_resolve_device_defaults_and_clear_errors(monkeypatch, tmp_path, capsys):
    from foveal.cli import main
    from foveal.core.tensors import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="has 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="no usable CUDA device"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="expected a torch device"):
        resolve_device("gpu0")
    # the CLI turns it into a one-line error before touching the checkpoint
    assert main(["evaluate", str(tmp_path / "missing.safetensors"), str(tmp_path), "--device", "cuda"]) == 1
    assert "no usable CUDA device" in capsys.readouterr().err


def test_training_device_wraps_local_rank_over_the_gpus(monkeypatch):
    from foveal.core.training import training_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert training_device(None) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert training_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(None) == torch.device("cpu")

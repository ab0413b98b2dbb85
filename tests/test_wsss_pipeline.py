"""End-to-end weakly-supervised segmentation (foveal/pipelines/wsss.py), its data set and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from foveal.cli import main
from foveal.data.multiobject import MultiObjectDataset
from foveal.pipelines.wsss import confusion_miou, run_wsss

TINY = dict(
    images=48, size=64, cls_epochs=25, aff_epochs=6,
    vit_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3},
    affinity_options={"backbone_options": {"model_name": "test_resnet"}, "levels": [1, 2, 3],
                      "level_channels": [16, 16, 32], "feature_dim": 32, "walk": "sparse"},
)


def test_dataset_is_deterministic_and_consistent():
    a, b = MultiObjectDataset(8, size=32, seed=3), MultiObjectDataset(8, size=32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, MultiObjectDataset(8, size=32, seed=4).images)
    for i in range(8):
        present = sorted(int(c) - 1 for c in a.masks[i].unique() if c > 0)
        assert present == torch.nonzero(a.labels[i])[:, 0].tolist() and present
    image, labels, mask = a[0]
    assert image.shape == (3, 32, 32) and labels.shape == (3,) and mask.shape == (32, 32)


def test_confusion_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    # class 0: tp 2, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1 -> 2/3; class 2: tp 2, fn 1 -> 2/3
    miou, iou = confusion_miou(pred, target, 4)
    assert iou[:3] == pytest.approx([0.5, 2 / 3, 2 / 3]) and np.isnan(iou[3])
    assert miou == pytest.approx((0.5 + 4 / 3) / 3)


def test_refined_masks_beat_their_seeds(tmp_path):
    result = run_wsss(out=str(tmp_path), progress=False, **TINY)
    assert result.classifier_accuracy > 0.8
    assert result.refined_miou > result.seed_miou + 0.01, result.summary()
    assert result.pseudo_masks.shape == (48, 64, 64) and result.seeds.shape == (48, 3, 64, 64)
    assert float(result.seeds.min()) >= 0 and float(result.seeds.max()) <= 1
    # seeds only for classes present in the image (image-level labels)
    assert (result.seeds.amax((2, 3)) > 0).float().equal(result.data.labels)
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["refined_miou"] == pytest.approx(result.refined_miou)
    assert set(summary["seed_saliency"]) == {"pixel-accuracy", "ap", "miou"}
    assert result.examples.dtype == np.uint8 and result.examples.shape[-1] == 3
    assert (tmp_path / "examples.png").stat().st_size > 0
    assert len(result.history["affinitynet"]) == TINY["aff_epochs"]


def test_cli(tmp_path, capsys):
    code = main(["wsss", "--out", str(tmp_path), "--images", "8", "--size", "32", "--classes", "2",
                 "--cls-epochs", "1", "--aff-epochs", "1", "--examples", "2", "--quiet",
                 "--vit-kwargs", '{"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}',
                 "--affinity", '{"backbone_options": {"model_name": "test_resnet"}, "steps": 4}'])
    assert code == 0
    out = capsys.readouterr().out
    assert "seed mIoU" in out and (tmp_path / "examples.png").exists()
    assert (tmp_path / "affinitynet" / "last.safetensors").exists()


def test_cli_bad_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["wsss", "--out", str(tmp_path), "--affinity", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err

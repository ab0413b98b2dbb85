"""``foveal evaluate-explanations`` end to end on a tiny timm model and synthetic images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from foveal.cli import main
from foveal.cli.options import parse_spec


@pytest.fixture
def data(tmp_path):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        a = (rng.random((48, 48, 3)) * 80).astype(np.uint8)
        m = np.zeros((48, 48), dtype=np.uint8)
        m[10 + 5 * i : 30 + 5 * i, 8:28] = 255
        a[m > 0] = [220, 40 + 60 * i, 30]
        Image.fromarray(a).save(imgs / f"img{i}.png")
        Image.fromarray(m).save(masks / f"img{i}.png")
    return imgs, masks


def test_parse_spec():
    assert parse_spec("insertion") == ("insertion", {})
    assert parse_spec("perturbation-auc:mode=negative,fractions=[0,0.5,0.9],normalize=true") == (
        "perturbation-auc", {"mode": "negative", "fractions": [0, 0.5, 0.9], "normalize": True})
    assert parse_spec("grad-cam:target_layer=layer2") == ("grad-cam", {"target_layer": "layer2"})


def test_evaluate_explanations_writes_table_json_and_plots(data, tmp_path, capsys):
    imgs, masks = data
    out = tmp_path / "out"
    metrics = ["insertion:steps=8", "deletion:steps=8", "average-drop", "perturbation-auc:mode=negative",
               "pointing-game", "saliency-segmentation", "mean-dice"]
    argv = ["evaluate-explanations", str(imgs), "--model", "timm:test_resnet:num_classes=3", "--masks", str(masks),
            "--method", "grad-cam:target_layer=layer2", "--method", "grad-cam++:target_layer=layer2",
            "--size", "48", "--batch-size", "2", "--out", str(out), "--quiet"]
    for m in metrics:
        argv += ["--metric", m]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == ["grad-cam:target_layer=layer2", "grad-cam++:target_layer=layer2"]
    for method, row in res["results"].items():
        assert list(row) == metrics
        for k in ("insertion:steps=8", "deletion:steps=8", "mean-dice", "saliency-segmentation"):
            assert 0 <= row[k] <= 1, (method, k, row[k])
        assert 0 <= row["average-drop"] <= 100 and 0 <= row["perturbation-auc:mode=negative"] <= 0.9
        assert row["pointing-game"] in (0.0, 1 / 3, 2 / 3, 1.0)
        per = res["per_image"][method]
        assert all(len(v) == 3 for v in per.values())
        assert abs(np.mean(per["insertion:steps=8"]) - row["insertion:steps=8"]) < 1e-9
    assert res["metrics"]["deletion:steps=8"]["higher_is_better"] is False
    md = (out / "results.md").read_text()
    assert "| grad-cam++:target_layer=layer2 |" in md and "deletion:steps=8 ↓" in md
    for png in ("results.png", "maps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_evaluate_explanations_with_a_checkpoint(data, tmp_path):
    import foveal
    from foveal import registry

    imgs, _ = data
    ckpt = tmp_path / "model.safetensors"
    foveal.save(registry.build("gap-classifier", model_name="test_resnet", num_classes=3), ckpt)
    out = tmp_path / "out2"
    assert main(["evaluate-explanations", str(imgs / "img0.png"), str(imgs / "img1.png"), "--model", str(ckpt),
                 "--method", "grad-cam", "--metric", "percentage-in:fraction=0.5", "--size", "48",
                 "--target", "1", "--out", str(out), "--quiet", "--grid", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["results"]["grad-cam"]["percentage-in:fraction=0.5"] <= 100
    assert res["target"] == 1 and not (out / "maps.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "grad-cam", "--metric", "pointing-game"], "--masks"),
        (["--method", "grad-cam", "--metric", "grad-cam"], "expected a registered metric"),
        (["--method", "insertion", "--metric", "insertion"], "expected a registered explainer"),
        (["--method", "grad-cam", "--metric", "insertion:stepz=3"], "stepz"),
    ],
)
def test_evaluate_explanations_errors(data, tmp_path, capsys, extra, message):
    imgs, _ = data
    code = main(["evaluate-explanations", str(imgs), "--model", "timm:test_resnet", "--out", str(tmp_path / "o"),
                 "--quiet", *extra])
    assert code == 1
    assert message in capsys.readouterr().err

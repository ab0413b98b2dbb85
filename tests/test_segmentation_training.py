"""Polyp data, structure loss, trainer (quality, exact resume, DDP), evaluation and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foveal.cli import main
from foveal.core.checkpoint import load_state
from foveal.core.errors import InputError
from foveal.data.polyp import PolypDataset, find_pairs, find_test_sets, make_synthetic_polyps
from foveal.metrics.segmentation import dice_iou
from foveal.training.segmentation import evaluate, load_model, scale_size, structure_loss, train

# --- data ---------------------------------------------------------------------------------------


def test_synthetic_layout_and_determinism(tmp_path):
    a = make_synthetic_polyps(tmp_path / "a", num_train=3, num_test=2, test_sets=("X", "Y"), size=40, seed=5)
    b = make_synthetic_polyps(tmp_path / "b", num_train=3, num_test=2, test_sets=("X", "Y"), size=40, seed=5)
    c = make_synthetic_polyps(tmp_path / "c", num_train=3, num_test=2, test_sets=("X", "Y"), size=40, seed=6)
    assert sorted(find_test_sets(a)) == ["X", "Y"]
    pairs = find_pairs(a / "TrainDataset")
    assert [p.name for p, _ in pairs] == ["0000.png", "0001.png", "0002.png"]
    same, other = find_pairs(b / "TrainDataset"), find_pairs(c / "TrainDataset")
    for i, (img, _) in enumerate(pairs):
        assert img.read_bytes() == same[i][0].read_bytes()
        assert img.read_bytes() != other[i][0].read_bytes()
        m = PolypDataset(a / "TrainDataset", size=40)[i][1]
        assert 0.01 < float(m.mean()) < 0.6  # a polyp, not the whole image
    # polyps differ in colour from the background (learnable) but not trivially: check means
    image, mask, _ = PolypDataset(a / "TrainDataset", size=40)[0]
    inside = image[:, mask[0] > 0].mean(1)
    outside = image[:, mask[0] == 0].mean(1)
    assert (inside - outside).abs().max() > 0.2


def test_pairing_errors_name_the_files(tmp_path):
    root = make_synthetic_polyps(tmp_path / "d", num_train=3, num_test=0, test_sets=(), size=32)
    train = root / "TrainDataset"
    (train / "masks" / "0001.png").unlink()
    (train / "masks" / "extra.png").write_bytes((train / "masks" / "0000.png").read_bytes())
    with pytest.raises(InputError) as info:
        find_pairs(train)
    assert "0001.png" in str(info.value) and "extra.png" in str(info.value)


def test_singular_folder_names_and_unreadable_files(tmp_path):
    root = make_synthetic_polyps(tmp_path / "e", num_train=2, num_test=0, test_sets=(), size=32)
    train = root / "TrainDataset"
    (train / "images").rename(train / "image")
    (train / "masks").rename(train / "mask")
    assert len(find_pairs(train)) == 2
    (train / "image" / "0001.png").write_bytes(b"not a png")
    ds = PolypDataset(train, size=32)
    with pytest.raises(InputError, match="0001.png"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="images or image"):
        find_pairs(tmp_path)


# --- loss ---------------------------------------------------------------------------------------


def _reference_structure_loss(logits, mask, legacy):
    """float64 re-derivation of PraNet's structure loss, written without the module's helpers."""
    logits, mask = logits.double(), mask.double()
    w = 1 + 5 * (F.avg_pool2d(mask, 31, 1, 15) - mask).abs()
    p = torch.sigmoid(logits)
    bce = -(mask * torch.log(p) + (1 - mask) * torch.log(1 - p))
    wbce = bce.mean() if legacy else (w * bce).sum((2, 3)) / w.sum((2, 3))
    inter = (p * mask * w).sum((2, 3))
    union = ((p + mask) * w).sum((2, 3))
    return (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()


def test_structure_loss_matches_float64_rederivation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 40, 40, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 40, 40, dtype=torch.float64)
    mask[0, 0, 10:25, 8:30] = 1
    mask[1, 0, 20:, :15] = 1
    for legacy in (False, True):
        torch.testing.assert_close(structure_loss(logits, mask, legacy=legacy),
                                   _reference_structure_loss(logits, mask, legacy))
    # weights matter for a mask with boundaries: the two forms differ
    assert not torch.isclose(structure_loss(logits, mask), structure_loss(logits, mask, legacy=True))


def test_structure_loss_is_small_for_a_perfect_prediction():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    perfect = structure_loss((mask * 2 - 1) * 30, mask)
    wrong = structure_loss((1 - 2 * mask) * 30, mask)
    assert perfect < 1e-3 < 1.0 < wrong
    with pytest.raises(InputError, match="B, 1, H, W"):
        structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))


def test_scale_sizes_follow_polyp_pvt():
    assert [scale_size(352, r) for r in (0.75, 1.0, 1.25)] == [256, 352, 448]


# --- training -----------------------------------------------------------------------------------

# CPU even where a GPU is: bit-exact resume is a CPU property (cuDNN's backward kernels are not
# deterministic); tests/test_cuda.py covers the GPU
SMALL = {"model": "rta-former-t", "model_options": {"width": 16}, "batch_size": 4, "size": 32,
         "scales": [1.0], "progress": False, "seed": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_synthetic_polyps(tmp_path_factory.mktemp("small"), num_train=4, num_test=0, test_sets=(),
                                 size=32, seed=1)


@pytest.mark.heavy
def test_resume_is_exact(small_data, tmp_path):
    straight = train(SMALL, data=str(small_data), out=str(tmp_path / "a"), epochs=2)
    train(SMALL, data=str(small_data), out=str(tmp_path / "b"), epochs=1)
    resumed = train(SMALL, data=str(small_data), out=str(tmp_path / "b"), epochs=2, resume=True)
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    la = [r["loss"] for r in straight["history"]]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 2
    state = load_state(tmp_path / "b" / "last.safetensors")
    assert state["epoch"] == 2 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("polyps")
    data = make_synthetic_polyps(root / "data", num_train=16, num_test=8, test_sets=("SynthA",), size=48, seed=0)
    result = train(data=str(data), out=str(root / "run"), model="rta-former-t", epochs=8, batch_size=8,
                   size=32, scales=[1.0], lr=3e-3, progress=False, seed=0)
    scores = evaluate(result["model"], data, size=32, progress=False)
    return data, root / "run", result, scores


@pytest.mark.heavy
def test_short_training_beats_trivial_baselines(trained):
    data, run, result, scores = trained
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < 0.6 * losses[0]
    scores = scores["SynthA"]
    masks = torch.stack([PolypDataset(data / "TestDataset" / "SynthA", size=48, mask_size="original")[i][1][0]
                         for i in range(8)]).bool()
    all_fg = float(dice_iou(torch.ones_like(masks), masks)[0].mean())  # trivial baselines: Dice <= ~0.3
    assert all_fg < 0.4
    assert scores["meanDice"] > 0.65 and scores["dice@0.5"] > 0.65, scores
    assert scores["meanDice"] > all_fg + 0.3


@pytest.mark.heavy
def test_cli_evaluate_and_predict(trained, tmp_path, capsys):
    data, run, result, direct = trained
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "model.safetensors"), str(data), "--size", "32", "--json", str(out_json),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "meanDice" in table and "SynthA" in table
    saved = json.loads(out_json.read_text())
    # CLI and direct call agree; 1e-5 leaves room for GPU arithmetic where the CLI picks CUDA
    assert saved["SynthA"]["meanDice"] == pytest.approx(direct["SynthA"]["meanDice"], abs=1e-5)
    # the training state rebuilds the same model
    device = next(result["model"].parameters()).device  # trained on CUDA where there is one
    again = load_model(run / "last.safetensors", device=device)
    x = torch.randn(1, 3, 32, 32, device=device)
    torch.testing.assert_close(again.eval()(x), result["model"].eval()(x))
    assert main(["predict", str(run / "model.safetensors"), str(data / "TestDataset" / "SynthA"),
                 str(tmp_path / "pred"), "--size", "32", "--quiet"]) == 0
    masks = sorted((tmp_path / "pred" / "masks").iterdir())
    assert len(masks) == 8 and len(list((tmp_path / "pred" / "overlays").iterdir())) == 8
    from foveal.data.images import read_mask

    assert read_mask(masks[0]).shape == (48, 48)


def test_cli_make_synthetic_and_errors(tmp_path, capsys):
    assert main(["make-synthetic-polyps", str(tmp_path / "s"), "--train", "2", "--test", "1", "--size", "32"]) == 0
    assert len(list((tmp_path / "s" / "TestDataset" / "SynthB" / "masks").iterdir())) == 1
    capsys.readouterr()
    assert main(["train", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--model", "rta-former-t",
                 "--set", "num_classes=2", "--quiet"]) == 1
    assert "num_classes=1" in capsys.readouterr().err


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from foveal.core.checkpoint import save_state
    from foveal.training.segmentation import train

    result = train(data=sys.argv[1], out=sys.argv[2], model="rta-former-t", model_options={"width": 16},
                   epochs=2, batch_size=4, size=32, scales=[1.0], progress=False, seed=0, device="cpu")
    save_state(dict(result["model"].state_dict()), f"{sys.argv[2]}/rank{dist.get_rank()}.safetensors")
    dist.destroy_process_group()
""")


@pytest.mark.heavy
def test_ddp_two_cpu_processes_keep_identical_replicas(small_data, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(small_data), str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_state(out / "rank0.safetensors"), load_state(out / "rank1.safetensors")
    assert set(r0) == set(r1)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"replicas differ in {k}"
    init = load_model(out / "model.safetensors").state_dict()
    assert torch.equal(init["decoder.head.1.weight"], r0["decoder.head.1.weight"])
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log)
    # each process takes half of each global batch: 4 images / batch 4 = 1 step per epoch
    assert log[0]["steps"] == 1


def test_load_model_names_an_unknown_config_field_of_a_training_state(tmp_path):
    from foveal import registry
    from foveal.core.errors import CheckpointError
    from foveal.core.training import save_training_state

    model = registry.build("rta-former-t", width=16)
    config = {**model.config.model_dump(mode="json"), "future_option": 1}
    save_training_state(tmp_path / "last.safetensors", model=model, epoch=1,
                        extra={"model": "rta-former-t", "model_config": config})
    with pytest.raises(CheckpointError, match="'future_option' .*'rta-former-t' does not know: written by a newer"):
        load_model(tmp_path / "last.safetensors")
    # a state that recorded an initial weights file rebuilds without it (the file may be gone)
    save_training_state(tmp_path / "old.safetensors", model=model, epoch=1, extra={
        "model": "rta-former-t", "model_config": {**model.config.model_dump(mode="json"),
                                                  "backbone_weights": str(tmp_path / "gone.pth")}})
    again = load_model(tmp_path / "old.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


# --- masks as the reference loaders read them (issue 15.5) --------------------------------------


def _grey_mask(path, values):
    from PIL import Image

    Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(path)
    return path


def _one_pair(root, mask_values, size=(37, 50)):
    from foveal.viz import save_image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    save_image(np.full((*size, 3), 128, np.uint8), root / "images" / "a.png")
    return _grey_mask(root / "masks" / "a.png", mask_values)


def test_training_masks_are_resized_like_the_reference_loader(tmp_path):
    from PIL import Image
    from torchvision import transforms

    yy, xx = np.mgrid[0:37, 0:50]
    disk = ((yy - 18) ** 2 + (xx - 22) ** 2 < 12**2) * 255
    path = _one_pair(tmp_path, disk)
    mask = PolypDataset(tmp_path, size=32)[0][1]
    # PraNet / Polyp-PVT utils/dataloader.py: transforms.Resize((s, s)) + ToTensor() of the "L" image
    reference = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])(
        Image.open(path).convert("L"))
    assert mask.shape == (1, 32, 32) and torch.equal(mask, reference)
    soft = (mask > 0) & (mask < 1)
    assert soft.sum() > 10  # soft values along the boundary, not a binary mask
    hard = PolypDataset(tmp_path, size=32, soft_masks=False)[0][1]
    assert set(hard.unique().tolist()) == {0.0, 1.0}


def test_evaluation_masks_keep_their_size_and_are_binarised_like_the_toolbox(tmp_path):
    values = np.zeros((37, 50), np.uint8)
    values[:, 10:20], values[:, 20:30], values[:, 30:40], values[:, 40:] = 127, 128, 129, 255
    _one_pair(tmp_path, values)
    mask = PolypDataset(tmp_path, size=32, mask_size="original")[0][1][0]
    assert mask.shape == (37, 50)
    # PraNet's evaluation toolbox (main.m): gt = gt > 128
    expected = torch.from_numpy(values > 128).float()
    assert torch.equal(mask, expected) and mask[:, 20:30].sum() == 0


def test_training_without_backbone_weights_warns_once_and_logs_it(small_data, tmp_path):
    from safetensors.torch import save_file

    from foveal import registry

    with pytest.warns(UserWarning, match=r"rta-former-t: the encoder \(pvt-v2-b0\) starts from random weights.*"
                                         r"rta-former.txt sec. II.B.*--backbone-weights pvt_v2_b0.pth"):
        train(SMALL, data=str(small_data), out=str(tmp_path / "a"), epochs=1)
    first = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 1 and "random weights" in first["warnings"][0]
    body = registry.build("pvt-v2-b0").body.state_dict()
    save_file({k: v.contiguous() for k, v in body.items()}, tmp_path / "pvt.safetensors")
    options = {**SMALL["model_options"], "backbone_weights": str(tmp_path / "pvt.safetensors")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train({**SMALL, "model_options": options}, data=str(small_data), out=str(tmp_path / "b"), epochs=1)
    assert "warnings" not in json.loads((tmp_path / "b" / "metrics.jsonl").read_text())

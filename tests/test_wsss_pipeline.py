"""End-to-end weakly-supervised segmentation (foveal/pipelines/wsss.py), its data set and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from foveal.cli import main
from foveal.core.errors import InputError
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


# --- PASCAL VOC layout, end to end through the CLI ------------------------------------------------

VIT_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
AFFINITY = {"levels": [1, 2, 3], "level_channels": [16, 16, 32], "feature_dim": 32}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A tiny VOC tree (data-readers' fixture writer: JPEGs, palette PNGs with 255 bands, ImageSets,
    psa's train_aug list and cls_labels.npy) and "pretrained" local weights of a ViT and a CNN."""
    import timm
    from safetensors.torch import save_file

    from foveal.data.fixtures import write_voc

    root = tmp_path_factory.mktemp("voc")
    truth = write_voc(root, n_train=6, n_val=2, n_aug=2, size=(40, 56), seed=0)
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KWARGS).state_dict(),
              root / "vit.safetensors")
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), root / "cnn.safetensors")
    return root, truth


def voc_args(root, out, *extra):
    return ["wsss", "--out", str(out), "--dataset", "voc", "--data-root", str(root), "--split", "train_aug",
            "--eval-split", "train", "--vit", "vit_tiny_patch16_224", "--weights", str(root / "vit.safetensors"),
            "--vit-kwargs", json.dumps(VIT_KWARGS), "--image-size", "64", "--cls-epochs", "2", "--cls-batch-size",
            "4", "--aff-epochs", "2", "--aff-batch-size", "4", "--aff-crop", "48", "--backbone", "test_resnet",
            "--backbone-weights", str(root / "cnn.safetensors"), "--affinity", json.dumps(AFFINITY), "--crf", "off",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def voc_run(voc, tmp_path_factory):
    """One uninterrupted run on the VOC fixture (the reference of the resume and torchrun tests)."""
    root, _ = voc
    out = tmp_path_factory.mktemp("voc_run")
    assert main(voc_args(root, out)) == 0
    return out


def read_png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode == "P"  # a VOC palette PNG
        return np.asarray(im).copy()


def oracle_miou(truth: dict, ids: list, folder) -> tuple[float, np.ndarray]:
    """VOC mIoU re-derived in numpy: 21 x 21 confusion pooled over the images, ground-truth 255 ignored."""
    cm = np.zeros((21, 21), np.float64)
    for i in ids:
        gt, pred = truth[i].astype(np.int64), read_png(folder / f"{i}.png").astype(np.int64)
        keep = gt != 255
        cm += np.bincount(gt[keep] * 21 + pred[keep], minlength=441).reshape(21, 21)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def test_voc_end_to_end(voc, voc_run):
    from foveal.data.voc import VOC_CLASSES, read_id_list
    from foveal.refine.store import SeedStore

    root, truth = voc
    voc2012 = root / "VOCdevkit" / "VOC2012"
    train_aug = read_id_list(voc2012 / "ImageSets" / "SegmentationAug" / "train_aug.txt")
    train = read_id_list(voc2012 / "ImageSets" / "Segmentation" / "train.txt")
    # seeds: one float16 file per image of both splits, only for the classes the image is labelled with
    store = SeedStore(voc_run / "seeds")
    assert sorted(p.stem for p in (voc_run / "seeds").glob("*.npz")) == sorted(set(train_aug) | set(train))
    for i in train_aug:
        rec = store.read(i)
        present = sorted(int(c) - 1 for c in np.unique(truth[i]) if 0 < c < 255)
        assert rec.classes.tolist() == present and rec.seeds.shape == (len(present), 40, 56)
        with np.load(store.path(i)) as f:
            assert f["seeds"].dtype == np.float16 and f["logits"].shape == (20,)
        assert 0 <= float(rec.seeds.min()) and float(rec.seeds.max()) <= 1
    # pseudo-masks: palette PNGs at the stored size, only background and the image's own classes
    for variant in ("seeds", "refined"):
        for i in train:
            labels = read_png(voc_run / "masks" / variant / f"{i}.png")
            assert labels.shape == (40, 56)
            assert set(np.unique(labels).tolist()) <= {0} | {int(c) for c in np.unique(truth[i]) if 0 < c < 255}
    assert not (voc_run / "masks" / "refined_crf").exists()  # --crf off
    # the mIoU equals a numpy re-derivation over the evaluation split (pooled, 255 ignored)
    result = json.loads((voc_run / "result.json").read_text())
    for variant in ("seeds", "refined"):
        miou, iou = oracle_miou(truth, train, voc_run / "masks" / variant)
        assert result["miou"][variant] == pytest.approx(miou, abs=1e-12)
        per_class = [result["iou"][variant][c] for c in VOC_CLASSES]
        np.testing.assert_allclose(np.array(per_class, dtype=float), iou, atol=1e-12)
    assert 0 <= result["classifier_accuracy"] <= 1
    # the report: per-class IoU of the VOC classes, example overlays, timing of every stage
    report = (voc_run / "report.html").read_text()
    assert "Per-class IoU" in report and "aeroplane" in report and "tvmonitor" in report
    assert report.count("data:image/png;base64,") >= 2 and "Seeds vs refined" in report
    for stage in ("classifier", "seeds", "affinity", "walk", "eval"):
        assert f"<td>{stage}</td>" in report
    assert (voc_run / "classifier" / "classifier.safetensors").exists()
    assert (voc_run / "affinitynet" / "affinitynet.safetensors").exists()


def _same_outputs(a, b, variants=("seeds", "refined")):
    seeds_a = sorted(p.name for p in (a / "seeds").glob("*.npz"))
    assert seeds_a == sorted(p.name for p in (b / "seeds").glob("*.npz")) and seeds_a
    for name in seeds_a:
        with np.load(a / "seeds" / name) as fa, np.load(b / "seeds" / name) as fb:
            assert all(np.array_equal(fa[k], fb[k]) for k in ("seeds", "classes", "logits")), name
    for v in variants:
        names = sorted(p.name for p in (a / "masks" / v).glob("*.png"))
        assert names == sorted(p.name for p in (b / "masks" / v).glob("*.png")) and names
        for name in names:
            assert np.array_equal(read_png(a / "masks" / v / name), read_png(b / "masks" / v / name)), name
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert ra["miou"] == rb["miou"]


def test_voc_resumes_after_interruptions(voc, voc_run, tmp_path, monkeypatch, capsys):
    """Killed while writing seeds, then killed while writing pseudo-masks: each resumed run skips the
    images already written, and the final outputs equal the uninterrupted run's."""
    import foveal.pipelines.wsss as pipeline
    from foveal.refine.store import SeedStore

    root, _ = voc
    out = tmp_path / "run"
    calls = {"write": 0, "png": 0, "explained": 0}
    write, png, explain = SeedStore.write, pipeline.write_label_png, pipeline.explain_image

    def crashing_write(self, *args, **kwargs):
        if calls["write"] == 3:
            raise KeyboardInterrupt  # as if killed after three seed files
        calls["write"] += 1
        return write(self, *args, **kwargs)

    monkeypatch.setattr(SeedStore, "write", crashing_write)
    assert main(voc_args(root, out)) == 130
    assert len(list((out / "seeds").glob("*.npz"))) == 3 and not list((out / "seeds").glob(".*"))
    monkeypatch.setattr(SeedStore, "write", write)
    capsys.readouterr()
    assert main(voc_args(root, out)) == 1  # a fresh run into a folder holding one is refused
    assert "already holds a WSSS run" in capsys.readouterr().err
    assert main(voc_args(root, out, "--resume", "--aff-epochs", "3")) == 1  # so is a resume with other settings
    assert "aff_epochs (saved 2, now 3)" in capsys.readouterr().err
    keep = out / "notes.txt"
    keep.write_text("not the run's")
    assert main(voc_args(root, out, "--overwrite", "--stop-after", "classifier")) == 0  # deletes the run's files
    assert not (out / "seeds").exists() and keep.read_text() == "not the run's"
    keep.unlink()
    calls["write"] = 0
    monkeypatch.setattr(SeedStore, "write", crashing_write)
    assert main(voc_args(root, out, "--resume")) == 130  # killed again after three seed files
    monkeypatch.setattr(SeedStore, "write", write)

    def counting_explain(*args, **kwargs):
        calls["explained"] += 1
        return explain(*args, **kwargs)

    def crashing_png(*args, **kwargs):
        if calls["png"] == 5:
            raise KeyboardInterrupt  # killed during the random walk
        calls["png"] += 1
        return png(*args, **kwargs)

    monkeypatch.setattr(pipeline, "explain_image", counting_explain)
    monkeypatch.setattr(pipeline, "write_label_png", crashing_png)
    assert main(voc_args(root, out, "--resume")) == 130
    assert calls["explained"] == 8 - 3  # only the images without seeds were explained
    monkeypatch.setattr(pipeline, "write_label_png", png)
    assert main(voc_args(root, out, "--resume")) == 0
    assert calls["explained"] == 5  # nothing explained again
    timing = [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
    walks = [t for t in timing if t["stage"] == "walk"]
    assert walks[-1]["skipped"] == 2 and walks[-1]["done"] == 4  # 5 PNGs = 2 images x 2 variants + 1
    _same_outputs(out, voc_run)
    from foveal import load

    ref, got = load(voc_run / "affinitynet" / "affinitynet.safetensors"), load(out / "affinitynet" /
                                                                                "affinitynet.safetensors")
    assert all(torch.equal(ref.state_dict()[k], got.state_dict()[k]) for k in ref.state_dict())


@pytest.mark.heavy
def test_voc_torchrun_two_ranks_equal_one(voc, voc_run, tmp_path):
    """torchrun, 2 CPU processes (gloo) with the reference run's classifier: the sharded seed files
    equal the single-process ones bit for bit, DDP AffinityNet equals single-process training (the
    pair counts are summed over the processes), and so do the pseudo-masks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import foveal
    from foveal import load

    root, truth = voc
    out = tmp_path / "ddp"
    classifier = voc_run / "classifier" / "classifier.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(foveal.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "foveal.cli",
           *voc_args(root, out, "--classifier", str(classifier), "--device", "cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refined" in proc.stdout and proc.stdout.count("seed mIoU") == 1  # rank 0 reports, once
    ref = load(voc_run / "affinitynet" / "affinitynet.safetensors").state_dict()
    got = load(out / "affinitynet" / "affinitynet.safetensors").state_dict()
    changed = [k for k in ref if not torch.equal(ref[k], got[k])]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    assert len(changed) < len(ref)  # frozen layers are identical, trained ones agree to float noise
    _same_outputs(out, voc_run)
    timing = [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
    seeds = next(t for t in timing if t["stage"] == "seeds")
    assert seeds["done"] == 8 and seeds["skipped"] == 0  # every image once over the two ranks


# --- pieces of the pipeline ---------------------------------------------------------------------


def test_pooled_confusion_ignores_truth_255_and_counts_predicted_255_as_a_miss():
    from foveal.pipelines.wsss import PooledConfusion

    cm = PooledConfusion(3)
    cm.add(torch.tensor([0, 1, 1, 2, 255]), torch.tensor([0, 1, 255, 2, 2]))  # truth 255 skipped
    cm.add(np.array([[1, 0]]), np.array([[1, 1]]))  # pooled over images
    # class 0: tp 1, fp 1 (a 1 predicted 0) -> 1/2; class 1: tp 2, fn 1 -> 2/3; class 2: tp 1, fn 1 (the 255) -> 1/2
    miou, iou = cm.iou()
    assert iou == pytest.approx([0.5, 2 / 3, 0.5]) and miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    with pytest.raises(InputError, match="labels must be 0..2"):
        cm.add(torch.tensor([3]), torch.tensor([0]))


def test_vit_from_local_weights_and_classifier_file(tmp_path):
    import timm
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from foveal.core.errors import CheckpointError
    from foveal.training.multilabel import build_vit, load_classifier, save_classifier

    kw = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)  # 1000 classes, 224 px
    save_file(pretrained.state_dict(), tmp_path / "vit.safetensors")
    model = build_vit("vit_tiny_patch16_224", 3, 64, kw, tmp_path / "vit.safetensors")
    ref = pretrained.state_dict()
    got = model.state_dict()
    assert torch.equal(got["blocks.1.mlp.fc2.weight"], ref["blocks.1.mlp.fc2.weight"])
    assert got["head.weight"].shape == (3, 32) and got["pos_embed"].shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(got["pos_embed"][:, 0], ref["pos_embed"][:, 0])  # class token kept, grid resampled
    with pytest.raises(CheckpointError, match="missing"):
        build_vit("vit_tiny_patch16_224", 3, 64, {**kw, "depth": 3}, tmp_path / "vit.safetensors")
    info = {"vit": "vit_tiny_patch16_224", "vit_kwargs": kw, "classes": ["a", "b", "c"], "image_size": 64,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    save_classifier(model, tmp_path / "cls.safetensors", info)
    loaded, got_info = load_classifier(tmp_path / "cls.safetensors", classes=["a", "b", "c"])
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.equal(loaded(x), model(x)) and got_info["image_size"] == 64
    with pytest.raises(InputError, match="classifies"):
        load_classifier(tmp_path / "cls.safetensors", classes=["a", "b"])
    # psa's multilabel_soft_margin_loss is the BCE the trainer uses
    y = (torch.rand(2, 3) > 0.5).float()
    logits = loaded(x)
    assert torch.allclose(F.binary_cross_entropy_with_logits(logits, y), F.multilabel_soft_margin_loss(logits, y))


class _Images:
    classes = ["a", "b"]

    def __init__(self, n=8, size=32):
        g = np.random.default_rng(0)
        self.rgb = (g.random((n, size, size, 3)) * 255).astype(np.uint8)
        self.labels = torch.from_numpy((g.random((n, 2)) > 0.5).astype(np.float32))

    def __len__(self):
        return len(self.rgb)

    def load(self, i):
        return str(i), self.rgb[i], self.labels[i]


def test_classifier_training_resumes_exactly(tmp_path):
    from foveal.training.multilabel import train_multilabel

    opts = dict(vit="vit_tiny_patch16_224", vit_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
                image_size=32, epochs=2, batch_size=4, progress=False, device="cpu")
    full = train_multilabel(_Images(), out=str(tmp_path / "a"), **opts)
    calls = [0]
    import foveal.training.multilabel as ml

    real = ml.F.binary_cross_entropy_with_logits

    def crash(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # first step of the second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ml.F.binary_cross_entropy_with_logits = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train_multilabel(_Images(), out=str(tmp_path / "b"), **opts)
    finally:
        ml.F.binary_cross_entropy_with_logits = real
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 1  # the first epoch completed
    with pytest.raises(InputError, match="already holds a training run"):  # no silent restart into a run
        train_multilabel(_Images(), out=str(tmp_path / "b"), **opts)
    resumed = train_multilabel(_Images(), out=str(tmp_path / "b"), resume=True, **opts)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]


def test_seed_store_round_trip_validation_and_atomic_writes(tmp_path, monkeypatch):
    from foveal.refine.store import SeedStore, shard

    store = SeedStore(tmp_path / "seeds")
    seeds = torch.rand(2, 5, 7)
    store.write("2007_000032", seeds, [3, 11], torch.randn(20))
    rec = store.read("2007_000032")
    assert rec.classes.tolist() == [3, 11] and torch.equal(rec.seeds, seeds.half().float())
    assert rec.dense(20)[[3, 11]].equal(rec.seeds) and rec.dense(20).sum() == rec.seeds.sum()
    with pytest.raises(InputError, match=r"expected \(1, H, W\)"):
        store.write("x", seeds, [3], torch.zeros(20))
    with pytest.raises(InputError, match="increasing"):
        store.write("x", seeds, [11, 3], torch.zeros(20))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        store.write("x", seeds * 2, [3, 11], torch.zeros(20))
    with pytest.raises(FileNotFoundError, match="seeds stage"):
        store.read("missing")

    def broken(f, **arrays):  # dies half-way through writing the file
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(KeyboardInterrupt):
        store.write("2007_000039", seeds, [3, 11], torch.zeros(20))
    assert not store.has("2007_000039") and sorted(p.name for p in store.folder.iterdir()) == ["2007_000032.npz"]
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and all(len(p) in (3, 4) for p in parts)


def test_pseudo_ignore_and_class_ids_of_walked_masks():
    from foveal.pipelines.wsss import walk_image

    torch.manual_seed(0)
    refiner = registry_build_small()
    rgb = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    seeds = torch.rand(2, 32, 40) ** 2
    classes = torch.tensor([6, 14])  # VOC car and person -> PNG values 7 and 15
    plain = walk_image(refiner, rgb, seeds, classes, False, None, "cpu")
    assert set(np.unique(plain["refined"]).tolist()) <= {0, 7, 15} and set(plain) == {"seeds", "refined"}
    ignored = walk_image(refiner, rgb, seeds, classes, False, 0.99, "cpu")["refined"]
    assert (ignored == 255).any() and np.array_equal(ignored[ignored != 255], plain["refined"][ignored != 255])
    empty = walk_image(refiner, rgb, torch.zeros(0, 32, 40), torch.zeros(0, dtype=torch.long), False, None, "cpu")
    assert (empty["seeds"] == 0).all() and (empty["refined"] == 0).all()  # no class: all background


def registry_build_small():
    from foveal import registry

    return registry.build("affinitynet", backbone_options={"model_name": "test_resnet"}, levels=[1, 2],
                          level_channels=[8, 8], feature_dim=8, walk="sparse", steps=8).eval()


def test_real_dense_crf_snaps_to_colour_edges():
    pytest.importorskip("pydensecrf")
    from foveal.refine.crf import dense_crf

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (220, 30, 30)
    rgb[:, 20:] = (30, 30, 220)
    scores = np.full((2, 20, 40), 0.4)
    scores[0, :, :26] = 0.6  # the unaries put the border at column 26, the colours at 20
    scores[1, :, 26:] = 0.6
    probs = dense_crf(rgb, scores)
    assert probs.shape == (2, 20, 40) and np.allclose(probs.sum(0), 1, atol=1e-4)
    labels = probs.argmax(0)
    assert (labels[:, :20] == 0).all() and (labels[:, 20:] == 1).all()


def test_crf_rows_skipped_with_a_note_when_missing(tmp_path, monkeypatch):
    import sys

    from foveal.core.errors import FovealError

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    small = dict(images=8, size=32, num_classes=2, cls_epochs=1, aff_epochs=1, examples=1, progress=False,
                 vit_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
                 affinity_options={"backbone_options": {"model_name": "test_resnet"}, "steps": 4})
    result = run_wsss(out=str(tmp_path / "a"), **small)
    assert set(result.miou) == {"seeds", "refined"} and "pip install 'foveal[crf]'" in result.notes[0]
    assert "foveal[crf]" in (tmp_path / "a" / "report.html").read_text()
    with pytest.raises(FovealError, match="pydensecrf2"):
        run_wsss(out=str(tmp_path / "b"), crf_eval=True, **small)


def test_presets_and_bad_dataset_settings(tmp_path):
    from pydantic import ValidationError

    from foveal.data.fixtures import write_imagenet_folders
    from foveal.pipelines.wsss import WSSSConfig

    with pytest.raises(ValidationError, match="needs data_root"):
        WSSSConfig(dataset="voc")
    with pytest.raises(ValidationError, match="without dataset"):
        WSSSConfig(data_root="/data")
    assert WSSSConfig(dataset="voc", data_root="/data").aff_crop == 448  # the voc preset: paper / psa values
    assert WSSSConfig(dataset="voc", data_root="/data", aff_crop=320).aff_crop == 320  # a set field wins
    synthetic = WSSSConfig().affinity_options
    assert synthetic["walk_preset"] == "paper" and synthetic["pairs"] == "all" and not synthetic["freeze_bn"]
    assert WSSSConfig(affinity_options={"feature_dim": 8}).affinity_options["walk_preset"] == "paper"  # merged
    assert "walk_preset" not in WSSSConfig(affinity_options={"steps": 4}).affinity_options  # explicit t wins
    assert WSSSConfig(dataset="voc", data_root="/data").affinity_options.get("walk_preset") is None  # psa's
    write_imagenet_folders(tmp_path / "folder", per_class=1, size=32)
    with pytest.raises(InputError, match="no image-level 'labels'"):
        run_wsss(out=str(tmp_path / "out"), dataset="folder", data_root=str(tmp_path / "folder" / "n01440764"),
                 progress=False)


def test_voc_labels_from_cls_labels_without_masks(voc, voc_run, tmp_path):
    """psa's cls_labels.npy as the only labels, no ground truth read (masks none): the val images get
    seeds and pseudo-masks, the mIoU is not computed and the report says so."""
    from foveal.data.voc import read_id_list

    root, truth = voc
    out = tmp_path / "nomasks"
    args = voc_args(root, out, "--classifier", str(voc_run / "classifier" / "classifier.safetensors"),
                    "--masks", "none", "--cls-labels", str(root / "cls_labels.npy"), "--eval-split", "val",
                    "--aff-epochs", "1")
    assert main(args) == 0
    val = read_id_list(root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt")
    assert sorted(p.stem for p in (out / "masks" / "refined").glob("*.png")) == sorted(val)
    result = json.loads((out / "result.json").read_text())
    assert all(np.isnan(v) for v in result["miou"].values())
    assert any("no ground-truth masks" in n for n in result["notes"])
    from foveal.refine.store import SeedStore

    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    for i in val:  # the seeds follow the cls_labels table
        assert SeedStore(out / "seeds").read(i).classes.tolist() == np.nonzero(labels[i])[0].tolist()

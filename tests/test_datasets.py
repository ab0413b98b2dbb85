"""On-disk dataset readers (ImageNet, ImageNet-segmentation, PASCAL VOC, polyp/folder) on tiny
fixtures written in the exact real formats by foveal.data.fixtures."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from foveal.core.errors import InputError
from foveal.data.datasets import FolderDataset, open_dataset
from foveal.data.fixtures import (
    FIXTURE_SYNSETS,
    write_ilsvrc_flat,
    write_imagenet_folders,
    write_imagenet_seg_mat,
    write_voc,
)
from foveal.data.imagenet import ImageNetDataset
from foveal.data.imagenet_seg import ImageNetSegDataset
from foveal.data.items import ItemTransform, collate
from foveal.data.polyp import make_synthetic_polyps
from foveal.data.voc import (
    VOC_CLASSES,
    VOC_PALETTE,
    VOCDataset,
    labels_from_mask,
    read_voc_label_png,
    write_voc_palette_png,
)

WNIDS = [w for w, _ in FIXTURE_SYNSETS]
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # images in [0, 1]: x * 255 is the stored pixel


def _pixels(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _same_batches(ds, batch_size: int = 2) -> None:
    serial = list(DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate))
    parallel = list(DataLoader(ds, batch_size=batch_size, num_workers=2, collate_fn=collate))
    assert len(serial) == len(parallel) == -(-len(ds) // batch_size)
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


# --- ImageNet --------------------------------------------------------------------------------

def test_imagenet_subset_folders_keep_global_indices(tmp_path):
    subset = ["n01443537", "n01494475", "n01514859"]  # global classes 1, 4, 8
    truth = write_imagenet_folders(tmp_path / "val", classes=subset, per_class=2, size=(40, 52))
    ds = ImageNetDataset(tmp_path / "val", size=32, **RAW)
    assert ds.layout == "folders" and ds.classes == WNIDS and ds.num_classes == 10
    assert ds.class_names[4] == "hammerhead"
    assert sorted(set(truth.values())) == [1, 4, 8]
    assert len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and item["label"] == truth[item["id"]]
        assert item["original_size"] == (40, 52) and item["image"].shape == (3, 32, 32)
    assert [ds[i]["label"] for i in range(len(ds))] == [1, 1, 4, 4, 8, 8]


def test_imagenet_folders_without_mapping_use_sorted_folders_and_warn(tmp_path):
    write_imagenet_folders(tmp_path / "val", classes=["n01494475", "n01443537"], synsets=None, per_class=1)
    with pytest.warns(UserWarning, match="not the 1000 ImageNet classes"):
        ds = ImageNetDataset(tmp_path / "val")
    assert ds.classes == ["n01443537", "n01494475"]
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 1]


def test_imagenet_generic_class_folders_with_repeated_stems(tmp_path):
    for cls in ("circle", "square"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / cls / "0001.png")
    ds = open_dataset("imagenet", tmp_path, size=8)
    assert ds.ids == ["circle/0001", "square/0001"] and [it["label"] for it in ds] == [0, 1]


def test_imagenet_flat_val_with_kaggle_csv_found_four_levels_up(tmp_path):
    val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    truth = write_ilsvrc_flat(val, n=6, classes=["n01518878", "n01440764", "n01496331"], val_txt=False)
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.move(val / name, tmp_path / name)  # where Kaggle's download keeps them
    ds = open_dataset("imagenet", tmp_path, split="val", size=24)
    assert ds.layout == "flat" and ds.label_file == tmp_path / "LOC_val_solution.csv"
    assert ds.ids == [f"ILSVRC2012_val_{k:08d}" for k in range(1, 7)]
    assert [it["label"] for it in ds] == [truth[i] for i in ds.ids] == [9, 0, 5, 9, 0, 5]


def test_imagenet_flat_val_with_caffe_val_txt(tmp_path):
    truth = write_ilsvrc_flat(tmp_path / "val", n=4, solution_csv=False, synsets=None)
    ds = ImageNetDataset(tmp_path / "val", size=16)
    assert ds.label_file.name == "val.txt" and ds.num_classes == 1000
    assert {it["id"]: it["label"] for it in ds} == truth
    # the pixels are the decoded JPEG's
    item = ImageNetDataset(tmp_path / "val", size=None, **RAW)[0]
    assert np.array_equal(_pixels(item["image"]), _decoded(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"))


def test_resize_crop_equals_torchvision_resize_center_crop(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
    with Image.open(path) as im:
        im = im.convert("RGB")
        for size, scale in ((224, 256), (32, 37)):
            ours = ItemTransform.make(size, "resize-crop").image(im)
            ref = T.Compose([T.Resize(scale), T.CenterCrop(size), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(im)
            assert ours.shape == (3, size, size)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        ours = ItemTransform.make((24, 40), "resize", mean=(0.5,) * 3, std=(0.5,) * 3).image(im)
        ref = T.Compose([T.Resize((24, 40)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])(im)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resize", ["resize", "resize-crop"])
def test_mask_follows_the_image_geometry(tmp_path, resize):
    """A mask and an image painting that mask white stay aligned after the transform (a shifted
    crop or a transposed mask would disagree on a band of pixels)."""
    y, x = np.mgrid[0:60, 0:100]
    mask = ((x - 30) ** 2 / 15**2 + (y - 20) ** 2 / 9**2 <= 1) | ((x > 70) & (y > 35))
    im = Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8))
    label_map = (mask * 15).astype(np.uint8)
    label_map[:, 46:56] = 255  # an ignore band
    t = ItemTransform.make((33, 47), resize, **RAW)
    out_mask = t.mask(label_map)
    assert out_mask.dtype == torch.int64 and out_mask.shape == (33, 47)
    white = t.image(im)[0] > 0.5
    assert (white == (out_mask == 15)).float().mean() > 0.95
    assert set(out_mask.unique().tolist()) == {0, 15, 255}  # nearest: no interpolated classes


def test_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageNet folder not found"):
        ImageNetDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        ImageNetDataset(tmp_path / "empty")
    # a class folder not in the mapping, with the close match
    write_imagenet_folders(tmp_path / "bad", classes=["n01443537"], per_class=1)
    (tmp_path / "bad" / "n01443537").rename(tmp_path / "bad" / "n01443538")
    with pytest.raises(InputError, match=r"'n01443538' is not in the synset mapping.*did you mean n01443537"):
        ImageNetDataset(tmp_path / "bad")
    # the ImageNet root instead of its val folder
    write_imagenet_folders(tmp_path / "in" / "val", classes=["n01443537"], per_class=1, synsets=None)
    write_imagenet_folders(tmp_path / "in" / "train", classes=["n01443537"], per_class=1, synsets=None)
    with pytest.raises(InputError, match="split folders"):
        ImageNetDataset(tmp_path / "in")
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        open_dataset("imagenet", tmp_path / "in", split="test")


def test_imagenet_flat_label_errors(tmp_path):
    flat = tmp_path / "flat"
    write_ilsvrc_flat(flat, n=3, solution_csv=False, val_txt=False, synsets=None)
    with pytest.raises(FileNotFoundError, match="without a label file: expected LOC_val_solution.csv"):
        ImageNetDataset(flat)
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 3\nILSVRC2012_val_00000002.JPEG 1000\n")
    with pytest.raises(InputError, match=r"val.txt:2: class index 1000 is out of range 0..999"):
        ImageNetDataset(flat)
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 3\nILSVRC2012_val_00000002.JPEG 7\n")
    with pytest.raises(InputError, match=r"1 image\(s\) have no label .*ILSVRC2012_val_00000003.JPEG"):
        ImageNetDataset(flat)
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG three\n")
    with pytest.raises(InputError, match="expected '<file name> <class index>'"):
        ImageNetDataset(flat)
    (flat / "val.txt").unlink()
    csv = "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_0000000{k},n01440764 1 1 5 5\n" for k in (1, 2, 3))
    (flat / "LOC_val_solution.csv").write_text(csv)
    with pytest.raises(FileNotFoundError, match="need LOC_synset_mapping.txt"):
        ImageNetDataset(flat)
    (flat / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    assert [it["label"] for it in ImageNetDataset(flat, size=8)] == [0, 0, 0]
    (flat / "LOC_val_solution.csv").write_text(csv.replace("val_00000002,n01440764", "val_00000002,n01443573"))
    with pytest.raises(InputError, match=r"csv:3: WordNet id 'n01443573' is not in the synset mapping.*n01443537"):
        ImageNetDataset(flat)
    (flat / "LOC_val_solution.csv").write_text("name,label\n")
    with pytest.raises(InputError, match="expected the header 'ImageId,PredictionString'"):
        ImageNetDataset(flat)


# --- ImageNet-segmentation -------------------------------------------------------------------

def test_imagenet_seg_mat_returns_the_arrays_written_upright(tmp_path):
    path = tmp_path / "gtsegs_ijcv.mat"
    written = write_imagenet_seg_mat(path, n=3, size=(40, 56))
    with open(path, "rb") as f:
        assert f.read(10) == b"MATLAB 7.3"
    with h5py.File(path, "r") as f:  # the stored layout: column-major (C, W, H), gt through a cell
        for i in range(len(written)):
            assert f[f["value/img"][i, 0]].shape == (3, 56, 40 + 2 * i)
            cell = f[f["value/gt"][i, 0]]
            assert cell.shape == (1, 1) and cell.dtype == h5py.ref_dtype
            assert f[cell[0, 0]].shape == (56, 40 + 2 * i)
    ds = open_dataset("imagenet-seg", tmp_path, size=None, **RAW)
    assert len(ds) == 3 and ds.transform.resize == "none"
    for i, (image, mask) in enumerate(written):
        assert image.shape == (40 + 2 * i, 56, 3) and not np.array_equal(mask, mask[::-1])
        item = ds[i]
        assert item["id"] == f"{i:05d}" and item["label"] == -1 and item["original_size"] == (40 + 2 * i, 56)
        assert np.array_equal(_pixels(item["image"]), image)
        assert item["mask"].dtype == torch.int64 and np.array_equal(item["mask"].numpy(), mask)
        assert 0 < mask.mean() < 1


def test_imagenet_seg_default_geometry_and_workers(tmp_path):
    write_imagenet_seg_mat(tmp_path / "gtsegs_ijcv.mat", n=5, size=(36, 50))
    ds = ImageNetSegDataset(tmp_path / "gtsegs_ijcv.mat", size=32)
    item = ds[0]  # opens the HDF5 file in this process before the workers fork
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert set(item["mask"].unique().tolist()) == {0, 1}
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None and torch.equal(clone[3]["mask"], ds[3]["mask"])
    _same_batches(ds, batch_size=2)
    unbatched = ImageNetSegDataset(tmp_path / "gtsegs_ijcv.mat", size=None)
    with pytest.raises(InputError, match="batch_size=1"):
        collate([unbatched[0], unbatched[1]])


def test_imagenet_seg_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="v7.3"):
        ImageNetSegDataset(tmp_path / "gtsegs_ijcv.mat")
    old = tmp_path / "old.mat"
    old.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64".ljust(256, b" "))
    with pytest.raises(InputError, match="not an HDF5 file: expected the MATLAB v7.3"):
        ImageNetSegDataset(old)
    with h5py.File(tmp_path / "partial.mat", "w") as f:
        f.create_dataset("value/img", (2, 1), dtype=h5py.ref_dtype)
    with pytest.raises(InputError, match="no 'value/gt'.*gtsegs_ijcv.mat"):
        ImageNetSegDataset(tmp_path / "partial.mat")
    with h5py.File(tmp_path / "wrong.mat", "w") as f:
        f.create_dataset("value/img", data=np.zeros((2, 1)))
        f.create_dataset("value/gt", data=np.zeros((2, 1)))
    with pytest.raises(InputError, match="object references"):
        ImageNetSegDataset(tmp_path / "wrong.mat")
    with pytest.raises(InputError, match="has no splits"):
        open_dataset("imagenet-seg", tmp_path, split="val")


# --- PASCAL VOC ------------------------------------------------------------------------------

def test_voc_palette_png_round_trip(tmp_path):
    label_map = np.zeros((12, 17), np.uint8)
    label_map[2:6, 3:9], label_map[7:11, 10:16], label_map[6, :] = 1, 15, 255
    write_voc_palette_png(tmp_path / "m.png", label_map)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    assert tuple(rgb[3, 4]) == (128, 0, 0) and tuple(rgb[8, 12]) == (192, 128, 128)  # aeroplane, person
    assert tuple(rgb[6, 0]) == (224, 224, 192) and tuple(rgb[0, 0]) == (0, 0, 0)  # ignore, background
    assert np.array_equal(read_voc_label_png(tmp_path / "m.png"), label_map)
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person" and tuple(VOC_PALETTE[20]) == (0, 64, 128)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="found mode RGB"):
        read_voc_label_png(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="0..255"):
        write_voc_palette_png(tmp_path / "x.png", np.full((2, 2), 300))


def test_voc_reader_masks_and_labels_as_written(tmp_path):
    truth = write_voc(tmp_path, n_train=4, n_val=2, n_aug=2)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert any((m == 255).any() for i, m in truth.items() if i.startswith("2007"))
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        assert VOCDataset(root, "val").ids == list(truth)[4:6]
    from_masks = VOCDataset(tmp_path, "train_aug", size=None, **RAW)
    from_npy = VOCDataset(tmp_path, "train_aug", cls_labels=tmp_path / "cls_labels.npy", size=16, resize="resize-crop")
    assert from_masks.ids == from_npy.ids == list(truth)[:4] + list(truth)[6:]
    assert from_masks.mask_paths[0].parent.name == "SegmentationClass"
    assert from_masks.mask_paths[-1].parent.name == "SegmentationClassAug"
    for i, id in enumerate(from_masks.ids):
        a, b = from_masks[i], from_npy[i]
        assert a["id"] == id and a["label"] == -1 and a["original_size"] == (40, 56)
        assert np.array_equal(a["mask"].numpy(), truth[id])
        expected = np.zeros(20, np.float32)
        expected[[c - 1 for c in np.unique(truth[id]) if 0 < c < 255]] = 1
        assert np.array_equal(a["labels"].numpy(), expected) and a["labels"].sum() >= 1
        assert torch.equal(a["labels"], b["labels"])  # psa's labels == labels of the full-size mask
        assert b["mask"].shape == (16, 16) and b["image"].shape == (3, 16, 16)
        assert np.array_equal(_pixels(a["image"]), _decoded(voc / "JPEGImages" / f"{id}.jpg"))
    aug = VOCDataset(tmp_path, "train", masks="aug", size=None)
    assert all(p.parent.name == "SegmentationClassAug" for p in aug.mask_paths)
    assert all(np.array_equal(aug[i]["mask"].numpy(), truth[id]) for i, id in enumerate(aug.ids))
    images_only = VOCDataset(tmp_path, "train_aug", masks=None, cls_labels=tmp_path / "cls_labels.npy")
    assert "mask" not in images_only[0] and images_only[0]["labels"].shape == (20,)
    expected = np.eye(20, dtype=np.float32)[[2, 19]].sum(0)  # classes 3 and 20
    assert np.array_equal(labels_from_mask(np.array([[0, 255, 3], [3, 20, 0]])), expected)


def test_voc_labels_come_from_the_full_mask_not_the_crop(tmp_path):
    write_voc(tmp_path, n_train=1, n_val=1, n_aug=0)
    label_map = np.zeros((40, 56), np.uint8)
    label_map[10:30, 0:4], label_map[12:28, 20:36] = 7, 15  # the car lies outside the centre crop
    write_voc_palette_png(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000039.png", label_map)
    item = VOCDataset(tmp_path, "val", size=40, resize="resize-crop")[0]
    assert set(item["mask"].unique().tolist()) == {0, 15}
    assert torch.nonzero(item["labels"]).flatten().tolist() == [6, 14]


def test_voc_list_file_path_and_workers(tmp_path):
    write_voc(tmp_path, n_train=3, n_val=2, n_aug=0)
    custom = write_voc(tmp_path / "custom", n_train=1, n_val=1, n_aug=1, ids=["a_1", "b_2", "c_3"])
    assert list(custom) == ["a_1", "b_2", "c_3"] and VOCDataset(tmp_path / "custom", "train_aug").ids == ["a_1", "c_3"]
    with pytest.raises(InputError, match="ids must be 3 distinct ids"):
        write_voc(tmp_path / "custom", n_train=1, n_val=1, n_aug=1, ids=["a_1", "a_1", "c_3"])
    lst = tmp_path / "mine.txt"
    lst.write_text("2007_000060\n\n2007_000032\n")
    ds = VOCDataset(tmp_path, lst, size=24)
    assert ds.ids == ["2007_000060", "2007_000032"]
    _same_batches(VOCDataset(tmp_path, "trainval", size=24), batch_size=2)
    batch = collate([ds[0], ds[1]])
    assert batch["id"] == ds.ids and batch["index"].tolist() == [0, 1] and batch["original_size"].shape == (2, 2)
    assert batch["labels"].shape == (2, 20) and batch["mask"].dtype == torch.int64


def test_voc_errors(tmp_path):
    write_voc(tmp_path, n_train=2, n_val=1, n_aug=1)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(FileNotFoundError, match="none of .* has JPEGImages"):
        VOCDataset(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"unknown VOC split 'trian' \(did you mean train.*\['train', 'train_aug'"):
        VOCDataset(tmp_path, "trian")
    with pytest.raises(FileNotFoundError, match=r"id '2008_000053' .* has no mask: expected .*SegmentationClass/"):
        VOCDataset(tmp_path, "train_aug", masks="class")
    with pytest.raises(InputError, match="masks must be"):
        VOCDataset(tmp_path, "val", masks="SegmentationClass")
    np.save(tmp_path / "few.npy", {"2007_000046": np.zeros(20, np.float32)}, allow_pickle=True)
    with pytest.raises(InputError, match=r"not in .*few.npy.*2008_000053"):
        VOCDataset(tmp_path, "train_aug", masks=None, cls_labels=tmp_path / "few.npy")
    np.save(tmp_path / "short.npy", {"2007_000046": np.zeros(21, np.float32)}, allow_pickle=True)
    with pytest.raises(InputError, match=r"shape \(21,\), expected \(20,\)"):
        VOCDataset(tmp_path, "val", cls_labels=tmp_path / "short.npy")
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 id\(s\) of .*train.txt have no image .*2007_000039"):
        VOCDataset(tmp_path, "train")
    bad = np.zeros((40, 56), np.uint8)
    bad[:5] = 21
    write_voc_palette_png(voc / "SegmentationClass" / "2007_000046.png", bad)
    with pytest.raises(InputError, match=r"values \[21\] are not VOC classes"):
        VOCDataset(tmp_path, "val")[0]


# --- polyp, folder, factory, transform options -----------------------------------------------

def test_open_dataset_polyp_and_folder(tmp_path):
    make_synthetic_polyps(tmp_path / "polyp", num_train=2, num_test=2, test_sets=("Kvasir",), size=32)
    train = open_dataset("polyp", tmp_path / "polyp", split="train", size=16)
    test = open_dataset("Polyp", tmp_path / "polyp", split="Kvasir", size=16)
    assert len(train) == len(test) == 2 and test.ids == ["0000", "0001"]
    item = test[1]
    assert item["mask"].shape == (16, 16) and set(item["mask"].unique().tolist()) <= {0, 1} and item["label"] == -1
    with pytest.raises(InputError, match=r"'kvasir' not found .*did you mean Kvasir"):
        open_dataset("polyp", tmp_path / "polyp", split="kvasir")
    folder = tmp_path / "polyp" / "TestDataset" / "Kvasir"
    plain = open_dataset("folder", folder / "images", size=None, **RAW)
    assert "mask" not in plain[0] and plain[0]["label"] == -1
    assert np.array_equal(_pixels(plain[0]["image"]), _decoded(folder / "images" / "0000.png"))
    masked = FolderDataset(folder / "images", mask_folder=folder / "masks", size=None)
    with Image.open(folder / "masks" / "0001.png") as im:
        expected = (np.asarray(im.convert("L")) > 127).astype(np.int64)
    assert np.array_equal(masked[1]["mask"].numpy(), expected) and expected.any()
    (folder / "masks" / "0001.png").unlink()
    with pytest.raises(InputError, match=r"have no mask with the same stem .*0001.png"):
        FolderDataset(folder / "images", mask_folder=folder / "masks")
    with pytest.raises(InputError, match=r"unknown dataset kind 'imagenett' \(did you mean imagenet"):
        open_dataset("imagenett", tmp_path)


def test_transform_option_errors():
    with pytest.raises(InputError, match="resize must be one of"):
        ItemTransform.make(224, "crop")
    with pytest.raises(InputError, match="resize='none' goes with size=None"):
        ItemTransform.make(None, "resize")
    with pytest.raises(InputError, match="size must be"):
        ItemTransform.make((224, 224, 3))
    with pytest.raises(InputError, match="mean and std"):
        ItemTransform.make(224, std=(0.5, 0.0, 0.5))
    with pytest.raises(InputError, match="different keys"):
        collate([{"id": "a"}, {"index": 0}])

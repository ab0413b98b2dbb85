"""Image-folder data, the synthetic classification set, and the GAP / CA-Stream trainer."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from foveal import load
from foveal.cli import main
from foveal.core.errors import InputError
from foveal.data.classification import ImageFolderDataset, make_synthetic_classes
from foveal.training.classification import train_classifier

TINY = {"model_name": "resnet18", "model_kwargs": {"channels": [16, 32, 64, 128]}}
FAST = {"batch_size": 16, "image_size": 32, "crop_scale": (0.7, 1.0), "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_classes(tmp_path_factory.mktemp("syn"), num_classes=3, train_per_class=24,
                                  val_per_class=8, size=32, seed=0)


@pytest.fixture(scope="module")
def gap_run(data, tmp_path_factory):
    """A tiny ResNet trained from scratch with GAP (train_mode 'full')."""
    out = tmp_path_factory.mktemp("gap")
    return train_classifier(data=str(data), out=str(out), pooling="gap", epochs=5, lr=0.1, lr_step=4, **TINY, **FAST)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_set_is_deterministic_by_seed(tmp_path):
    a = make_synthetic_classes(tmp_path / "a", num_classes=2, train_per_class=3, val_per_class=2, size=24, seed=5)
    b = make_synthetic_classes(tmp_path / "b", num_classes=2, train_per_class=3, val_per_class=2, size=24, seed=5)
    c = make_synthetic_classes(tmp_path / "c", num_classes=2, train_per_class=3, val_per_class=2, size=24, seed=6)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 10 and fa == fb and fa != fc
    assert sorted({str(p.parent) for p in fa}) == ["train/circle", "train/square", "val/circle", "val/square"]
    ds = ImageFolderDataset(a / "train", image_size=16)
    assert ds.classes == ["circle", "square"] and len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    with pytest.raises(InputError, match="num_classes"):
        make_synthetic_classes(tmp_path / "d", num_classes=1)


def test_dataset_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(InputError, match="one sub-folder per class"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(InputError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(InputError, match=r"class folders \['dog'\] not found"):
        ImageFolderDataset(tmp_path, classes=["cat", "dog"])


def test_gap_classifier_learns_from_scratch(gap_run):
    hist = gap_run["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    assert hist[-1]["lr"] == pytest.approx(0.01)  # step schedule: x0.1 after lr_step=4 epochs
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_acc"] >= 0.6  # 3 classes: chance is 1/3
    model = load(gap_run["model_path"])
    assert model.registry_name == "gap-classifier" and model.pool is None


def test_stream_training_changes_only_the_stream(gap_run, data, tmp_path):
    init = load(gap_run["model_path"])
    before = {k: v.clone() for k, v in init.state_dict().items()}
    run = train_classifier(data=str(data), out=str(tmp_path), pooling="ca-stream", init=str(gap_run["model_path"]),
                           epochs=2, lr=0.1, **FAST)
    model = run["model"]
    assert model.registry_name == "ca-stream-classifier"
    after = {k: v.cpu() for k, v in model.state_dict().items()}  # trained on CUDA where there is one
    for k, v in before.items():  # weights, BN running statistics and num_batches_tracked
        assert torch.equal(after[k], v), f"{k} changed during stream training"
    stream = {k: v for k, v in after.items() if k.startswith("pool.")}
    fresh = load(run["model_path"])
    assert stream and all(torch.equal(fresh.state_dict()[k], v) for k, v in stream.items())
    assert not any(p.requires_grad for p in model.net.parameters())
    # every stream tensor moved from its initialisation (same seed -> same init)
    torch.manual_seed(0)
    init_stream = type(model.pool)(model.pool.config).state_dict()
    assert set(init_stream) == {k[len("pool."):] for k in stream}
    moved = [k for k, v in init_stream.items() if not torch.equal(v, stream["pool." + k])]
    assert sorted(moved) == sorted(init_stream)
    assert run["history"][-1]["val_acc"] >= 0.5


def test_resume_is_exact(gap_run, data, tmp_path):
    common = {"data": str(data), "pooling": "ca-stream", "init": str(gap_run["model_path"]), "lr": 0.1,
              "lr_step": 1, **FAST, "device": "cpu"}  # bit-exact resume is a CPU property (cuDNN)
    straight = train_classifier(out=str(tmp_path / "a"), epochs=2, **common)
    train_classifier(out=str(tmp_path / "b"), epochs=1, **common)
    resumed = train_classifier(out=str(tmp_path / "b"), epochs=2, resume=True, **common)
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([0.01, 0.001])


def test_cli_commands(tmp_path, capsys):
    data = tmp_path / "syn"
    assert main(["make-synthetic-classes", str(data), "--classes", "2", "--train-per-class", "4",
                 "--val-per-class", "2", "--size", "24"]) == 0
    assert sorted(p.name for p in (data / "train").iterdir()) == ["circle", "square"]
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "run"
    args = ["train-classifier", str(data), "--out", str(out), "--pooling", "gap", "--model", "resnet10t",
            "--epochs", "1", "--batch-size", "4", "--image-size", "24", "--workers", "0", "--quiet"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["epoch"] == 1 and "val_acc" in record
    assert load(out / "model.safetensors").config.num_classes == 2
    assert main([*args, "--train-mode", "stream"]) == 1
    assert "needs a ca-stream-classifier" in capsys.readouterr().err


def _ddp_worker(rank, port, data, init, out, results):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    run = train_classifier(data=data, out=out, pooling="ca-stream", init=init, epochs=1, lr=0.1, device="cpu",
                           **FAST)
    torch.save({k: v for k, v in run["model"].state_dict().items() if k.startswith("pool.")},
               os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.heavy
def test_ddp_two_processes_gloo(gap_run, data, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(data), str(gap_run["model_path"]), str(tmp_path / "out"), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:  # DDP keeps the replicas' streams identical
        assert torch.equal(r0[k], r1[k]), k
    saved = load(tmp_path / "out" / "model.safetensors").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in r0.items())
    init = load(gap_run["model_path"]).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in init.items())  # frozen network untouched
    log = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["step"] == 3  # 72 images: 36 per rank, batches of 16

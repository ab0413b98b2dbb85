"""Checkpoints: round trip of every registered component, error cases, atomic writes, states."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import foveal
from foveal import registry
from foveal.core.checkpoint import load_state, read_metadata, read_state_dict, save_state
from foveal.core.errors import CheckpointError
from foveal.core.training import load_training_state, save_training_state

# The round trip of every registered component (tiny and default configs, equal outputs after
# loading) is a contract: tests/test_contracts.py.


def small_backbone():
    return registry.build("timm-backbone", model_name="resnet10t")


def test_metadata_and_weights_path_not_stored(tmp_path):
    b = small_backbone()
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in b.body.state_dict().items()}, w)
    b2 = registry.build("timm-backbone", model_name="resnet10t", weights=str(w))
    path = foveal.save(b2, tmp_path / "b.safetensors", metadata={"note": "x"})
    meta = read_metadata(path)
    assert meta["name"] == "timm-backbone" and meta["kind"] == "backbone" and meta["note"] == "x"
    assert meta["plugin"] == "foveal" and meta["foveal_version"] == foveal.__version__
    assert json.loads(meta["config"]) == {"model_name": "resnet10t", "out_indices": None, "weights": None}
    w.unlink()  # the checkpoint must not depend on the initial weights file
    loaded = foveal.load(path)
    for k, v in b2.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.safetensors"):
        foveal.load(tmp_path / "nope.safetensors")


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        foveal.load(bad)
    good = foveal.save(small_backbone(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        foveal.load(cut)


def test_plain_safetensors_is_not_a_foveal_checkpoint(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="not a foveal checkpoint .*read_state_dict"):
        foveal.load(p)


def test_missing_plugin_says_what_to_install(tmp_path):
    p = tmp_path / "alien.safetensors"
    save_file({}, p, metadata={"format": "foveal.checkpoint/1", "name": "alien-net", "config": "{}",
                               "plugin": "foveal-alien", "plugin_version": "1.2"})
    with pytest.raises(CheckpointError, match=r"'alien-net'.*pip install foveal-alien==1\.2"):
        foveal.load(p)


def test_key_and_shape_mismatches_are_listed(tmp_path):
    b = small_backbone()
    state = b.state_dict()
    state.pop("body.conv1.0.weight")
    state["body.extra"] = torch.zeros(1)
    state["body.bn1.weight"] = torch.zeros(3)
    p = tmp_path / "mm.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, p, metadata={
        "format": "foveal.checkpoint/1", "name": "timm-backbone", "config": json.dumps({"model_name": "resnet10t"})})
    with pytest.raises(CheckpointError) as e:
        foveal.load(p)
    msg = str(e.value)
    assert "missing keys (1): body.conv1.0.weight" in msg
    assert "unexpected keys (1): body.extra" in msg
    assert "body.bn1.weight: checkpoint (3,) vs model" in msg


def test_unregistered_component_cannot_be_saved(tmp_path):
    from foveal.models.ca_stream import GlobalAveragePooling

    with pytest.raises(CheckpointError, match="no registry name"):
        foveal.save(GlobalAveragePooling(in_channels=3), tmp_path / "x.safetensors")


def test_write_is_atomic(tmp_path, monkeypatch):
    import foveal.core.checkpoint as ck

    path = foveal.save(small_backbone(), tmp_path / "c.safetensors")
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        foveal.save(small_backbone(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_read_state_dict_pth_never_unpickles(tmp_path):
    sd = {"a": torch.arange(3.0)}
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    assert torch.equal(read_state_dict(tmp_path / "w.pth")["a"], sd["a"])
    torch.save({"a": torch.zeros(1), "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "none.pth")


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_nested_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "tuple": (1, "a", None), "np": np.arange(4), "f": 0.5}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["tuple"] == (1, "a", None) and back["f"] == 0.5
    np.testing.assert_array_equal(back["np"], np.arange(4))
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys survive
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_training_state_restores_rng_streams(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_training_state(tmp_path / "t.safetensors", model=model, epoch=3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    state = load_training_state(tmp_path / "t.safetensors", model=model)
    assert state["epoch"] == 3
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_module_components_keep_torch_state_dict():
    b = small_backbone()
    assert len(b.state_dict()) == len(b.body.state_dict()) > 0


# --- interrupted writes and permissions -------------------------------------------------------

KILLED_WRITER = """
import os, sys
from pathlib import Path
import torch
import foveal.core.checkpoint as ck

def dying_save_file(tensors, filename, metadata=None):
    # safetensors writes through a temporary file of its own next to `filename`, then renames it
    with open(Path(filename).parent / ".tmpAbC123", "wb") as f:
        f.write(b"partial" * 1000)
    os._exit(3)  # killed mid-write: no exception handler, no finally runs

ck.save_file = dying_save_file
ck.save_state({"w": torch.zeros(3)}, sys.argv[1])
"""


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_write_leaves_files_that_the_next_write_removes(tmp_path):
    target = tmp_path / "last.safetensors"
    save_state({"w": torch.ones(2)}, target)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "last.safetensors")
    assert leftovers and all(name.startswith(".last.safetensors.") for name in leftovers)  # only foveal's names
    assert torch.equal(load_state(target)["w"], torch.ones(2))  # the old checkpoint is intact
    others = [".tmpXyZ789", ".last.safetensors.notes", "last.safetensors.tmp", ".model.safetensors.x.1.abcdef12.tmp"]
    for name in others:  # not foveal's temporary names for this target: never touched
        (tmp_path / name).write_text("keep")
    save_state({"w": torch.full((2,), 5.0)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.safetensors", *others])
    assert torch.equal(load_state(target)["w"], torch.full((2,), 5.0))


def test_temporary_files_of_live_writers_are_kept(tmp_path, monkeypatch):
    import foveal.core.checkpoint as ck

    target = tmp_path / "m.safetensors"
    host = ck._HOST
    dead = tmp_path / f".m.safetensors.{host}.{_dead_pid()}.0123abcd.tmp"
    live = tmp_path / f".m.safetensors.{host}.{os.getppid()}.0123abce.tmp"  # the parent process is alive
    mine = tmp_path / f".m.safetensors.{host}.{os.getpid()}.0123abcf.tmp"  # this process, no write running
    busy = tmp_path / f".m.safetensors.{host}.{os.getpid()}.0123abd0.tmp"  # this process, a write running
    remote_new = tmp_path / ".m.safetensors.otherhost.1.0123abd1.tmp"
    remote_old = tmp_path / ".m.safetensors.otherhost.1.0123abd2.tmp"
    legacy_old = tmp_path / ".m.safetensors.k3j_x9a2.tmp"  # mkstemp's name in earlier versions
    for folder in (dead, live, mine, busy, remote_new):
        folder.mkdir()
        (folder / "m.safetensors").write_bytes(b"partial")
    for path in (remote_old, legacy_old):
        path.write_bytes(b"partial")
        old = time.time() - ck.STALE_AFTER_SECONDS - 60
        os.utime(path, (old, old))
    monkeypatch.setattr(ck, "_WRITING", {busy.name})
    removed = ck.remove_stale_temp_files(target)
    assert sorted(removed) == sorted([dead, mine, remote_old, legacy_old])
    assert live.is_dir() and busy.is_dir() and remote_new.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_permissions(tmp_path, umask):
    from foveal.core.training import MetricsLog

    old = os.umask(umask)
    try:
        expected = 0o666 & ~umask
        model = foveal.save(small_backbone(), tmp_path / "model.safetensors")
        state = save_state({"w": torch.zeros(1)}, tmp_path / "state.safetensors")
        log = MetricsLog(tmp_path / "metrics.jsonl")
        log.write(epoch=1)
        log.write(epoch=2)
        log.truncate_after(1)  # rewritten atomically
        for path in (model, state, log.path):
            assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
        assert [r["epoch"] for r in log.read()] == [1]
    finally:
        os.umask(old)


def test_resume_removes_stale_temporary_files_first(tmp_path):
    from foveal.core.checkpoint import _HOST
    from foveal.core.training import TrainingRun

    stale = tmp_path / f".last.safetensors.{_HOST}.{_dead_pid()}.0123abcd.tmp"
    stale.mkdir()
    (stale / "last.safetensors").write_bytes(b"x" * 1000)
    model = torch.nn.Linear(2, 2)
    save_training_state(tmp_path / "last.safetensors", model=model, epoch=1)
    run = TrainingRun(tmp_path, epochs=2, resume=True, device="cpu", progress=False)
    assert run.start(model) == 1
    assert not stale.exists()


# --- files foveal.load cannot use: one line each ------------------------------------------------


@pytest.mark.parametrize("name", ["w.pth", "w.pt", "w.safetensors"])  # the suffix does not matter
def test_a_pytorch_file_is_not_a_foveal_checkpoint(tmp_path, name):
    path = tmp_path / name
    torch.save({"state_dict": {"a": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError) as info:
        foveal.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "not a foveal checkpoint" in message and "PyTorch" in message
    assert "read_state_dict" in message and "backbone_weights=" in message and "--weights" in message
    assert torch.equal(read_state_dict(path)["a"], torch.zeros(2))  # what the message recommends works
    legacy = tmp_path / f"legacy-{name}"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)  # plain pickle
    with pytest.raises(CheckpointError, match="PyTorch file .*not a foveal checkpoint"):
        foveal.load(legacy)


def test_a_config_field_from_a_newer_version_is_named(tmp_path):
    path = foveal.save(small_backbone(), tmp_path / "b.safetensors")
    tensors, meta = load_file(path), read_metadata(path)
    config = {**json.loads(meta["config"]), "future_option": 3}
    save_file(tensors, tmp_path / "new.safetensors", metadata={**meta, "config": json.dumps(config),
                                                               "foveal_version": "9.0.0"})
    with pytest.raises(CheckpointError) as info:
        foveal.load(tmp_path / "new.safetensors")
    message = str(info.value)
    assert "\n" not in message and "'future_option'" in message and "'timm-backbone'" in message
    assert "newer foveal" in message and "9.0.0" in message and foveal.__version__ in message

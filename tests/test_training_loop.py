"""The shared training-loop skeleton (foveal.core.training.TrainingRun): exact resume, output
folder rules (refuse / resume / overwrite), identity checks on resume, hooks, and the CLI rules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from foveal.cli import main
from foveal.core.checkpoint import load_state
from foveal.core.errors import CheckpointError, InputError
from foveal.core.training import TrainingRun, save_training_state, seed_everything


def _toy_run(out, *, epochs=3, fail_at=None, resume=False, overwrite=False, warn=(), evaluate=True):
    """A linear regression trained through every hook of the skeleton; ``fail_at`` raises
    KeyboardInterrupt at that (global) step, as a killed process would stop."""
    run = TrainingRun(out, epochs=epochs, resume=resume, overwrite=overwrite, device="cpu", progress=False,
                      outputs=("export.json",))
    seed_everything(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))  # dropout: RNG matters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counter = Counter()
    run.start(model, optimizer, scheduler, identity={"model": "toy", "model_config": {"width": 8}},
              stateful={"counter": counter})
    net = run.wrap(model)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x.sum(1, keepdim=True))
    epochs_seen = []

    def batches(epoch):
        net.train()
        epochs_seen.append(epoch)
        gen = torch.Generator().manual_seed(100 + epoch)
        return DataLoader(data, batch_size=6, shuffle=True, generator=gen)

    def step(batch):
        if fail_at is not None and run.step + 1 == fail_at:
            raise KeyboardInterrupt
        inputs, targets = batch
        loss = ((net(inputs) - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counter.value += len(inputs)
        return {"loss": loss.detach() * len(inputs), "count": len(inputs)}

    def export():
        (run.out / "export.json").write_text(json.dumps({"seen": counter.value}))

    history = run.fit(batches, step, summarize=lambda s: {"loss": s["loss"] / s["count"], "seen": counter.value},
                      evaluate=(lambda: {"val": 1.5}) if evaluate else None, export=export, warnings=warn)
    return run, model, history, epochs_seen


class Counter:
    """A stateful item: saved with each checkpoint, restored on resume."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_interrupted_run_resumes_bit_exactly_with_every_hook(tmp_path):
    _, straight, history, _ = _toy_run(tmp_path / "a")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == [0.025, 0.0125, 0.00625]  # scheduler stepped once per epoch
    assert all(r["val"] == 1.5 for r in history) and history[-1]["seen"] == 60
    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "b", fail_at=6)  # 4 steps per epoch: dies in the second epoch
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 1
    run, resumed, again, seen = _toy_run(tmp_path / "b", resume=True)
    assert run.start_epoch == 1 and seen == [1, 2]  # only the remaining epochs ran
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again]
    assert json.loads((tmp_path / "b" / "export.json").read_text()) == {"seen": 60}  # the item was restored
    state = load_state(tmp_path / "b" / "last.safetensors")
    assert state["epoch"] == 3 and state["step"] == 12 and state["stateful"]["counter"] == {"value": 60}


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    _toy_run(tmp_path / "a", epochs=2)
    run, _, history, seen = _toy_run(tmp_path / "a", epochs=2, resume=True)
    assert seen == [] and [r["epoch"] for r in history] == [1, 2]


def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    _toy_run(out, epochs=1)
    before = (out / "last.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(InputError) as info:
        _toy_run(out, epochs=1)
    message = str(info.value)
    assert "\n" not in message and str(out) in message
    assert "--resume" in message and "--overwrite" in message and "already holds a training run" in message
    assert ((out / "last.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()) == before
    with pytest.raises(InputError, match="exclude each other"):
        TrainingRun(out, epochs=1, resume=True, overwrite=True, device="cpu")


def test_overwrite_starts_afresh_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    _toy_run(out, epochs=2)
    (out / "notes.txt").write_text("mine")
    _, _, history, seen = _toy_run(out, epochs=1, overwrite=True)
    assert seen == [0] and [r["epoch"] for r in history] == [1]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # the old records are gone, not appended to
    assert load_state(out / "last.safetensors")["epoch"] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint(tmp_path):
    _, _, history, _ = _toy_run(tmp_path / "new", epochs=1, resume=True)  # nothing to resume: starts
    assert [r["epoch"] for r in history] == [1]
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "export.json").write_text("{}")  # the run's output, but its checkpoint is gone
    with pytest.raises(InputError, match="no last.safetensors to resume from .*--overwrite"):
        _toy_run(stale, epochs=1, resume=True)


def test_warnings_are_issued_once_and_logged_in_the_first_record(tmp_path):
    with pytest.warns(UserWarning, match="random weights"), pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "a", epochs=2, warn=("random weights",), fail_at=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a resumed run does not warn again
        _, _, history, _ = _toy_run(tmp_path / "a", epochs=2, warn=("random weights",), resume=True)
    assert history[0]["warnings"] == ["random weights"] and "warnings" not in history[1]


def test_sampler_epoch_hook_and_per_step_scheduler(tmp_path):
    class Sampler(torch.utils.data.Sampler):
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(4))

        def __len__(self):
            return 4

    sampler = Sampler()
    run = TrainingRun(tmp_path, epochs=2, device="cpu", progress=False)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    run.start(model, optimizer, scheduler)
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2, sampler=sampler)

    def step(batch):
        optimizer.step()
        return {"loss": 2.0}

    history = run.fit(lambda epoch: loader, step, scheduler_interval="step")
    assert sampler.epochs == [0, 1]
    assert history[0]["loss"] == 2.0  # default summary: sums divided by the number of steps
    assert [r["lr"] for r in history] == [pytest.approx(1 / 3), pytest.approx(1 / 5)]  # stepped per step
    assert run.step == 4


# --- resuming another model -------------------------------------------------------------------


def _fake_state(path, module, **extra):
    save_training_state(path, model=module, epoch=1, extra=extra)


def test_resume_with_another_model_names_both_in_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _fake_state(out / "last.safetensors", nn.Linear(3, 1), model="big", model_config={"width": 8})
    with pytest.raises(CheckpointError) as info:
        _toy_run(out, resume=True)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "'big'" in message and "'toy'" in message and "--overwrite" in message


def test_resume_with_other_settings_names_the_fields(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _fake_state(out / "last.safetensors", nn.Linear(3, 1), model="toy", model_config={"width": 4})
    with pytest.raises(CheckpointError, match=r"width=4 \(checkpoint\) vs 8 \(this run\)"):
        _toy_run(out, resume=True)
    _fake_state(out / "last.safetensors", nn.Linear(3, 1), model="toy", model_config={"width": 8, "depth": 2})
    with pytest.raises(CheckpointError, match="'depth' that this foveal does not know .*newer foveal"):
        _toy_run(out, resume=True)


def test_resume_of_a_state_without_identity_lists_keys_not_a_dump(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    big = nn.Sequential(nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)]))  # 80 tensors, none fits
    _fake_state(out / "last.safetensors", big)
    with pytest.raises(CheckpointError) as info:
        _toy_run(out, resume=True)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1500 and "more" in message and "unexpected keys (80)" in message


# --- the commands -----------------------------------------------------------------------------

SEG = ["--model", "rta-former-t", "--set", "width=16", "--epochs", "1", "--batch-size", "4", "--size", "32",
       "--scales", "1.0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def polyps(tmp_path_factory):
    from foveal.data.polyp import make_synthetic_polyps

    return make_synthetic_polyps(tmp_path_factory.mktemp("polyps"), num_train=4, num_test=0, test_sets=(),
                                 size=32, seed=2)


def test_cli_train_refuses_resumes_and_overwrites(polyps, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    (out / "model.safetensors").write_bytes(b"trained weights")
    assert main(["train", str(polyps), "--out", str(out), *SEG]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == b"trained weights"
    with pytest.warns(UserWarning, match="random weights"):
        assert main(["train", str(polyps), "--out", str(out), *SEG, "--overwrite"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and records[0]["loss"] != 0.5
    capsys.readouterr()
    # a resume with another width: one line naming the field, nothing overwritten
    before = (out / "last.safetensors").read_bytes()
    assert main(["train", str(polyps), "--out", str(out), *SEG, "--set", "width=32", "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'rta-former-t'" in err and "width=16 (checkpoint) vs 32" in err
    assert (out / "last.safetensors").read_bytes() == before


def test_cli_train_classifier_refuses_an_existing_run(tmp_path, capsys):
    from foveal.data.classification import make_synthetic_classes

    data = make_synthetic_classes(tmp_path / "syn", num_classes=2, train_per_class=2, val_per_class=1, size=16)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 1}\n')
    args = ["train-classifier", str(data), "--out", str(out), "--pooling", "gap", "--model", "resnet10t",
            "--epochs", "1", "--batch-size", "4", "--image-size", "16", "--workers", "0", "--device", "cpu", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--resume" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]

"""Tests of the AffinityNet refiner (foveal/plugins/affinitynet.py) and its trainer."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from foveal import registry
from foveal.core.errors import FovealError, InputError
from foveal.models.affinitynet import affinity_loss, pair_affinities, pair_labels
from foveal.refine.pairs import IGNORE, pair_offsets
from foveal.refine.random_walk import random_walk
from foveal.refine.seeds import affinity_label_map
from foveal.testing import check_component
from foveal.training.affinity import train_affinitynet

SMALL = dict(backbone_options={"model_name": "test_resnet"}, levels=[1, 2], level_channels=[8, 8], feature_dim=8)


def brute_affinity_matrix(f: torch.Tensor, radius: int) -> torch.Tensor:
    """Dense (n, n) affinities of one image by looping over every pair of positions."""
    _, h, w = f.shape
    n = h * w
    a = torch.eye(n, dtype=f.dtype)
    for i in range(n):
        for j in range(n):
            d2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
            if 0 < d2 < radius**2:
                a[i, j] = torch.exp(-(f[:, i // w, i % w] - f[:, j // w, j % w]).abs().mean())
    return a


def test_pair_offsets_cover_each_pair_once():
    offs = pair_offsets(5)
    assert len(offs) == 34  # psa's search_dist for radius 5
    assert all(0 < dy * dy + dx * dx < 25 for dy, dx in offs)
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert set(offs) | {(-dy, -dx) for dy, dx in offs} == full and len(set(offs)) == len(offs)
    assert not set(offs) & {(-dy, -dx) for dy, dx in offs}


def test_affinities_match_brute_force_float64():
    torch.manual_seed(0)
    f = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    aff = pair_affinities(f, 5)
    assert aff.shape == (2, 34, 6, 7) and aff.dtype == torch.float64
    offs = pair_offsets(5)
    for b in range(2):
        dense = brute_affinity_matrix(f[b], 5)
        seen = torch.zeros_like(dense, dtype=torch.bool)
        for p, (dy, dx) in enumerate(offs):
            for y in range(6):
                for x in range(7):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < 6 and 0 <= xx < 7:
                        i, j = y * 7 + x, yy * 7 + xx
                        assert float(aff[b, p, y, x]) == pytest.approx(float(dense[i, j]), rel=1e-12)
                        seen[i, j] = seen[j, i] = True
                    else:
                        assert aff[b, p, y, x] == 0
        off_diagonal = (dense > 0) & ~torch.eye(42, dtype=torch.bool)
        assert torch.equal(seen, off_diagonal)  # every pair within the radius, and only those


def test_label_map_cases():
    # one class; values chosen around the alpha_low=4 / alpha_high=32 decisions
    m = torch.tensor([[0.9, 0.2, 0.0, 0.05, 0.1]], dtype=torch.float64)[None, None]  # (1, 1, 1, 5)
    lab = affinity_label_map(m, (1, 5))
    # 0.9: fg for both alphas -> class 1; 0.2: bg at alpha 4 (0.8^4 > 0.2), fg at 32 -> neutral;
    # 0.0: bg for both -> background; 0.05: bg for both (0.95^32 = 0.19) -> background;
    # 0.1: bg at 4, fg at 32 (0.9^32 = 0.034) -> neutral
    assert lab.tolist() == [[[1, IGNORE, 0, 0, IGNORE]]]
    # two classes: the stronger class wins; area pooling to the grid happens before the argmax
    m2 = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    m2[0, 0, :, :2] = 0.8
    m2[0, 1, :, :2] = 0.95
    m2[0, 1, :, 2:] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # the scores are pooled, not the labels: right cell background 0.5 vs class 0.5, a tie -> background
    assert affinity_label_map(m2, (1, 2)).tolist() == [[[2, 0]]]
    m2[0, 1, :, 3] = 0.4  # pooled background (0 + 0.6^a) / 2 < pooled class 0.7 for both alphas
    assert affinity_label_map(m2, (1, 2)).tolist() == [[[2, 2]]]


def test_pair_labels_cases():
    labels = torch.tensor([[[0, 0, 1, 1, IGNORE, 2]]])
    bg, fg, neg = pair_labels(labels, 3)
    assert bg.shape == (1, len(pair_offsets(3)), 1, 6)
    # radius 3 on a single row: partners at dx = 1 and 2 (offsets (0, 1), (0, 2))
    assert (bg.sum(), fg.sum(), neg.sum()) == (1, 1, 4)  # (0,0) | (1,1) | 0-1 x3, 1-2 once; IGNORE never
    assert bg[0, 0, 0, 0] == 1 and fg[0, 0, 0, 2] == 1 and neg[0, 0, 0, 1] == 1 and neg[0, 1, 0, 3] == 1


def test_loss_weighting():
    torch.manual_seed(0)
    aff = torch.rand(2, 34, 5, 5, dtype=torch.float64) * 0.98 + 0.01
    labels = torch.randint(0, 3, (2, 5, 5))
    labels[0, 0, :3] = IGNORE
    bg, fg, neg = pair_labels(labels, 5)
    loss, parts = affinity_loss(aff, bg, fg, neg)
    lb = -torch.log(aff[bg > 0] + 1e-5).sum() / (bg.sum() + 1e-5)
    lf = -torch.log(aff[fg > 0] + 1e-5).sum() / (fg.sum() + 1e-5)
    ln = -torch.log(1 + 1e-5 - aff[neg > 0]).sum() / (neg.sum() + 1e-5)
    assert float(loss) == pytest.approx(float(lb / 4 + lf / 4 + ln / 2), rel=1e-12)
    assert parts["neg_count"] == pytest.approx(float(neg.sum()), abs=1e-4)
    # each term is a mean over its own pairs: twice the background pairs, same background term
    only_neg, _ = affinity_loss(aff, torch.zeros_like(bg), torch.zeros_like(fg), neg)
    assert float(only_neg) == pytest.approx(float(ln / 2), rel=1e-9)


@pytest.mark.parametrize("steps", [256, 5])
def test_random_walk_equals_dense_matrix_power(steps):
    torch.manual_seed(1)
    f = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    aff = pair_affinities(f, 5)
    scores = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    for b in range(2):
        a = brute_affinity_matrix(f[b], 5) ** 8
        t = a / a.sum(0, keepdim=True)  # column-normalised (psa)
        expected = scores[b].reshape(3, -1) @ torch.linalg.matrix_power(t, steps)
        for method in ("squaring", "sparse"):
            got = random_walk(aff[b : b + 1], scores[b : b + 1], beta=8, steps=steps, method=method)
            torch.testing.assert_close(got[0].reshape(3, -1), expected, rtol=1e-9, atol=1e-12)


def test_refine_contract_and_definition():
    torch.manual_seed(0)
    net = registry.build("affinitynet", steps=4, **SMALL).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seeds = torch.rand(2, 2, 32, 32, dtype=torch.float64)
    out = net.refine(x, seeds)
    assert out.shape == (2, 3, 32, 32) and net.training  # run in eval mode, mode restored
    torch.testing.assert_close(out.sum(1), torch.ones(2, 32, 32, dtype=torch.float64))
    with torch.no_grad():
        f = net.eval().features(x)
    bg = (1 - seeds.amax(1, keepdim=True)) ** 16
    pooled = F.avg_pool2d(torch.cat([bg, seeds], 1), 32 // f.shape[-1])
    walked = []
    for b in range(2):
        a = brute_affinity_matrix(f[b], 5) ** 8
        t = torch.linalg.matrix_power(a / a.sum(0, keepdim=True), 4)
        walked.append((pooled[b].reshape(3, -1) @ t).reshape(3, *f.shape[-2:]))
    up = F.interpolate(torch.stack(walked), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, up / up.sum(1, keepdim=True), rtol=1e-7, atol=1e-10)
    single = net.refine(x, seeds[:, 0])
    assert single.shape == (2, 2, 32, 32)


def test_bad_input_and_config():
    net = registry.build("affinitynet", **SMALL)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(InputError, match="seeds"):
        net.refine(x, torch.rand(1, 2, 16, 16))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        net.refine(x, torch.rand(1, 2, 32, 32) * 3)
    with pytest.raises(ValidationError, match="differ in length"):
        registry.build("affinitynet", levels=[1, 2], level_channels=[8])
    check_component("affinitynet", **SMALL)


def test_crf_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    net = registry.build("affinitynet", crf=True, **SMALL)
    with pytest.raises(FovealError, match=r"pydensecrf2.*pip install.*crf=False"):
        net.label_map(torch.randn(1, 3, 32, 32), torch.rand(1, 2, 32, 32))


def test_crf_path_wiring(monkeypatch):
    """A stand-in for pydensecrf whose inference returns its input scores (clipped at 1e-5): the
    CRF path then gives the CRF-free labels, and receives the image and the psa parameters."""
    calls = []

    class DenseCRF2D:
        def __init__(self, w, h, c):
            self.shape = (c, h, w)

        def setUnaryEnergy(self, u):
            self.u = u

        def addPairwiseGaussian(self, **kw):
            calls.append(("gaussian", kw))

        def addPairwiseBilateral(self, **kw):
            calls.append(("bilateral", {k: v for k, v in kw.items() if k != "rgbim"}, kw["rgbim"].shape))

        def inference(self, t):
            return np.exp(-self.u)

    densecrf = types.SimpleNamespace(DenseCRF2D=DenseCRF2D)
    utils = types.SimpleNamespace(unary_from_softmax=lambda p: -np.log(np.clip(p, 1e-5, None)).reshape(len(p), -1))
    pkg = types.ModuleType("pydensecrf")
    pkg.densecrf, pkg.utils = densecrf, utils
    monkeypatch.setitem(sys.modules, "pydensecrf", pkg)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", densecrf)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", utils)
    torch.manual_seed(0)
    x, seeds = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 32, 32) ** 4
    plain = registry.build("affinitynet", **SMALL).label_map(x, seeds)
    crf = registry.build("affinitynet", crf=True, **SMALL).label_map(x, seeds)
    assert ("gaussian", {"sxy": 3, "compat": 3}) in calls
    assert ("bilateral", {"sxy": 80, "srgb": 13, "compat": 10}, (32, 32, 3)) in calls
    assert (crf == plain).float().mean() > 0.98  # only the clipping at 1e-5 may move a label


def test_trainer_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    seeds = torch.rand(6, 2, 32, 32) ** 3

    def make():
        torch.manual_seed(0)
        return registry.build("affinitynet", **SMALL)

    full = train_affinitynet(make(), x, seeds, out=str(tmp_path / "a"), epochs=2, batch_size=4, progress=False)
    interrupted = make()
    calls = [0]
    loss = interrupted.loss

    def failing(*args):
        calls[0] += 1
        if calls[0] == 3:  # first batch of the second epoch
            raise KeyboardInterrupt
        return loss(*args)

    interrupted.loss = failing
    with pytest.raises(KeyboardInterrupt):
        train_affinitynet(interrupted, x, seeds, out=str(tmp_path / "b"), epochs=2, batch_size=4, progress=False)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 1
    resumed = train_affinitynet(make(), x, seeds, out=str(tmp_path / "b"), epochs=2, batch_size=4, progress=False,
                                resume=True)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["loss"] == pytest.approx(full["history"][1]["loss"])
    assert (tmp_path / "b" / "affinitynet.safetensors").exists()
    from foveal import load

    reloaded = load(tmp_path / "b" / "affinitynet.safetensors")
    assert all(torch.equal(reloaded.state_dict()[k], b[k]) for k in b)

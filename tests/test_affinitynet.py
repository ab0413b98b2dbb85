"""Tests of the AffinityNet refiner (foveal/models/affinitynet.py), its geometry (foveal/refine/) and its
trainer (foveal/training/affinity.py), including the psa fidelity items of issue 15 item 4."""

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
from foveal.refine.pairs import IGNORE, pair_offsets, pair_valid
from foveal.refine.random_walk import WALK_PRESETS, random_walk
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
    aff = pair_affinities(f, 5, "all")
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
    bg, fg, neg = pair_labels(labels, 3, "all")
    assert bg.shape == (1, len(pair_offsets(3)), 1, 6)
    # radius 3 on a single row: partners at dx = 1 and 2 (offsets (0, 1), (0, 2))
    assert (bg.sum(), fg.sum(), neg.sum()) == (1, 1, 4)  # (0,0) | (1,1) | 0-1 x3, 1-2 once; IGNORE never
    assert bg[0, 0, 0, 0] == 1 and fg[0, 0, 0, 2] == 1 and neg[0, 0, 0, 1] == 1 and neg[0, 1, 0, 3] == 1


def test_loss_weighting():
    torch.manual_seed(0)
    aff = torch.rand(2, 34, 5, 5, dtype=torch.float64) * 0.98 + 0.01
    labels = torch.randint(0, 3, (2, 5, 5))
    labels[0, 0, :3] = IGNORE
    bg, fg, neg = pair_labels(labels, 5, "all")
    loss, parts = affinity_loss(aff, bg, fg, neg)
    lb = -torch.log(aff[bg > 0] + 1e-5).sum() / (bg.sum().double() + 1e-5)
    lf = -torch.log(aff[fg > 0] + 1e-5).sum() / (fg.sum().double() + 1e-5)
    ln = -torch.log(1 + 1e-5 - aff[neg > 0]).sum() / (neg.sum().double() + 1e-5)
    assert float(loss) == pytest.approx(float(lb / 4 + lf / 4 + ln / 2), rel=1e-12)
    assert parts["neg_count"] == pytest.approx(float(neg.sum()), abs=1e-4)
    # each term is a mean over its own pairs: twice the background pairs, same background term
    only_neg, _ = affinity_loss(aff, torch.zeros_like(bg), torch.zeros_like(fg), neg)
    assert float(only_neg) == pytest.approx(float(ln / 2), rel=1e-9)


@pytest.mark.parametrize("steps", [256, 5])
def test_random_walk_equals_dense_matrix_power(steps):
    torch.manual_seed(1)
    f = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    aff = pair_affinities(f, 5, "all")
    scores = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    for b in range(2):
        a = brute_affinity_matrix(f[b], 5) ** 8
        t = a / a.sum(0, keepdim=True)  # column-normalised (psa)
        expected = scores[b].reshape(3, -1) @ torch.linalg.matrix_power(t, steps)
        for method in ("squaring", "sparse"):
            got = random_walk(aff[b : b + 1], scores[b : b + 1], beta=8, steps=steps, method=method, pairs="all")
            torch.testing.assert_close(got[0].reshape(3, -1), expected, rtol=1e-9, atol=1e-12)


def test_refine_contract_and_definition():
    torch.manual_seed(0)
    net = registry.build("affinitynet", steps=4, pairs="all", **SMALL).double()
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


@pytest.fixture
def fake_crf(monkeypatch):
    """A stand-in for pydensecrf whose inference returns its input scores (clipped at 1e-5); records
    the pairwise terms it is given."""
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
    return calls


def test_crf_path_wiring(fake_crf):
    """With the stand-in the CRF path gives the CRF-free labels, and receives the image and the psa
    parameters."""
    torch.manual_seed(0)
    x, seeds = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 32, 32) ** 4
    plain = registry.build("affinitynet", **SMALL).label_map(x, seeds)
    crf = registry.build("affinitynet", crf=True, **SMALL).label_map(x, seeds)
    assert ("gaussian", {"sxy": 3, "compat": 3}) in fake_crf
    assert ("bilateral", {"sxy": 80, "srgb": 13, "compat": 10}, (32, 32, 3)) in fake_crf
    assert (crf == plain).float().mean() > 0.98  # only the clipping at 1e-5 may move a label


def test_crf_label_scores_are_cached_once_per_image(fake_crf, tmp_path):
    """psa precomputes its CRF label files; the trainer's dataset computes each image's CRF scores once,
    stores them (float16) and every later epoch (or resumed run) reads exactly those."""
    from foveal.training.affinity import AffinityDataset, AffinityTrainConfig, TensorSeedSource

    net = registry.build("affinitynet", crf=True, freeze_bn=False, freeze_levels=0, **SMALL)
    x, seeds = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 32, 32) ** 2
    source = TensorSeedSource(x, seeds, net.config.mean, net.config.std)
    cfg = AffinityTrainConfig(out=str(tmp_path), color_jitter=None, flip=False)
    ds = AffinityDataset(source, net, net.feature_size(x[:1]), cfg)
    first = ds[1]
    computed = len(fake_crf)
    assert computed == 4 and sorted(p.name for p in (tmp_path / "crf_scores").iterdir()) == ["1.npz"]
    ds.set_epoch(3)
    again = ds[1]
    assert len(fake_crf) == computed and torch.equal(first[1], again[1])  # read back, not recomputed
    with np.load(tmp_path / "crf_scores" / "1.npz") as f:
        assert f["low"].dtype == np.float16 and f["low"].shape == (3, 32, 32)


@pytest.mark.filterwarnings("ignore:affinitynet")
def test_trainer_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    seeds = torch.rand(8, 2, 32, 32) ** 3

    def make():
        torch.manual_seed(0)
        return registry.build("affinitynet", **SMALL)

    opts = dict(epochs=2, batch_size=4, crop_size=24, progress=False)
    full = train_affinitynet(make(), x, seeds, out=str(tmp_path / "a"), **opts)
    interrupted = make()
    calls = [0]
    forward = interrupted.forward

    def failing(*args):
        calls[0] += 1
        if calls[0] == 3:  # first batch of the second epoch
            raise KeyboardInterrupt
        return forward(*args)

    interrupted.forward = failing
    with pytest.raises(KeyboardInterrupt):
        train_affinitynet(interrupted, x, seeds, out=str(tmp_path / "b"), **opts)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 1
    resumed = train_affinitynet(make(), x, seeds, out=str(tmp_path / "b"), resume=True, **opts)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["loss"] == pytest.approx(full["history"][1]["loss"])
    assert (tmp_path / "b" / "affinitynet.safetensors").exists()
    from foveal import load

    reloaded = load(tmp_path / "b" / "affinitynet.safetensors")
    assert all(torch.equal(reloaded.state_dict()[k], b[k]) for k in b)


# --- issue 15 item 4: AffinityNet as psa trains and applies it ---------------------------------------


def psa_indices_of_pairs(radius: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """psa's tool/pyutils.get_indices_of_pairs, re-derived: "from" positions in rows 0..h-r and
    columns r-1..w-r, "to" = from + each search_dist offset, offset by offset."""
    dist = [(0, x) for x in range(1, radius)]
    dist += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius * radius]
    rf = radius - 1
    full = np.arange(size[0] * size[1]).reshape(size)
    ch, cw = size[0] - rf, size[1] - 2 * rf
    frm = full[:-rf, rf:-rf].reshape(-1)
    to = np.concatenate([full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in dist])
    return frm, to


def test_psa_pairs_are_psa_get_indices_of_pairs():
    h, w, r = 9, 12, 5
    frm, to = psa_indices_of_pairs(r, (h, w))
    psa = set(zip(np.tile(frm, len(pair_offsets(r))).tolist(), to.tolist()))
    ours = set()
    valid = pair_valid((h, w), r)  # the default pair set is psa's
    for p, (dy, dx) in enumerate(pair_offsets(r)):
        for y, x in valid[p].nonzero().tolist():
            ours.add((y * w + x, (y + dy) * w + x + dx))
    assert len(psa) == (h - 4) * (w - 8) * 34 and ours == psa
    every = pair_valid((h, w), r, pairs="all")
    assert int(every.sum()) > len(psa)  # "all" also has pairs from border positions
    # the network's affinities are zero outside psa's pairs by default
    net = registry.build("affinitynet", **SMALL)
    assert net.config.pairs == "psa"
    with torch.no_grad():
        aff = net.eval()(torch.randn(1, 3, 64, 64))
    grid = tuple(aff.shape[-2:])
    assert torch.equal(aff[0] > 0, pair_valid(grid, r))


def test_psa_pair_labels_and_loss_match_psa_extract_affinity_labels():
    """psa's ExtractAffinityLabelInRadius (voc12/data.py), re-derived, on a random label map."""
    torch.manual_seed(3)
    h, w, r = 10, 13, 5
    label = torch.randint(0, 3, (h, w))
    label[torch.rand(h, w) < 0.2] = IGNORE
    rf = r - 1
    lab = label.numpy()
    lf = lab[:-rf, rf:-rf].reshape(-1)
    dist = pair_offsets(r)
    lt = np.stack([lab[dy:dy + h - rf, rf + dx:rf + dx + w - 2 * rf].reshape(-1) for dy, dx in dist])
    valid = (lt < 255) & (lf[None] < 255)
    pos = lf[None] == lt
    psa_bg = (pos & (lf[None] == 0)).sum()
    psa_fg = (pos & (lf[None] != 0) & valid).sum()
    psa_neg = (~pos & valid).sum()
    bg, fg, neg = pair_labels(label[None], r)
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (psa_bg, psa_fg, psa_neg)
    assert (bg.sum(), fg.sum(), neg.sum()) != tuple(t.sum() for t in pair_labels(label[None], r, "all"))


def test_random_walk_with_psa_pairs_is_psa_dense_transition():
    """infer_aff.py: aff_mat from (from, to) + identity + transpose, ^beta, column-normalised, T^t."""
    torch.manual_seed(1)
    h, w = 7, 10
    f = torch.randn(1, 4, h, w, dtype=torch.float64)
    aff = pair_affinities(f, 5)
    frm, to = psa_indices_of_pairs(5, (h, w))
    flat = f[0].reshape(4, -1)
    fr = np.tile(frm, len(pair_offsets(5)))
    a = torch.exp(-(flat[:, fr] - flat[:, to]).abs().mean(0))
    dense = torch.eye(h * w, dtype=torch.float64)
    dense[fr, to] = a
    dense[to, fr] = a
    t = dense**8 / (dense**8).sum(0, keepdim=True)
    scores = torch.rand(1, 3, h, w, dtype=torch.float64)
    expected = scores[0].reshape(3, -1) @ torch.linalg.matrix_power(t, 16)
    for method in ("squaring", "sparse"):
        got = random_walk(aff, scores, beta=8, steps=16, method=method)
        torch.testing.assert_close(got[0].reshape(3, -1), expected, rtol=1e-9, atol=1e-12)


def test_walk_presets_paper_and_psa():
    psa = registry.build("affinitynet", walk_preset="psa", **SMALL).config
    paper = registry.build("affinitynet", walk_preset="paper", **SMALL).config
    assert (psa.beta, psa.steps) == (8, 256) == (WALK_PRESETS["psa"]["beta"], WALK_PRESETS["psa"]["steps"])
    assert (paper.beta, paper.steps) == (16, 8)
    default = registry.build("affinitynet", **SMALL).config
    assert (default.beta, default.steps) == (8, 256)  # psa's numbers unless asked otherwise
    with pytest.raises(ValidationError, match="contradicts walk_preset"):
        registry.build("affinitynet", walk_preset="paper", beta=8, **SMALL)
    # the preset reaches the walk: refine with "paper" equals the walk with beta 16, t 8
    torch.manual_seed(0)
    net = registry.build("affinitynet", walk_preset="paper", walk="sparse", **SMALL).double().eval()
    x, seeds = torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.rand(1, 2, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        aff = net(x)
    scores = F.interpolate(torch.cat([(1 - seeds.amax(1, keepdim=True)) ** 16, seeds], 1), size=aff.shape[-2:],
                           mode="area")
    walked = F.interpolate(random_walk(aff, scores, beta=16, steps=8, method="sparse"), size=(64, 64),
                           mode="bilinear", align_corners=False)
    torch.testing.assert_close(net.refine(x, seeds), walked / walked.sum(1, keepdim=True))
    check_component("affinitynet", walk_preset="paper", **SMALL)  # save / load round trip of the preset


def _one_training_step(tmp_path, net, **opts):
    torch.manual_seed(0)
    x, seeds = torch.randn(4, 3, 64, 64), torch.rand(4, 2, 64, 64) ** 3
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_affinitynet(net, x, seeds, out=str(tmp_path), epochs=1, batch_size=4, progress=False, **opts)
    return before, net.state_dict()


@pytest.mark.filterwarnings("ignore:affinitynet")
def test_batchnorm_and_early_layers_stay_frozen(tmp_path):
    net = registry.build("affinitynet", **SMALL)
    assert net.config.freeze_bn and net.config.freeze_levels == 2
    before, after = _one_training_step(tmp_path, net)
    bn = [k for k in before if ".bn" in k or "running" in k]
    assert bn and all(torch.equal(before[k], after[k]) for k in bn)  # statistics and affine fixed
    early = [k for k in before if k.startswith(("backbone.body.conv1.", "backbone.body.layer1."))]
    assert early and all(torch.equal(before[k], after[k]) for k in early)
    later = [k for k in before if k.startswith("backbone.body.layer2.") and k.endswith("conv1.weight")]
    assert later and all(not torch.equal(before[k], after[k]) for k in later)
    assert not torch.equal(before["fuse.weight"], after["fuse.weight"])
    # in train mode the BatchNorm layers report eval, the rest trains
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)) and net.fuse.training
    # the options switch it off (psa's behaviour is the default, today's the option)
    free = registry.build("affinitynet", freeze_bn=False, freeze_levels=0, **SMALL)
    before, after = _one_training_step(tmp_path / "free", free)
    assert not torch.equal(before["backbone.body.bn1.running_mean"], after["backbone.body.bn1.running_mean"])
    assert not torch.equal(before["backbone.body.conv1.0.weight"], after["backbone.body.conv1.0.weight"])


def test_freezing_without_pretrained_backbone_warns(tmp_path):
    with pytest.warns(UserWarning, match="backbone_weights"):
        _one_training_step(tmp_path, registry.build("affinitynet", **SMALL))


def test_psa_parameter_groups_bias_lr_and_no_decay():
    """psa train_aff.py: weights lr / wd, biases 2 lr / no wd, new weights 10 lr / wd, new biases 20 lr / no wd."""
    net = registry.build("affinitynet", freeze_bn=False, freeze_levels=0, **SMALL)
    net.fuse = torch.nn.Conv2d(net.fuse.in_channels, net.fuse.out_channels, 1, bias=True)  # a new-layer bias
    from foveal.training.affinity import AffinityTrainConfig, build_optimizer

    optimizer, _ = build_optimizer(net, AffinityTrainConfig(out="unused", lr=0.1, weight_decay=1e-4), 10)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in net.head_parameters()}
    seen = set()
    for name, p in net.named_parameters():
        if name.startswith(("backbone.body.layer3.", "backbone.body.layer4.")):
            assert not p.requires_grad  # after the last used level (levels [1, 2]): no part in the loss
            continue
        bias = name.endswith("bias")
        lr = 0.1 * (10 if id(p) in head else 1) * (2 if bias else 1)
        assert where[id(p)] == (pytest.approx(lr), 0.0 if bias else 1e-4), name
        seen.add((id(p) in head, bias))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
    # a bias with zero gradient is not decayed; a weight is
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    bias, weight = net.backbone.body.bn1.bias, net.backbone.body.conv1[0].weight
    with torch.no_grad():
        bias.fill_(1.0)
    b0, w0 = bias.detach().clone(), weight.detach().clone()
    optimizer.step()
    assert torch.equal(bias, b0) and not torch.equal(weight, w0)
    # frozen parameters are in no group
    frozen = registry.build("affinitynet", **SMALL)
    optimizer, _ = build_optimizer(frozen, AffinityTrainConfig(out="unused"), 10)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in frozen.parameters() if p.requires_grad}
    assert id(frozen.backbone.body.bn1.weight) not in grouped


def test_colour_jitter_is_torchvision_colorjitter_with_psa_strengths():
    from PIL import Image
    from torchvision.transforms import ColorJitter

    from foveal.training.augment import PSA_JITTER, color_jitter

    rgb = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    for seed in range(4):
        torch.manual_seed(seed)
        ref = np.asarray(ColorJitter(*PSA_JITTER)(Image.fromarray(rgb)))
        ours = color_jitter(rgb, torch.Generator().manual_seed(seed))
        assert np.array_equal(ours, ref)
    assert PSA_JITTER == (0.3, 0.3, 0.3, 0.1)


def test_training_items_jitter_crop_flip_like_psa(tmp_path):
    from foveal.training.affinity import AffinityDataset, AffinityTrainConfig, TensorSeedSource

    torch.manual_seed(0)
    net = registry.build("affinitynet", freeze_bn=False, freeze_levels=0, **SMALL)
    x, seeds = torch.randn(2, 3, 40, 56), torch.rand(2, 2, 40, 56) ** 2
    source = TensorSeedSource(x, seeds, net.config.mean, net.config.std)
    size = net.feature_size(torch.zeros(1, 3, 48, 48))

    def item(**opts):
        cfg = AffinityTrainConfig(out=str(tmp_path), crop_size=48, **opts)
        return AffinityDataset(source, net, size, cfg)

    plain = item(color_jitter=None, flip=False)
    jitter = item(flip=False)
    img_p, lab_p = plain[0]
    img_j, lab_j = jitter[0]
    assert img_p.shape == (3, 48, 48) and lab_p.shape == size
    assert torch.equal(lab_p, lab_j) and not torch.allclose(img_p, img_j)  # colour only, same geometry
    # the crop: 40 rows < 48 -> zero padding rows whose scores are missing -> ignored labels
    pad_rows = (img_p == 0).all(0).all(1)
    assert int(pad_rows.sum()) == 8
    assert (lab_p[(pad_rows.reshape(size[0], -1).all(1))] == IGNORE).all()
    # deterministic per (seed, epoch, index); another epoch draws another crop / jitter
    assert torch.equal(jitter[0][0], img_j)
    jitter.set_epoch(1)
    assert not torch.equal(jitter[0][0], img_j)
    # flips mirror image and labels together
    ds = item(color_jitter=None)
    found = False
    for epoch in range(8):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        a, la = ds[1]
        b, lb = plain[1]
        if not torch.equal(a, b):
            assert torch.equal(a, b.flip(-1)) and torch.equal(la, lb.flip(-1))
            found = True
    assert found

"""foveal.evaluation: values against direct metric calls and independent re-derivations of the
papers' scripts, targets, multi-label rows, bootstrap intervals, the dataset fixtures through
``foveal evaluate-explanations --protocol``, resume after a kill, 2 processes == 1 process, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from foveal import registry
from foveal.cli import main
from foveal.core.errors import InputError
from foveal.evaluation import bootstrap_interval, evaluate, get_protocol
from foveal.evaluation.results import bootstrap_intervals

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_cnn(num_classes: int = 10):
    """timm's test_resnet at output stride 8: 4 x 4 maps at 32 px (stride 32 would give 1 x 1)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=num_classes, output_stride=8).eval()


def save_timm_weights(model, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def without_timing(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]


# ---------------------------------------------------------------------------------------------
# In memory: values are exactly the explainers' and metrics' own
# ---------------------------------------------------------------------------------------------
def test_values_equal_direct_explainer_and_metric_calls():
    model = tiny_cnn(3).train()  # evaluate puts it in eval mode and gives it back in train mode
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    for i in range(6):
        masks[i, 4 * i:4 * i + 12, 6:20] = True
    explainers = {"grad-cam": registry.build("grad-cam"), "grad-cam++": registry.build("grad-cam++")}
    metrics = {"insertion": registry.build("insertion", steps=4), "average-drop": registry.build("average-drop"),
               "pointing-game": registry.build("pointing-game", tolerance=2),
               "miou": registry.build("saliency-segmentation", quantity="miou")}
    res = evaluate(model, {"image": x, "label": y, "mask": masks}, explainers, metrics, batch_size=4,
                   progress=False, keep_maps=6)
    assert model.training
    model.eval()
    assert res.entries == ["grad-cam", "grad-cam++"] and res.images == 6
    for name, explainer in explainers.items():
        assert [r["target"] for r in res.rows[name]] == y.tolist()
        maps = torch.cat([explainer.explain(model, x[lo:lo + 4], y[lo:lo + 4]) for lo in (0, 4)])
        assert torch.equal(res.maps[name], maps)
        for mname, metric in metrics.items():
            if metric.family == "explanation":
                direct = torch.cat([metric.compute(model, x[lo:lo + 4], maps[lo:lo + 4], y[lo:lo + 4])
                                    for lo in (0, 4)])
            else:
                direct = metric.compute(maps, masks)
            np.testing.assert_array_equal(res.per_image[name][mname], direct.double().numpy())
        stats = metrics["miou"].statistics(maps, masks)
        np.testing.assert_array_equal(res.statistics[name]["miou"], stats.numpy())
        assert res.aggregates[name]["miou"] == metrics["miou"].aggregate(stats)  # pooled, not the per-image mean
        assert res.aggregates[name]["insertion"] == pytest.approx(float(res.per_image[name]["insertion"].mean()))
        assert res.seconds[name]["explain"] > 0 and res.seconds[name]["insertion"] > 0
        lo, hi = res.ci[name]["insertion"]
        assert lo <= res.aggregates[name]["insertion"] <= hi
    assert torch.equal(res.example_images, x)


def _random_maps_explainer():
    """Continuous maps without ties (a function of the image), for oracles that use torch.topk."""
    from foveal.core import Explainer

    class Noise(Explainer):
        def attribute(self, model, images, targets, hooks):
            return images.sum(1) + 0.01 * images[:, 0].roll(1, -1)

    return Noise()


def test_predicted_and_label_settings_and_chefer_perturbation_oracle():
    """Chefer et al.'s perturbation test, re-derived from pertubation_eval_from_hdf5.py: pixels of
    the [0, 1] image zeroed in top-k order, renormalised, top-1 correct against the ground-truth
    label, AUC by np.trapz including the unperturbed accuracy at 0 -- for the explanation of the
    predicted class and of the label alike."""
    model = tiny_cnn(4)
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(5, 3, 16, 16, generator=g)
    mean = std = (0.5, 0.5, 0.5)
    x = (pixels - 0.5) / 0.5
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = (pred + torch.tensor([0, 1, 0, 2, 1])) % 4  # some labels differ from the prediction
    p = get_protocol("chefer-perturbation")
    metrics = p.metrics(16, mean, std)
    explainer = _random_maps_explainer()
    res = evaluate(model, {"image": x, "label": y}, {"noise": explainer}, metrics, targets=p.targets,
                   metric_targets=p.metric_targets, batch_size=3, progress=False, resamples=0)
    assert res.entries == ["noise [predicted]", "noise [label]"]
    assert [r["target"] for r in res.rows["noise [predicted]"]] == pred.tolist()
    assert [r["target"] for r in res.rows["noise [label]"]] == y.tolist()
    vis = explainer.explain(model, x, y).reshape(5, -1)
    fractions = [0.1 * k for k in range(1, 10)]
    for mode in ("positive", "negative"):
        v = vis if mode == "positive" else -vis
        curve = [(pred == y).double()]
        for f in fractions:
            _, idx = torch.topk(v, int(256 * f), dim=-1)
            data = pixels.clone().reshape(5, 3, -1).scatter_(-1, idx[:, None].repeat(1, 3, 1), 0).reshape(5, 3, 16, 16)
            with torch.no_grad():
                curve.append((model((data - 0.5) / 0.5).argmax(1) == y).double())
        auc = np.trapezoid(torch.stack(curve, 1).numpy(), [0.0, *fractions], axis=1)
        for entry in res.entries:
            np.testing.assert_allclose(res.per_image[entry][f"{mode}-perturbation"], auc, atol=1e-12)


def test_multilabel_items_are_explained_once_per_present_class():
    model = tiny_cnn(4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 32, 32, generator=g)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.float32)
    mask = torch.zeros(3, 32, 32, dtype=torch.long)
    mask[0, :10], mask[0, 20:] = 1, 3
    mask[1, 5:25, 5:25] = 4
    mask[2, :8], mask[2, 8:16], mask[2, 16:24] = 1, 2, 3
    mask[:, 10:12] = 255  # VOC's ignore band
    explainer = registry.build("grad-cam")
    pg = registry.build("pointing-game", tolerance=0)
    res = evaluate(model, {"image": x, "labels": labels, "mask": mask}, [explainer], [pg], targets="label",
                   batch_size=3, progress=False, resamples=50)
    rows = res.rows["grad-cam"]
    assert [(r["index"], r["target"]) for r in rows] == [(0, 0), (0, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    img = torch.tensor([r["index"] for r in rows])
    cls = torch.tensor([r["target"] for r in rows])
    maps = explainer.explain(model, x[img], cls)
    expected = pg.compute(maps, mask[img] == (cls + 1)[:, None, None])
    np.testing.assert_array_equal(res.per_image["grad-cam"]["pointing-game"], expected.double().numpy())


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------
def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_images():
    metric = registry.build("average-drop")
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        values = rng.uniform(0, 100, n)
        lo, hi = bootstrap_interval(metric, values, resamples=500, seed=0)
        assert lo < values.mean() < hi
        widths.append(hi - lo)
        assert bootstrap_interval(metric, values, resamples=500, seed=0) == (lo, hi)  # seeded
    assert widths[1] < 0.4 * widths[0]  # ~ 1 / sqrt(16) = 0.25
    # NaN values are not counted, as in the metric's own aggregate
    with_nan = np.array([1.0, np.nan, 3.0, 5.0])
    lo, hi = bootstrap_interval(registry.build("pointing-game"), with_nan, resamples=200)
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
    assert all(math.isnan(v) for v in bootstrap_interval(metric, values, resamples=0))


def test_bootstrap_of_pooled_statistics_and_of_grouped_rows():
    seg = registry.build("saliency-segmentation", quantity="miou")
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 12, 12, generator=g)
    masks = torch.rand(40, 12, 12, generator=g) > 0.6
    stats = seg.statistics(maps, masks).numpy()
    lo, hi = bootstrap_interval(seg, stats, resamples=300)
    assert lo < seg.aggregate(torch.from_numpy(stats)) < hi
    # an image with two identical rows is drawn as a whole: same interval as one row per image
    metric = registry.build("insertion")
    values = np.random.default_rng(1).normal(size=30)
    single = bootstrap_interval(metric, values, resamples=300, seed=4)
    doubled = bootstrap_intervals({"m": (metric, np.repeat(values, 2))}, np.repeat(np.arange(30), 2), 30,
                                  resamples=300, seed=4)["m"]
    np.testing.assert_allclose(doubled, single, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------
def test_protocols_build_and_follow_the_authors_settings():
    from foveal.evaluation import PROTOCOLS
    from foveal.evaluation.protocols import ca_stream_steps

    for p in PROTOCOLS.values():
        for size in (224, 32):
            metrics = p.metrics(size, (0.5,) * 3, (0.5,) * 3)
            for m in metrics.values():
                if getattr(m.config, "baseline", None) == "black":
                    assert tuple(m.config.mean) == (0.5,) * 3  # the data's normalisation, not ImageNet's
        explainers = p.explainer_components(progress=False)
        assert list(explainers) == list(p.explainers)
        assert p.name in p.describe() and p.paper
    ca = PROTOCOLS["ca-stream-table1"].metrics(224)
    assert ca_stream_steps((224, 224)) == 28 and math.ceil(224 * 224 / 28) == 224 * 8  # imsize * 8 per step
    assert ca["insertion"].config.blur_kernel_size == 5 and ca["deletion"].config.baseline == "zero"
    assert ca["average-drop"].config.baseline == "black" and ca["average-drop"].config.keep_fraction is None
    chefer = PROTOCOLS["chefer-perturbation"]
    assert "attention-rollout:start_layer=1" in chefer.explainers and "vit-lrp:start_layer=1" in chefer.explainers
    assert chefer.explainer_components()["vit-lrp:start_layer=1"].config.start_layer == 1
    assert PROTOCOLS["abs-cam"].metrics(224)["average-drop"].config.keep_fraction == 0.5
    assert PROTOCOLS["abs-cam"].metrics(224)["insertion"].config.steps == 224  # RISE's step = 224 pixels
    with pytest.raises(InputError, match="did you mean chefer-perturbation"):
        get_protocol("chefer-perturbaton")


def test_ca_stream_table1_study_scores_the_label_with_pixel_space_masking():
    """Issue 15 item 3: the CA-Stream study re-derived from the authors' evaluation code
    (engine/evaluation.py single_recognition, gradcampp_recognition; ins_del.py CausalMetric):
    ground-truth class, normalise(denormalise(x) * map) for AD/AG/AI, imsize * 8 pixels per step,
    insertion from the 5 x 5 sigma-5 blur of the normalised image, deletion to zeros. Today's
    behaviour (predicted class, masking of the normalised tensor) gives other numbers."""
    from foveal.metrics.explanation import average_drop, rise_blur
    from foveal.pipelines import pooling_study

    model = registry.build("gap-classifier", model_name="test_resnet", num_classes=4,
                           model_kwargs={"output_stride": 8}).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = (pred + torch.tensor([1, 0, 2, 1, 3, 0])) % 4
    dataset = [(x[i], int(y[i])) for i in range(6)]
    res = pooling_study.evaluate({"gap": model}, dataset, ["grad-cam"], image_size=32, batch_size=3, progress=False)
    got = res["scores"]["grad-cam"]["gap"]
    assert res["accuracy"]["gap"] == pytest.approx(100 * float((pred == y).double().mean()))

    explainer = pooling_study.explainer("grad-cam", model, progress=False)
    smap = torch.cat([explainer.explain(model, x[lo:lo + 3], y[lo:lo + 3]) for lo in (0, 3)])
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    with torch.no_grad():
        base = model(x).softmax(1)
        masked = model(((x * std + mean) * smap[:, None] - mean) / std).softmax(1)
    rows = torch.arange(6)
    yy, oo = base[rows, y].double(), masked[rows, y].double()
    eps = sys.float_info.epsilon
    assert got["average-drop"] == pytest.approx(float(((yy - oo).clamp(min=0) / (yy + eps)).mean() * 100), rel=1e-6)
    assert got["average-gain"] == pytest.approx(float(((oo - yy).clamp(min=0) / (1 - yy + eps)).mean() * 100),
                                                rel=1e-6, abs=1e-9)
    assert got["average-increase"] == pytest.approx(float((oo - yy).sign().clamp(min=0).mean() * 100))

    def causal(mode: str) -> float:  # CausalMetric.evaluate + auc, stable order for ties
        step, hw = 32 * 8, 32 * 32
        n_steps = (hw + step - 1) // step
        order = torch.from_numpy(np.argsort(-smap.reshape(6, -1).numpy(), axis=1, kind="stable"))
        substrate = rise_blur(x, 5, 5.0) if mode == "ins" else torch.zeros_like(x)
        start, finish = (x.clone(), substrate) if mode == "del" else (substrate.clone(), x)
        start, finish = start.reshape(6, 3, -1), finish.reshape(6, 3, -1)
        scores = []
        for i in range(n_steps + 1):
            with torch.no_grad():
                scores.append(model(start.reshape(6, 3, 32, 32)).softmax(1)[rows, y].double())
            coords = order[:, step * i:step * (i + 1)]
            for b in range(6):
                start[b][:, coords[b]] = finish[b][:, coords[b]]
        arr = torch.stack(scores).mean(1).numpy()
        return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))

    assert got["insertion"] == pytest.approx(100 * causal("ins"), rel=1e-5)
    assert got["deletion"] == pytest.approx(100 * causal("del"), rel=1e-5)
    # the reading before issue 15: predicted class, map times the normalised tensor
    smap_pred = explainer.explain(model, x, None)
    today = float(average_drop(model, x, smap_pred).double().mean())
    assert abs(today - got["average-drop"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# The demo picks up every CAM explainer from the registry
# ---------------------------------------------------------------------------------------------
def test_demo_cam_list_is_every_registered_cam(tmp_path, monkeypatch):
    import textwrap

    from foveal.explainers.cam import CAMBase
    from foveal.pipelines.demo import cam_methods
    from foveal.registry import Registry

    bundled = cam_methods()
    assert {"grad-cam", "score-cam", "abs-cam", "attention-guided-cam"} <= set(bundled)
    assert all(issubclass(registry.entry(n).cls, CAMBase) for n in bundled)
    assert "vit-lrp" not in bundled and "ca-attention" not in bundled
    single = cam_methods(outputs=1)  # the demo's one-channel segmenter: no method comparing classes
    assert "finer-cam" in bundled and "finer-cam" not in single and set(single) == set(bundled) - {"finer-cam"}
    info = tmp_path / "tp_newcam-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-newcam\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[foveal]\ntp-newcam = tp_newcam\n")
    (tmp_path / "tp_newcam.py").write_text(textwrap.dedent("""
        from foveal.explainers.gradient_cams import GradCAM
        from foveal.registry import hookimpl

        class MyCAM(GradCAM):
            '''A new CAM method from a plugin.'''

        @hookimpl
        def register_components(register):
            register("my-cam", MyCAM)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FOVEAL_LOAD_PLUGINS", raising=False)
    reg = Registry()
    reg.load()
    assert cam_methods(reg) == sorted([*bundled, "my-cam"])
    sys.modules.pop("tp_newcam", None)


# ---------------------------------------------------------------------------------------------
# API errors
# ---------------------------------------------------------------------------------------------
def test_api_errors():
    model = tiny_cnn(3)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match="no class label"):
        evaluate(model, x, ["grad-cam"], ["insertion"], targets="label", progress=False)
    with pytest.raises(InputError, match="no 'mask'"):
        evaluate(model, {"image": x, "label": torch.tensor([0, 1])}, ["grad-cam"], ["pointing-game"],
                 progress=False)
    with pytest.raises(InputError, match="expected 'label', 'predicted' or a class index"):
        evaluate(model, x, ["grad-cam"], ["insertion"], targets="labels", progress=False)
    from foveal.data.items import ItemTransform

    class Normalised(torch.utils.data.Dataset):
        transform = ItemTransform.make(32, mean=(0.5,) * 3, std=(0.5,) * 3)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": x[i], "id": str(i), "label": 0}

    with pytest.raises(InputError, match="black assuming mean"):
        evaluate(model, Normalised(), ["grad-cam"], ["perturbation-auc"], progress=False)
    with pytest.raises(InputError, match="expected a registered metric"):
        evaluate(model, x, ["grad-cam"], ["grad-cam"], targets="predicted", progress=False)


# ---------------------------------------------------------------------------------------------
# The dataset fixtures through the command line, one protocol each
# ---------------------------------------------------------------------------------------------
CNN = "test_resnet:output_stride=8"  # + --weights: the class count comes from the weights file


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from foveal.data.fixtures import write_imagenet_folders, write_imagenet_seg_mat, write_voc

    root = tmp_path_factory.mktemp("fixtures")
    classes = ["n01440764", "n01443537", "n01484850"]
    labels = write_imagenet_folders(root / "imagenet" / "val", classes=classes, per_class=2, size=40)
    write_imagenet_seg_mat(root / "seg" / "gtsegs_ijcv.mat", n=3, size=(40, 48))
    voc = write_voc(root / "voc", n_train=1, n_val=3, n_aug=0, size=(40, 48))
    cnn10 = tiny_cnn(10)
    cnn20 = tiny_cnn(20)
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=10).eval()
    return {"root": root, "labels": labels, "voc": voc, "cnn10": cnn10,
            "w10": save_timm_weights(cnn10, root / "cnn10.safetensors"),
            "w20": save_timm_weights(cnn20, root / "cnn20.safetensors"),
            "vit": vit, "wvit": save_timm_weights(vit, root / "vit.safetensors")}


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    code = main(args)
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_imagenet_fixture_with_ca_stream_protocol(fixtures, tmp_path, capsys):
    fx, out = fixtures, tmp_path / "imagenet"
    args = ["evaluate-explanations", "--dataset", "imagenet", "--data-root", str(fx["root"] / "imagenet"),
            "--split", "val", "--model", CNN, "--weights", str(fx["w10"]), "--protocol", "ca-stream-table1",
            "--size", "32", "--batch-size", "4", "--workers", "2", "--bootstrap", "200", "--grid", "2",
            "--out", str(out), "--quiet"]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "| grad-cam |" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["mean"] == [0.5, 0.5, 0.5] and res["normalization"] == "the timm pretrained_cfg"
    assert res["metrics"]["average-drop"]["config"]["mean"] == [0.5, 0.5, 0.5]  # black = -1 in this input space
    assert list(res["results"]) == ["grad-cam", "grad-cam++", "score-cam"]
    lines = records(out)
    assert len(lines) == 6 * 3 and [r["index"] for r in lines[::3]] == list(range(6))
    ids = sorted(fx["labels"])
    assert [(r["id"], r["target"]) for r in lines[::3]] == [(i, fx["labels"][i]) for i in ids]  # ground truth
    # the values are the protocol's metrics on the dataset's own images and labels
    from foveal.data.datasets import open_dataset

    ds = open_dataset("imagenet", fx["root"] / "imagenet", "val", size=32, resize="resize-crop",
                      mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.stack([ds[i]["image"] for i in range(4)])
    y = torch.tensor([ds[i]["label"] for i in range(4)])
    metrics = get_protocol("ca-stream-table1").metrics(32, (0.5,) * 3, (0.5,) * 3)
    maps = registry.build("grad-cam").explain(fx["cnn10"], x, y)
    for name in ("average-drop", "insertion"):
        direct = metrics[name].compute(fx["cnn10"], x, maps, y).double().tolist()
        assert [r["values"][name] for r in lines[:12:3]] == direct
    for entry, row in res["results"].items():
        for name, v in row.items():
            lo, hi = res["ci"][entry][name]
            assert lo <= v <= hi
    for f in ("results.md", "results.png", "maps.png", "report.html", "evaluation.json"):
        assert (out / f).stat().st_size > 100, f
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 2 and "seconds per image" in html and "bootstrap" in html
    assert not list(out.glob("records.rank*"))
    # a second run resumes: nothing left to do, same results
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "resumed: 6 of 6 images" in stdout
    assert without_timing(records(out)) == without_timing(lines)
    # another configuration in the same folder: refused in one line, accepted with --overwrite
    other = [a if a != "ca-stream-table1" else "attention-guided-cam" for a in args]
    code, _, err = run_cli(other, capsys)
    assert code == 1 and "another configuration" in err and "--overwrite" in err and err.count("\n") == 1
    assert run_cli([*other, "--overwrite", "--limit", "2"], capsys)[0] == 0
    assert len(records(out)) == 2 * 5


def test_imagenet_seg_fixture_with_chefer_segmentation_protocol(fixtures, tmp_path, capsys):
    from foveal.metrics.localisation import reduce_saliency_segmentation

    fx, out = fixtures, tmp_path / "seg"
    code, _, _ = run_cli(["evaluate-explanations", "--dataset", "imagenet-seg", "--data-root", str(fx["root"] / "seg"),
                          "--model", "test_vit", "--weights", str(fx["wvit"]), "--protocol", "chefer-segmentation",
                          "--size", "32", "--bootstrap", "100", "--grid", "1", "--out", str(out), "--quiet"], capsys)
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == list(get_protocol("chefer-segmentation").explainers)
    lines = records(out)
    assert len(lines) == 3 * len(get_protocol("chefer-segmentation").explainers) == 3 * 6
    with torch.no_grad():  # the predicted class is explained
        from foveal.data.datasets import open_dataset

        ds = open_dataset("imagenet-seg", fx["root"] / "seg", size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        pred = fx["vit"](torch.stack([ds[i]["image"] for i in range(3)])).argmax(1).tolist()
    for entry, row in res["results"].items():
        mine = [r for r in lines if r["entry"] == entry]
        assert [r["target"] for r in mine] == pred
        stats = torch.tensor([r["statistics"]["mIoU"] for r in mine], dtype=torch.float64)
        assert row["mIoU"] == pytest.approx(reduce_saliency_segmentation(stats, "miou", "pooled"), abs=1e-12)
        assert row["pixel-accuracy"] == pytest.approx(float(stats[:, 0].sum() / stats[:, 1].sum()), abs=1e-12)
        assert 0 <= row["mAP"] <= 1


def test_voc_fixture_with_abs_cam_protocol_explains_every_present_class(fixtures, tmp_path, capsys):
    from foveal.data.voc import labels_from_mask

    fx, out = fixtures, tmp_path / "voc"
    code, _, _ = run_cli(["evaluate-explanations", "--dataset", "voc", "--data-root", str(fx["root"] / "voc"),
                          "--split", "val", "--model", CNN, "--weights", str(fx["w20"]), "--protocol", "abs-cam",
                          "--method", "grad-cam", "--method", "abs-cam:progress=false", "--targets", "label",
                          "--size", "32", "--bootstrap", "100", "--out", str(out), "--quiet"], capsys)
    assert code == 0
    val = (fx["root"] / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    expected = [(i, int(c)) for i in val for c in np.nonzero(labels_from_mask(fx["voc"][i]))[0]]
    lines = records(out)
    for entry in ("grad-cam", "abs-cam:progress=false"):
        mine = [r for r in lines if r["entry"] == entry]
        assert [(r["id"], r["target"]) for r in mine] == expected
        assert all(r["values"]["pointing-game"] in (0.0, 1.0) for r in mine)
    res = json.loads((out / "results.json").read_text())
    assert len(res["per_image"]["grad-cam"]["pointing-game"]) == len(expected)


@pytest.mark.parametrize(("extra", "message"), [
    (["--dataset", "imagenet", "--split", "val", "--protocol", "chefer-perturbaton"],
     "did you mean chefer-perturbation"),
    (["--dataset", "imagenet-seg", "--protocol", "ca-stream-table1"], "targets 'label'"),
    (["--dataset", "imagenet", "--split", "val", "--method", "grad-cam", "--metric", "pointing-game"], "--boxes"),
    (["--dataset", "imagenet", "--split", "val", "--method", "grad-cam", "--metric", "insertion", "--targets",
      "labels"], "did you mean label"),
])
def test_cli_errors_are_one_line(fixtures, tmp_path, capsys, extra, message):
    kind = extra[1]
    root = fixtures["root"] / ("seg" if kind == "imagenet-seg" else kind)
    code, _, err = run_cli(["evaluate-explanations", "--data-root", str(root), "--model", CNN, "--weights",
                            str(fixtures["w10"]), "--size", "32", "--out", str(tmp_path / "o"), "--quiet", *extra],
                           capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err


def test_box_masks_are_the_rectangles_of_loc_val_solution(tmp_path):
    from foveal.data.datasets import open_dataset
    from foveal.data.fixtures import write_ilsvrc_flat
    from foveal.evaluation.items import BoxMasks, read_boxes

    write_ilsvrc_flat(tmp_path, n=4, size=40)
    ds = BoxMasks(open_dataset("imagenet", tmp_path, size=40, resize="resize"), tmp_path / "LOC_val_solution.csv")
    boxes = read_boxes(tmp_path / "LOC_val_solution.csv")
    for i in range(4):
        item = ds[i]
        expected = torch.zeros(40, 40, dtype=torch.long)
        for _, x1, y1, x2, y2 in boxes[item["id"]]:
            expected[y1:y2 + 1, x1:x2 + 1] = 1
        assert torch.equal(item["mask"], expected)
    cropped = BoxMasks(open_dataset("imagenet", tmp_path, size=32, resize="resize-crop"),
                       tmp_path / "LOC_val_solution.csv")
    assert cropped[0]["mask"].shape == (32, 32) and cropped[0]["mask"].sum() > 0


def test_load_model_reads_the_class_count_and_normalisation(tmp_path):
    from foveal.cli.options import input_normalization, load_model

    model = tiny_cnn(7)
    model2 = load_model("test_resnet:output_stride=8", str(save_timm_weights(model, tmp_path / "w.safetensors")))
    assert model2.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model2.eval()(x), model(x))
    assert input_normalization(model2)[0] == (0.5, 0.5, 0.5)  # test_resnet's pretrained_cfg
    gap = registry.build("gap-classifier", model_name="test_resnet", num_classes=3)
    assert input_normalization(gap)[0] == IMAGENET_MEAN  # foveal's trainers normalise with ImageNet's


# ---------------------------------------------------------------------------------------------
# Resume after a kill; 2 processes == 1 process
# ---------------------------------------------------------------------------------------------
def test_record_store_keeps_finished_images_and_drops_a_cut_batch(tmp_path):
    from foveal.evaluation.records import RecordStore

    entries = ["a", "b"]
    store = RecordStore(tmp_path, {"x": 1}, entries)
    assert store.start() == set()

    def line(index, entry, row=0, rows=1):
        return {"index": index, "id": str(index), "entry": entry, "row": row, "rows": rows, "target": 0,
                "values": {"m": 0.5}, "statistics": {}}

    store.append([line(0, "a"), line(0, "b"), line(1, "a", 0, 2), line(1, "a", 1, 2), line(1, "b", 0, 2),
                  line(1, "b", 1, 2), line(2, "a")])
    with open(store.own, "a") as f:
        f.write(json.dumps({**line(2, "b"), "config": store.hash})[:25])  # a line cut by a kill
    again = RecordStore(tmp_path, {"x": 1}, entries)
    assert again.start() == {0, 1}  # image 2 misses entry b
    assert [(r["index"], r["entry"]) for r in map(json.loads, again.own.read_text().splitlines())][-1] == (1, "b")
    with pytest.raises(InputError, match="another configuration"):
        RecordStore(tmp_path, {"x": 2}, entries).start()
    assert RecordStore(tmp_path, {"x": 2}, entries, overwrite=True).start() == set()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    from foveal.data.fixtures import write_imagenet_folders

    root = tmp_path_factory.mktemp("many")
    write_imagenet_folders(root / "val", classes=["n01440764", "n01443537", "n01484850"], per_class=6, size=40)
    return root


@pytest.mark.heavy
def test_resume_after_sigkill_equals_an_uninterrupted_run(fixtures, many_images, tmp_path, capsys):
    args = ["evaluate-explanations", "--dataset", "imagenet", "--data-root", str(many_images), "--split", "val",
            "--model", CNN, "--weights", str(fixtures["w10"]), "--method", "grad-cam", "--metric",
            "insertion:steps=48", "--metric", "average-drop", "--size", "32", "--batch-size", "4", "--grid", "0",
            "--bootstrap", "50", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "foveal.cli", *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = killed / "records.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 4:  # the first batch is on disk
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = shard.read_text().count("\n")
    assert 4 <= done < 18 and not (killed / "records.jsonl").exists()
    code, stdout, _ = run_cli([*args, "--out", str(killed)], capsys)
    assert code == 0
    finished = int(stdout.split("resumed: ")[1].split(" of ")[0])
    assert 4 <= finished < 18 and finished % 4 == 0
    assert run_cli([*args, "--out", str(tmp_path / "straight")], capsys)[0] == 0
    assert without_timing(records(killed)) == without_timing(records(tmp_path / "straight"))
    a = json.loads((killed / "results.json").read_text())
    b = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert a["results"] == b["results"] and a["ci"] == b["ci"]


@pytest.mark.heavy
def test_two_processes_equal_one(fixtures, many_images, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): each writes its batches, rank 0 merges; records and
    results equal the single-process run exactly (SmoothGrad-CAM++ draws noise)."""
    args = ["evaluate-explanations", "--dataset", "imagenet", "--data-root", str(many_images), "--split", "val",
            "--model", CNN, "--weights", str(fixtures["w10"]), "--method", "grad-cam",
            "--method", "smoothgrad-cam++:n_samples=4", "--metric", "insertion:steps=8", "--metric", "average-drop",
            "--size", "32", "--batch-size", "5", "--limit", "18", "--grid", "2", "--bootstrap", "100", "--quiet",
            "--device", "cpu", "--workers", "1"]
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "foveal.cli", *args, "--out", str(two)], env=_env(), capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert run_cli([*args, "--out", str(tmp_path / "one")], capsys)[0] == 0
    assert without_timing(records(two)) == without_timing(records(tmp_path / "one"))
    a = json.loads((two / "results.json").read_text())
    b = json.loads((tmp_path / "one" / "results.json").read_text())
    assert a["results"] == b["results"] and a["ci"] == b["ci"] and a["per_image"] == b["per_image"]
    assert not list(two.glob("records.rank*")) and (two / "maps.png").exists()

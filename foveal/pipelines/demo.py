"""The main job end to end, behind ``foveal demo`` and ``make demo`` (no downloads).

1. a synthetic polyp dataset in the standard layout (or ``data=`` a user's dataset);
2. ``rta-former-t`` trained briefly, evaluated with the polyp-benchmark meanDice / meanIoU;
3. the trained segmenter's predicted regions explained with every registered CAM explainer
   (:func:`cam_methods`) and the explanations scored (deletion, insertion, average drop / increase,
   pointing game) through :func:`foveal.evaluation.evaluate`;
4. a tiny classifier with GAP and with CA-Stream pooling compared on explanation metrics;
5. the weakly-supervised pipeline (ViT LRP seeds -> AffinityNet -> random walk), seed vs
   refined mIoU;
6. ``OUT/report.html``: one self-contained page with the curves, pictures, tables and timings.

``quick=True`` runs a smaller version (used by the tests).
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import __version__, registry
from ..report import Report, plot_curves
from ..viz import grid, heatmap_overlay, mask_overlay, save_image

SEGMENTER_METRICS = ("deletion", "insertion", "average-drop", "average-increase")
SEGMENTER_LAYER = "decoder.head.0"  # the fused decoder feature (stride 4) in front of the classifier conv

#: The tiny ViT / AffinityNet of the weakly-supervised step (CPU-sized; see foveal.pipelines.wsss).
WSSS_MODELS = dict(
    vit_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3},
    affinity_options={"backbone_options": {"model_name": "test_resnet"}, "levels": [1, 2, 3],
                      "level_channels": [16, 16, 32], "feature_dim": 32, "walk": "sparse"},
)

#: Sizes of the two demo versions.
SETTINGS = {
    "quick": dict(train_images=24, test_images=8, size=32, epochs=4, lr=3e-3, explain_images=2, curve_steps=16,
                  pooling_images=8, wsss=dict(images=48, size=64, cls_epochs=25, aff_epochs=6, examples=3)),
    "full": dict(train_images=96, test_images=24, size=64, epochs=10, lr=2e-3, explain_images=4, curve_steps=64,
                 pooling_images=None, wsss=dict(images=64, size=64, cls_epochs=25, aff_epochs=6, examples=6)),
}


def cam_methods(reg=None, outputs: int | None = None) -> list[str]:
    """Every registered explainer whose class derives from
    :class:`~foveal.explainers.cam.CAMBase` (sorted names), so a new CAM method, bundled or from a
    plugin, is in the demo without editing it; with ``outputs``, only the methods that apply to a
    model with that many output channels (``CAMBase.min_outputs``: Finer-CAM needs two classes)."""
    from ..explainers.cam import CAMBase

    reg = reg or registry.REGISTRY
    return [n for n in reg.names(kind="explainer") if issubclass(reg.entry(n).cls, CAMBase)
            and (outputs is None or reg.entry(n).cls.min_outputs <= outputs)]


class Steps:
    """Numbered progress lines and a timing table."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def step(self, title: str):
        n = len(self.rows) + 1
        print(f"[{n}/{self.total}] {title} ...", flush=True)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.rows.append({"step": f"{n}. {title}", "seconds": round(seconds, 1)})
        print(f"[{n}/{self.total}] {title}: {seconds:.1f} s", flush=True)


def run_demo(out: str | Path = "demo-output", data: str | Path | None = None, quick: bool = False, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Run the six steps; returns a summary dict (also written to ``OUT/summary.json``)."""
    from ..data.polyp import make_synthetic_polyps

    s = SETTINGS["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    steps = Steps(6)
    t0 = time.perf_counter()
    report = Report("foveal demo", f"foveal {__version__} · {'quick' if quick else 'full'} run · seed {seed} · "
                    f"{'data: ' + str(data) if data else 'synthetic data'} · CPU threads: {torch.get_num_threads()}")
    summary: dict[str, Any] = {"quick": quick, "seed": seed}

    with steps.step("polyp dataset"):
        if data is None:
            data = make_synthetic_polyps(out / "data" / "polyps", num_train=s["train_images"],
                                         num_test=s["test_images"], test_sets=("SynthA",), size=max(s["size"], 64),
                                         seed=seed)
        summary["data"] = str(data)

    with steps.step("train and evaluate rta-former-t"):
        seg = train_segmenter(Path(data), out / "segmentation", s, seed, progress, report)
        summary["segmentation"] = seg["scores"]

    with steps.step("explain the segmenter with CAM methods"):
        summary["segmenter_explanations"] = explain_segmenter(seg["model"], Path(data), s, progress, report)

    with steps.step("GAP vs CA-Stream classifier"):
        summary["pooling"] = compare_pooling(out / "pooling", s, quick, seed, progress, report)

    with steps.step("weakly-supervised segmentation (ViT LRP -> AffinityNet)"):
        summary["wsss"] = run_weak_supervision(out / "wsss", s, seed, progress, report)

    with steps.step("write report"):
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        report.section("Timing", f"Total {summary['seconds']:.1f} s on {torch.get_num_threads()} CPU thread(s).")
        report.table(steps.rows + [{"step": "total", "seconds": summary["seconds"]}], "seconds per step")
        path = report.write(out / "report.html")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    summary["report"] = str(path.resolve())
    print(f"\nfoveal demo finished in {time.perf_counter() - t0:.1f} s")
    print(f"report: {path.resolve()}")
    return summary


def train_segmenter(data: Path, out: Path, s: dict, seed: int, progress: bool, report: Report) -> dict[str, Any]:
    from ..data.images import read_mask, read_rgb, to_tensor
    from ..data.polyp import find_pairs, find_test_sets
    from ..training.segmentation import evaluate, format_table, predict_probabilities, train

    with warnings.catch_warnings():  # random init is the point of a download-free demo; the run log keeps the note
        warnings.filterwarnings("ignore", message=".*starts from random weights", category=UserWarning)
        result = train(data=str(data), out=str(out), model="rta-former-t", epochs=s["epochs"], batch_size=8,
                       size=s["size"], scales=[1.0], lr=s["lr"], seed=seed, progress=progress, overwrite=True)
    model = result["model"].eval()
    scores = evaluate(model, data, size=s["size"], progress=progress)
    table = format_table(scores)
    print(table)
    report.section("1-2. Polyp segmentation with RTA-Former-T",
                   f"rta-former-t (PVTv2-B0 encoder, random init) trained {s['epochs']} epochs at "
                   f"{s['size']}x{s['size']} with the structure loss; evaluated with the polyp-benchmark "
                   "protocol (meanDice / meanIoU over 256 thresholds, per image then mean).")
    losses = [r["loss"] for r in result["history"]]
    report.image(plot_curves({"training loss": losses}, ylabel="structure loss", title="training curve"),
                 "training curve (structure loss per epoch)", width=480)
    report.table([{"dataset": k, **{m: v for m, v in r.items()}} for k, r in scores.items()], "held-out scores")
    name, folder = next(iter(find_test_sets(data).items()))
    cells, labels = [], []
    for image_file, mask_file in find_pairs(folder)[:6]:
        rgb = read_rgb(image_file, (s["size"] * 2, s["size"] * 2))
        truth = read_mask(mask_file, rgb.shape[:2])
        with torch.no_grad():
            x = to_tensor(read_rgb(image_file, (s["size"], s["size"])))[None]
            pred = predict_probabilities(model, x, rgb.shape[:2])[0].numpy() >= 0.5
        cells.append([rgb, mask_overlay(rgb, truth), mask_overlay(rgb, pred, (255, 60, 60))])
        labels.append(image_file.stem)
    picture = grid([list(c) for c in zip(*cells)], row_labels=["image", "truth", "prediction"], col_labels=labels)
    save_image(picture, out / "predictions.png")
    report.image(picture, f"predictions on {name} (green: ground truth, red: prediction)")
    return {"model": model, "scores": scores}


def explain_segmenter(model, data: Path, s: dict, progress: bool, report: Report) -> dict[str, Any]:
    from ..data.images import to_uint8
    from ..data.polyp import PolypDataset, find_test_sets
    from ..evaluation import evaluate

    folder = next(iter(find_test_sets(data).values()))
    ds = PolypDataset(folder, size=s["size"], soft_masks=False)  # binary masks for the localisation metrics
    n = min(s["explain_images"], len(ds))
    images = torch.stack([ds[i][0] for i in range(n)])
    masks = torch.stack([ds[i][1][0] for i in range(n)]).bool()
    methods = cam_methods(outputs=1)  # the segmenter has one (polyp) output channel
    explainers = {}
    for method in methods:
        options = {"target_layer": SEGMENTER_LAYER}
        if "progress" in registry.info(method)["fields"]:
            options["progress"] = progress
        explainers[method] = registry.build(method, **options)
    metrics = {m: registry.build(m, **({"steps": s["curve_steps"]} if m in ("deletion", "insertion") else {}))
               for m in SEGMENTER_METRICS}
    metrics["pointing-game"] = registry.build("pointing-game", tolerance=max(2, s["size"] // 16))
    # "predicted" on a segmenter: the model's own predicted polyp region, frozen for the metrics
    result = evaluate(model, {"image": images, "mask": masks}, explainers, metrics, targets="predicted",
                      batch_size=n, keep_maps=n, resamples=0, progress=False)
    rows = [{"method": m, "explain s": round(result.seconds[m]["explain"] * n, 2), **result.aggregates[m]}
            for m in methods]
    maps_by_method = result.maps
    scale = max(1, -(-128 // images.shape[-1]))  # show small demo images at >= 128 px

    def big(t: torch.Tensor, mode: str) -> torch.Tensor:
        return torch.nn.functional.interpolate(t[:, None].float(), scale_factor=scale, mode=mode)[:, 0]

    rgb = to_uint8(torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest"))
    masks_big = big(masks, "nearest").bool()
    cells = [[rgb[i] for i in range(n)], [mask_overlay(rgb[i], masks_big[i].numpy()) for i in range(n)]]
    cells += [[heatmap_overlay(rgb[i], big(maps_by_method[m], "bilinear")[i].clamp(0, 1).numpy()) for i in range(n)]
              for m in methods]
    picture = grid(cells, row_labels=["image", "truth", *methods], col_labels=[f"#{i}" for i in range(n)])
    report.section("3. Explaining the segmenter",
                   f"Every CAM explainer on the fused decoder feature ({SEGMENTER_LAYER}) of the trained model, "
                   "target: the sum of polyp logits over the predicted region. Deletion/insertion are RISE AUCs "
                   "of the same target's sigmoid score; average drop/increase use the soft-masked image; the "
                   "pointing game checks the map's maximum against the ground-truth mask.")
    report.image(picture, "methods x images (saliency over the input)")
    report.table(rows, "explanation metrics on the segmenter (lower deletion / drop is better)")
    return {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in rows}


def compare_pooling(out: Path, s: dict, quick: bool, seed: int, progress: bool, report: Report) -> dict[str, Any]:
    from .pooling_study import COLUMNS, run_table1

    results = run_table1(out, synthetic=True, limit=s["pooling_images"],
                         figure_images=3 if quick else 4, seed=seed, progress=progress, verbose=False)
    report.section("4. GAP vs CA-Stream pooling (CA-Stream Table 1 layout)",
                   "A tiny ResNet trained from scratch on synthetic shapes with GAP, then CA-Stream trained on the "
                   "frozen network; both explained with Grad-CAM, Grad-CAM++ and Score-CAM on the last stage and "
                   "scored with the ca-stream-table1 protocol (ground-truth class, masking in pixel space, the "
                   "authors' insertion/deletion step).")
    report.table([{"pooling": p.upper(), "accuracy %": a} for p, a in results["accuracy"].items()], "accuracy")
    rows = [{"method": meth, "pooling": pool.upper(), **{COLUMNS[m]: v for m, v in vals.items()}}
            for meth, by_pool in results["scores"].items() for pool, vals in by_pool.items()]
    report.table(rows, "AD/AG/AI in %, I/D AUC x100")
    if "figure" in results:
        report.image(results.pop("figure"), "saliency with GAP and CA pooling, and the CA raw attention")
    return {k: v for k, v in results.items() if k in ("accuracy", "scores", "images")}


def run_weak_supervision(out: Path, s: dict, seed: int, progress: bool, report: Report) -> dict[str, Any]:
    from .wsss import run_wsss

    result = run_wsss(out=str(out), seed=seed, progress=progress, overwrite=True, **WSSS_MODELS, **s["wsss"])
    report.section("5. Weakly-supervised segmentation",
                   "A tiny ViT classifier trained on image-level labels of synthetic multi-object images; "
                   "vit-lrp seeds -> AffinityNet affinity labels -> training -> random walk -> pseudo-masks.")
    report.table([{"masks": "explanation seeds", "mIoU": result.seed_miou},
                  {"masks": "AffinityNet random walk", "mIoU": result.refined_miou}],
                 f"pseudo-mask mIoU against ground truth (classifier accuracy {result.classifier_accuracy:.2f})")
    if result.examples is not None:
        report.image(result.examples, "image | truth | seeds | seed mask | refined mask")
    return result.summary()

"""Protocol presets: the explainers, metrics, classes and image geometry of a paper's explanation
experiment, in one name (``foveal evaluate-explanations --protocol NAME``,
``get_protocol(NAME).metrics(...)``).

Each preset cites the paper section it reproduces and the authors' script it follows; where the
paper is silent the script decides, and where both are silent the decision is written in
``decisions`` (shown by ``--list-protocols`` and in ``docs/evaluation.md``). Metrics that remove
pixels to black take the model's input normalisation (``mean``, ``std``), and step counts that the
authors give in pixels per step are converted for the image size, so ``metrics(size, mean, std)``
builds them for the data at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InputError
from ..data.images import IMAGENET_MEAN, IMAGENET_STD

Size = tuple[int, int]
MetricSpecs = dict[str, tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Protocol:
    """A paper's evaluation setting; see the module docstring."""

    name: str
    title: str
    paper: str
    reference: str
    explainers: tuple[str, ...]
    metric_specs: Callable[[Size, Sequence[float], Sequence[float]], MetricSpecs]
    targets: tuple[str, ...] = ("predicted",)
    metric_targets: str | None = None
    dataset: str = "imagenet"
    resize: str = "resize"
    size: int = 224
    decisions: tuple[str, ...] = field(default_factory=tuple)

    def metric_options(self, size: int | Size = 224, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> MetricSpecs:
        """``{column: (registered metric, options)}`` for images of ``size`` normalised with ``mean``/``std``."""
        hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return self.metric_specs(hw, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def metrics(self, size: int | Size = 224, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
        """The metric components, by column name."""
        from .. import registry

        return {col: _named(registry.build(name, **opts), name)
                for col, (name, opts) in self.metric_options(size, mean, std).items()}

    def explainer_components(self, **options: Any) -> dict[str, Any]:
        """The explainers of the paper's table, by spec (``options`` go to every one that has the field,
        e.g. ``progress=False``)."""
        from .. import registry
        from ..cli.options import parse_spec

        out = {}
        for spec in self.explainers:
            name, opts = parse_spec(spec)
            fields = registry.info(name)["fields"]
            out[spec] = _named(registry.build(name, **opts, **{k: v for k, v in options.items() if k in fields}),
                               name)
        return out

    def describe(self) -> str:
        lines = [f"{self.name}: {self.title}", f"  paper: {self.paper}", f"  authors' code: {self.reference}",
                 f"  dataset: {self.dataset} ({self.resize} to {self.size} px); explained class: "
                 f"{', '.join(self.targets)}; scored class: {self.metric_targets or 'the explained one'}",
                 f"  explainers: {', '.join(self.explainers)}",
                 "  metrics: " + ", ".join(f"{c} = {n}{_opts(o)}" for c, (n, o) in self.metric_options().items())]
        lines += [f"  - {d}" for d in self.decisions]
        return "\n".join(lines)


def _named(obj: Any, name: str) -> Any:
    obj.registry_name = name
    return obj


def _opts(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k not in ("mean", "std")}
    return ":" + ",".join(f"{k}={v}" for k, v in shown.items()) if shown else ""


# ---------------------------------------------------------------------------------------------
# Chefer et al. 2021 (vit-lrp-affinitynet.txt sec. 5.2, Tables 2 and 3)
# ---------------------------------------------------------------------------------------------
#: The columns of Tables 2-3: rollout, raw attention, GradCAM (on the last attention), LRP (Chefer et al.'s
#: "full" LRP with the original rules, ``ViT_orig_LRP``), partial LRP, transformer attribution.
CHEFER_EXPLAINERS = ("attention-rollout:start_layer=1", "raw-attention", "attn-grad-cam", "lrp:rules=orig-lrp",
                     "partial-lrp", "vit-lrp:start_layer=1")


def _chefer_perturbation(size: Size, mean, std) -> MetricSpecs:
    common = {"baseline": "black", "mean": mean, "std": std, "score": "accuracy"}
    return {"positive-perturbation": ("perturbation-auc", {"mode": "positive", **common}),
            "negative-perturbation": ("perturbation-auc", {"mode": "negative", **common})}


def _chefer_segmentation(size: Size, mean, std) -> MetricSpecs:
    return {"pixel-accuracy": ("saliency-segmentation", {"quantity": "pixel-accuracy", "averaging": "pooled"}),
            "mAP": ("saliency-segmentation", {"quantity": "ap"}),
            "mIoU": ("saliency-segmentation", {"quantity": "miou", "averaging": "pooled"})}


# ---------------------------------------------------------------------------------------------
# CA-Stream (ca-stream.txt sec. 4, Table 1)
# ---------------------------------------------------------------------------------------------
def ca_stream_steps(size: Size) -> int:
    """Insertion/deletion steps of the authors' ``CausalMetric(..., step=imsize * 8)``: 8 image rows
    of pixels per step, ``ceil(H * W / (8 * W))`` steps (28 at 224 x 224; exact when 8 divides H)."""
    h, w = size
    return math.ceil(h * w / (8 * w))


def _ca_stream(size: Size, mean, std) -> MetricSpecs:
    black = {"baseline": "black", "mean": mean, "std": std}
    steps = ca_stream_steps(size)
    return {"average-drop": ("average-drop", black), "average-gain": ("average-gain", black),
            "average-increase": ("average-increase", black),
            "insertion": ("insertion", {"steps": steps, "baseline": "blur", "blur_kernel_size": 5, "blur_sigma": 5.0}),
            "deletion": ("deletion", {"steps": steps, "baseline": "zero"})}


# ---------------------------------------------------------------------------------------------
# Abs-CAM (abs-cam.txt sec. 4.2, 4.3, Tables 2 and 3)
# ---------------------------------------------------------------------------------------------
def _abs_cam(size: Size, mean, std) -> MetricSpecs:
    top_half = {"keep_fraction": 0.5, "baseline": "zero"}
    return {"average-drop": ("average-drop", top_half), "average-increase": ("average-increase", top_half),
            "insertion": ("insertion", {"steps": size[0], "baseline": "blur"}),
            "deletion": ("deletion", {"steps": size[0], "baseline": "zero"}),
            "pointing-game": ("pointing-game", {"tolerance": 15.0})}


# ---------------------------------------------------------------------------------------------
# Attention-guided CAM (attention-guided-cam.txt sec. 4.2, Tables 3 and 4)
# ---------------------------------------------------------------------------------------------
AG_CAM_FRACTIONS = (0.05, 0.1, 0.2, 0.25, 0.5)


def _attention_guided(size: Size, mean, std) -> MetricSpecs:
    black = {"baseline": "black", "mean": mean, "std": std}
    specs: MetricSpecs = {"average-drop": ("average-drop", black), "average-increase": ("average-increase", black)}
    for f in AG_CAM_FRACTIONS:
        specs[f"percentage-in-{round(100 * f)}%"] = ("percentage-in", {"fraction": f, **black})
    return specs


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(
        name="chefer-perturbation",
        title="positive / negative perturbation AUC, predicted and target class (Chefer et al. 2021, Table 2)",
        paper="Chefer et al., 'Transformer Interpretability Beyond Attention Visualization', CVPR 2021, sec. 4 "
              "'Perturbation tests'; reproduced in vit-lrp-affinitynet.txt sec. 5.2, Table 2",
        reference="hila-chefer/Transformer-Explainability baselines/ViT/generate_visualizations.py (start_layer=1 "
                  "for rollout and transformer attribution, --vis-class top|target) and "
                  "baselines/ViT/pertubation_eval_from_hdf5.py",
        explainers=CHEFER_EXPLAINERS,
        metric_specs=_chefer_perturbation,
        targets=("predicted", "label"),
        metric_targets="label",
        dataset="imagenet",
        resize="resize",
        decisions=(
            "images resized straight to 224 x 224 (transforms.Resize((224, 224)) in generate_visualizations.py) and "
            "normalised with the model's mean/std (0.5 for their ViT-B/16)",
            "removed pixels are set to 0 in [0, 1] pixel space before normalisation (black), 10%..90% of the "
            "pixels; the value at each fraction is top-1 correctness against the ground-truth label for both the "
            "'predicted' and the 'target' explanations (their script compares with `target` in both), and the "
            "fraction-0 point is the model's own accuracy (authors' issue #31); AUC by np.trapz over fractions "
            "0..0.9 (the paper reports it x100)",
            "start_layer=1 set explicitly for attention-rollout and vit-lrp (the value their scripts pass)",
            "class-agnostic explainers (rollout, raw attention) are run under both settings (same maps; their "
            "table leaves the 'target' cells empty)",
            "ties in relevance: foveal ranks equal values by row-major position (stable), torch.topk in their "
            "script leaves the order unspecified",
        ),
    ),
    Protocol(
        name="chefer-segmentation",
        title="ImageNet-segmentation: pixel accuracy, mAP, mIoU of maps as soft segmentations (Chefer et al. 2021, "
              "Table 3)",
        paper="Chefer et al. 2021, sec. 4 'Segmentation'; reproduced in vit-lrp-affinitynet.txt sec. 5.2, Table 3",
        reference="hila-chefer/Transformer-Explainability baselines/ViT/imagenet_seg_eval.py",
        explainers=CHEFER_EXPLAINERS,
        metric_specs=_chefer_segmentation,
        targets=("predicted",),
        dataset="imagenet-seg",
        resize="resize",
        decisions=(
            "the predicted class is explained (their script calls the generators with index=None); images "
            "Resize((224, 224)), masks the same with nearest neighbour",
            "each map is min-max normalised and thresholded at its mean; pixel accuracy and IoU counts are summed "
            "over the dataset (pooled), AP is averaged per image, as `saliency-segmentation` computes them",
        ),
    ),
    Protocol(
        name="ca-stream-table1",
        title="AD / AG / AI / I / D of CAM methods with GAP or CA-Stream pooling (CA-Stream Table 1)",
        paper="Torres et al., 'CA-Stream: Attention-based pooling for interpretable image recognition', "
              "ca-stream.txt sec. 4, Table 1",
        reference="ftorres11/CA_Stream engine/evaluation.py (interpretable_recognition, single_recognition, "
                  "gradcampp_recognition) and engine/interpretable/ins_del.py (CausalMetric)",
        explainers=("grad-cam", "grad-cam++", "score-cam"),
        metric_specs=_ca_stream,
        targets=("label",),
        metric_targets="label",
        dataset="imagenet",
        resize="resize-crop",
        decisions=(
            "the ground-truth class is explained and scored (the scripts' default; --pred switches to the "
            "prediction)",
            "AD/AG/AI: softmax probabilities of the image and of normalise(denormalise(x) * map), i.e. the soft "
            "map with a black baseline in pixel space; AI counts strict increases (sign(O - Y) clamped at 0)",
            "insertion starts from the normalised image blurred with their 5 x 5, sigma 5 Gaussian (zero padding) "
            "and deletion replaces pixels with zeros of the normalised tensor (torch.zeros_like), "
            "imsize * 8 pixels per step (28 steps at 224 px), softmax probability of the class, RISE's "
            "trapezoid AUC; the paper reports I and D x100",
            "geometry: their imagenet_tester is not runnable as published; the standard resize 256 + centre crop "
            "224 (resize-crop) is used",
        ),
    ),
    Protocol(
        name="abs-cam",
        title="average drop / increase (top 50%), insertion / deletion, pointing game (Abs-CAM Tables 2 and 3)",
        paper="Zeng et al., 'Abs-CAM', abs-cam.txt sec. 4.2 (Table 2) and sec. 4.3 (eq. 6, Table 3)",
        reference="no public evaluation code; AD/AI as Grad-CAM++ (Chattopadhyay et al. 2018), insertion/deletion "
                  "as RISE's evaluation.py (eclique/RISE), pointing game as Zhang et al. 2016 / TorchRay",
        explainers=("grad-cam", "grad-cam++", "smoothgrad-cam++", "score-cam", "abs-cam-init", "abs-cam"),
        metric_specs=_abs_cam,
        targets=("predicted",),
        dataset="imagenet",
        resize="resize",
        decisions=(
            "images resized to 224 x 224 and ImageNet-normalised (sec. 4); the predicted class is explained and "
            "scored (the paper says 'target class' without defining it)",
            "AD/AI: the top 50% pixels of the map as a binary mask, multiplied point-wise with the normalised "
            "input (baseline 'zero'), softmax probabilities",
            "insertion from RISE's blurred image (11 x 11, sigma 5), deletion to zeros, one image row of pixels per "
            "step (224 steps at 224 px, RISE's step=224), softmax probability",
            "pointing game: a hit when the map's maximum is within 15 px of the object (Zhang et al.'s tolerance); "
            "Acc = hits / (hits + misses) over all images (eq. 6); on ImageNet val the objects are the boxes of "
            "LOC_val_solution.csv (--boxes), elsewhere the dataset's masks",
            "the paper samples 500 (AD/AI), 5500 (I/D) and 300 (pointing) images; here every image is used (or "
            "--limit)",
        ),
    ),
    Protocol(
        name="attention-guided-cam",
        title="average drop, percent increase and 'percentage in' (attention-guided CAM Tables 3 and 4)",
        paper="attention-guided-cam.txt sec. 4.2.1 (eq. 8), 4.2.2 (eq. 9), 4.2.3 (Table 4)",
        reference="no public code; AD/AI as Ablation-CAM / Grad-CAM++ (their ref. [32])",
        explainers=("grad-cam", "grad-cam++", "smoothgrad-cam++", "xgrad-cam", "attention-guided-cam"),
        metric_specs=_attention_guided,
        targets=("predicted",),
        dataset="imagenet",
        resize="resize",
        decisions=(
            "images resized to 224 x 224 (sec. 4.1); the predicted class is explained and scored",
            "their inputs are [0, 1] tensors and the explanation map multiplies the image point by point: masking "
            "in pixel space (black baseline) with the model's normalisation applied after",
            "AD and percent increase use the soft map (E * x, their ref. [32]): Table 3's drops (42-46%) are those "
            "of soft masks; with the top-50% binary mask the kept probability (Table 4: ~9%) would imply far larger "
            "drops",
            "percentage in: the top 5, 10, 20, 25, 50% pixels kept, softmax probability of the class in percent",
        ),
    ),
)}


def get_protocol(name: str) -> Protocol:
    """The preset ``name`` (case, ``_`` and spaces ignored); unknown names list the close matches."""
    from ..data.items import close_matches

    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key not in PROTOCOLS:
        raise InputError(f"unknown protocol {name!r}{close_matches(key, list(PROTOCOLS))}; known: "
                         f"{', '.join(PROTOCOLS)} (see --list-protocols)")
    return PROTOCOLS[key]


def list_protocols() -> str:
    return "\n\n".join(p.describe() for p in PROTOCOLS.values())

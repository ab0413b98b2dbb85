"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018;
abs-cam.txt 4.4).

:func:`model_randomisation` re-initialises the model's layers, from the output towards the input,
either cumulatively (``"cascading"``) or one at a time (``"independent"``), explains the same
images with the same explainer after each step, and compares each map with the map of the
trained model by Spearman rank correlation and SSIM. A method that passes the check produces
maps that decorrelate as layers are randomised. :func:`plot_randomisation` draws the curves.
:func:`mprt` summarises one mode per explainer as Quantus' ``MPRT`` does (the mean over the
randomised top-k layers and the value after the last one; :func:`mprt_table` for several
explainers); docs/metrics.md lists where the two differ.

Conventions (the paper's, unless stated):

* the explained class is fixed to the trained model's prediction on each image (or the given
  ``targets``), not re-predicted by the randomised model;
* layers are the modules that own parameters directly (convolutions, linear layers, norms ...),
  in reverse registration order (logits first), or the dotted names given;
* a layer is randomised by its own ``reset_parameters()`` (PyTorch's default initialisation;
  norm layers also reset running statistics) under a seeded generator, parameters without one
  get a Gaussian of the same mean and standard deviation; the user's model is never touched
  (a deep copy is randomised; in independent mode each layer is restored after its step);
* Spearman correlation uses average ranks for ties (``scipy.stats.spearmanr``) over all pixels
  of the maps, optionally of their absolute values (``absolute=True``, the paper's variant for
  signed maps); SSIM is scikit-image's ``structural_similarity`` default (7x7 uniform window,
  K1 = 0.01, K2 = 0.03, sample covariance, mean over the window-valid area) with a data range
  of 1 on the [0, 1] maps; a correlation with a constant map is NaN (undefined).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.explainer import Targets, select_output
from ..core.modules import preserved_model_state, resolve_layer
from ..core.tensors import check_images, check_maps

__all__ = ["spearman", "ssim", "randomisable_layers", "RandomisationTable", "model_randomisation",
           "plot_randomisation", "MPRTResult", "mprt", "mprt_table"]


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) along dim 1, ties sharing the mean of their positions."""
    order = torch.sort(x, dim=1, stable=True)
    sv, idx = order.values, order.indices
    n = x.shape[1]
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(sv)
    new_group = torch.ones_like(sv, dtype=torch.bool)
    new_group[:, 1:] = sv[:, 1:] != sv[:, :-1]
    group = new_group.cumsum(1) - 1
    sums = torch.zeros_like(pos).scatter_add_(1, group, pos)
    counts = torch.zeros_like(pos).scatter_add_(1, group, torch.ones_like(pos))
    avg = sums.gather(1, group) / counts.gather(1, group)
    return torch.empty_like(avg).scatter_(1, idx, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Spearman rank correlation (B,) of (B, ...) tensors (average ranks for ties);
    NaN when either sample is constant."""
    ra, rb = _rank(a.flatten(1).double()), _rank(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Per-sample SSIM (B,) of (B, H, W) maps, equal to ``skimage.metrics.structural_similarity``
    with its defaults (uniform ``win_size`` window, sample covariance, K1 = 0.01, K2 = 0.03),
    averaged over the window-valid region."""
    a, b = a.double()[:, None], b.double()[:, None]
    h, w = a.shape[-2:]
    if min(h, w) < win_size:
        raise InputError(f"ssim: maps of size {h}x{w} are smaller than the {win_size}x{win_size} window")
    np_ = win_size * win_size
    cov_norm = np_ / (np_ - 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, win_size, stride=1)  # valid region only, as skimage's crop

    ux, uy = filt(a), filt(b)
    vx = cov_norm * (filt(a * a) - ux * ux)
    vy = cov_norm * (filt(b * b) - uy * uy)
    vxy = cov_norm * (filt(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def randomisable_layers(model: nn.Module) -> list[str]:
    """Dotted names of modules owning parameters directly, output side first (reverse order)."""
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def _randomise(module: nn.Module, generator_seed: int) -> None:
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG streams are left as they were
        torch.manual_seed(generator_seed)
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
            return
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 else 1.0
                p.copy_(torch.randn(p.shape, dtype=p.dtype).to(p.device) * (std or 1.0) + float(p.mean()))


@dataclass
class RandomisationTable:
    """Rows of the randomisation test: one per (mode, step), plus the per-image values.

    ``rows`` are dicts ``{"mode", "step", "layer", "spearman", "ssim"}`` where ``layer`` is the
    layer randomised at this step (cascading: this one and every layer before it in the list),
    and the metric values are means over images (NaN images not counted). ``per_image`` maps
    ``(mode, step)`` to a dict of (B,) tensors.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    per_image: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        head = "| mode | step | layer | Spearman | SSIM |\n|---|---|---|---|---|\n"
        return head + "".join(
            f"| {r['mode']} | {r['step']} | `{r['layer']}` | {r['spearman']:.4f} | {r['ssim']:.4f} |\n"
            for r in self.rows
        )

    def to_dict(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]


def _nanmean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def _explain_all(explainer: Any, model: nn.Module, images: torch.Tensor, targets: Any, batch_size: int | None,
                 output_selector: Any) -> torch.Tensor:
    """Maps (B, H, W) of every image, ``batch_size`` images per ``explain`` call (all at once
    when None); ``targets`` a list of B targets."""
    bs = batch_size or images.shape[0]
    kw = {} if output_selector is None else {"output_selector": output_selector}
    maps = [explainer.explain(model, images[i : i + bs], targets[i : i + bs], **kw) for i in range(0, len(images), bs)]
    return check_maps(torch.cat(maps), like=images).detach()


def _frozen_targets(model: nn.Module, images: torch.Tensor, targets: Targets, batch_size: int | None,
                    output_selector: Any) -> list:
    """One target per image: the given ones, or the trained model's predicted class."""
    b = images.shape[0]
    if targets is None:
        bs = batch_size or b
        with preserved_model_state(model), torch.no_grad():
            out = torch.cat([select_output(model(images[i : i + bs]), output_selector) for i in range(0, b, bs)])
        if out.dim() != 2:
            raise InputError("targets=None needs a classifier output (B, K); pass targets for other models")
        return out.argmax(1).tolist()
    if isinstance(targets, int):
        return [targets] * b
    if isinstance(targets, torch.Tensor):
        return [int(targets)] * b if targets.dim() == 0 else targets.tolist()
    if callable(targets):
        raise InputError("targets: a batched callable cannot be split into chunks; pass one target per image")
    targets = list(targets)
    if len(targets) != b:
        raise InputError(f"targets: expected {b} targets (one per image), got {len(targets)}")
    return targets


def model_randomisation(
    model: nn.Module, explainer: Any, images: torch.Tensor, targets: Targets = None, *,
    layers: Sequence[str] | None = None, modes: Sequence[Literal["cascading", "independent"]] = ("cascading",
                                                                                                     "independent"),
    seed: int = 0, layer_seeds: Sequence[int] | None = None, absolute: bool = False, batch_size: int | None = None,
    output_selector: Any = None, progress: bool = False,
) -> RandomisationTable:
    """Run the cascading and/or independent randomisation test; see the module docstring.

    ``explainer`` is anything with ``explain(model, images, targets) -> (B, H, W)`` maps (a
    registered explainer). Step 0 of each mode is the trained model itself (Spearman = SSIM =
    1 for a deterministic explainer). Layer ``i`` (0-based, in ``layers`` order) is always
    re-initialised with seed ``layer_seeds[i]`` (default ``seed + i``), so cascading and
    independent runs randomise each layer identically. Images are explained ``batch_size`` at
    a time (all at once when None); ``output_selector`` is passed to ``explain`` (see
    :func:`foveal.core.explainer.select_output`).
    """
    images = check_images(images, channels=None)
    for mode in modes:
        if mode not in ("cascading", "independent"):
            raise InputError(f"modes: expected 'cascading' and/or 'independent', got {mode!r}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer or None, got {batch_size}")
    names = list(layers) if layers is not None else randomisable_layers(model)
    for n in names:
        resolve_layer(model, n)
    if not names:
        raise InputError("layers: the model has no module with parameters to randomise")
    seeds = [seed + i for i in range(len(names))] if layer_seeds is None else [int(v) for v in layer_seeds]
    if len(seeds) != len(names):
        raise InputError(f"layer_seeds: expected {len(names)} seeds (one per layer), got {len(seeds)}")
    targets = _frozen_targets(model, images, targets, batch_size, output_selector)

    def explain(m: nn.Module) -> torch.Tensor:
        maps = _explain_all(explainer, m, images, targets, batch_size, output_selector)
        return maps.abs() if absolute else maps

    reference = explain(model)
    table = RandomisationTable()

    def record(mode: str, step: int, layer: str, maps: torch.Tensor) -> None:
        values = {"spearman": spearman(reference, maps), "ssim": ssim(reference.double(), maps.double())}
        table.per_image[(mode, step)] = values
        table.rows.append({"mode": mode, "step": step, "layer": layer,
                           **{k: _nanmean(v) for k, v in values.items()}})

    total = len(names) * len(modes)
    bar = tqdm(total=total, desc="randomisation", disable=(not progress) or None, leave=False)
    try:
        for mode in modes:
            record(mode, 0, "(trained)", reference)
            work = copy.deepcopy(model)  # the user's model is never touched
            for i, name in enumerate(names, start=1):
                layer = resolve_layer(work, name)
                # independent: put this layer back afterwards (a restore, not a deep copy per layer)
                saved = {k: v.clone() for k, v in layer.state_dict().items()} if mode == "independent" else None
                _randomise(layer, seeds[i - 1])
                record(mode, i, name, explain(work))
                if saved is not None:
                    layer.load_state_dict(saved)
                bar.update(1)
    finally:
        bar.close()
    return table


@dataclass
class MPRTResult:
    """One explainer's model-parameter randomisation summary (see :func:`mprt`).

    ``per_layer[name]`` is a (B, L) float64 tensor: the similarity (``"spearman"``, ``"ssim"``)
    between each image's map on the trained model and on the model after randomisation step
    ``l`` (``layers[l]`` randomised; with cascading also every layer before it).
    """

    mode: str
    layers: list[str]
    per_layer: dict[str, torch.Tensor]

    def mean(self, similarity: str = "spearman") -> torch.Tensor:
        """(B,): mean over the randomisation steps (Quantus' ``return_average_correlation``,
        which also averages in the trained model's own similarity of 1; see docs/metrics.md).
        NaN when a step's map is constant (its correlation is undefined)."""
        return self.per_layer[similarity].mean(1)

    def last(self, similarity: str = "spearman") -> torch.Tensor:
        """(B,): the similarity after the last step (Quantus' ``return_last_correlation``): with
        cascading the fully randomised model (of the chosen layers); with independent the last
        layer of ``layers`` alone (input side by default; Quantus lists independent layers input
        side first, so its "last" is the output-side layer there)."""
        return self.per_layer[similarity][:, -1]

    def summary(self) -> dict[str, float]:
        """Means over images (NaN images not counted) of the per-image mean and last values."""
        return {f"{k}_{s}": _nanmean(getattr(self, k)(s)) for s in self.per_layer for k in ("mean", "last")}

    def to_markdown(self) -> str:
        head = "| step | layer | Spearman | SSIM |\n|---|---|---|---|\n"
        return head + "".join(
            f"| {i + 1} | `{name}` | {_nanmean(self.per_layer['spearman'][:, i]):.4f} | "
            f"{_nanmean(self.per_layer['ssim'][:, i]):.4f} |\n" for i, name in enumerate(self.layers))


def mprt(
    model: nn.Module, explainer: Any, images: torch.Tensor, targets: Targets = None, *,
    mode: Literal["cascading", "independent"] = "cascading", layers: Sequence[str] | None = None,
    top_k: int | None = None, seed: int = 0, layer_seeds: Sequence[int] | None = None, absolute: bool = False,
    batch_size: int | None = None, output_selector: Any = None, progress: bool = False,
) -> MPRTResult:
    """Model Parameter Randomisation Test summary (Adebayo et al., "Sanity Checks for Saliency
    Maps", NeurIPS 2018), one result per explainer, as Quantus' ``MPRT``.

    Randomises the ``top_k`` output-side layers (all when None) of a copy of ``model`` one
    step at a time (``"cascading"``: cumulatively, Quantus' ``"top_down"``; ``"independent"``:
    one layer at a time) and compares each image's map with its map on the trained model by
    Spearman rank correlation and SSIM (:func:`model_randomisation`, which this summarises).
    Lower similarity means the explanation depends more on the learned parameters (the check
    is passed when it falls). The explained class stays the trained model's prediction.
    """
    if mode not in ("cascading", "independent"):
        raise InputError(f"mode: expected 'cascading' or 'independent', got {mode!r}")
    names = list(layers) if layers is not None else randomisable_layers(model)
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k: expected a positive number of layers, got {top_k}")
        names = names[:top_k]
    table = model_randomisation(model, explainer, images, targets, layers=names, modes=(mode,), seed=seed,
                                layer_seeds=layer_seeds, absolute=absolute, batch_size=batch_size,
                                output_selector=output_selector, progress=progress)
    per_layer = {k: torch.stack([table.per_image[(mode, i)][k] for i in range(1, len(names) + 1)], 1)
                 for k in ("spearman", "ssim")}
    return MPRTResult(mode, names, per_layer)


def mprt_table(results: dict[str, MPRTResult]) -> str:
    """A markdown table, one row per explainer: the means over images of the per-image mean
    over the randomisation steps and of the last step, for Spearman and SSIM."""
    head = ("| explainer | mode | layers | Spearman (mean of steps) | SSIM (mean of steps) | Spearman (last) | "
            "SSIM (last) |\n|---|---|---:|---:|---:|---:|---:|\n")
    rows = []
    for name, r in results.items():
        s = r.summary()
        rows.append(f"| {name} | {r.mode} | {len(r.layers)} | {s['mean_spearman']:.4f} | {s['mean_ssim']:.4f} | "
                    f"{s['last_spearman']:.4f} | {s['last_ssim']:.4f} |\n")
    return head + "".join(rows)


def plot_randomisation(table: RandomisationTable, path: str | os.PathLike, title: str = "") -> Path:
    """Save a PNG with Spearman and SSIM against the randomisation step for each mode."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    modes = sorted({r["mode"] for r in table.rows})
    for ax, metric in zip(axes, ("spearman", "ssim")):
        for mode in modes:
            rows = [r for r in table.rows if r["mode"] == mode]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=mode)
        labels = [r["layer"] for r in table.rows if r["mode"] == modes[0]] if modes else []
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title("Spearman rank correlation" if metric == "spearman" else "SSIM")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("layers randomised (output side first)")
        ax.legend()
    axes[0].set_ylabel("similarity to the trained model's map")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

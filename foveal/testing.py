"""Contract checks for component authors (bundled and third-party plugins).

Each function runs a component on inputs you choose and raises ``AssertionError`` with a message
naming the broken rule; call them from your plugin's tests. foveal's own contract tests
(``tests/test_contracts.py``) run them on every registered component.

* :func:`check_component` ``(name, *inputs, **overrides)``: build, config JSON and registry info,
  ``foveal.save``/``foveal.load`` round trip (same tensors; with ``inputs``, an ``nn.Module``
  component gives the same outputs after loading).
* :func:`check_explainer` ``(explainer, model, images, targets=None)``: maps (B, H, W) in [0, 1],
  detached, on the images' device and dtype; images and model left as found.
* :func:`check_explainer_errors` ``(explainer, model, images)``: a 3-D batch, NaN, a wrong channel
  count and out-of-range class targets raise :class:`~foveal.core.errors.InputError` naming the
  argument, and leave the model as found.
* :func:`check_metric` ``(metric, *inputs, value_range=None, **kwargs)``: per-sample values
  (B,), inputs (and a model among them) left as found, values in ``value_range``, deterministic,
  batch-independent, and the aggregate semantics (NaN samples not counted; pooled statistics).
* :func:`check_metric_errors` ``(metric, *inputs, **kwargs)``: bad inputs of the metric's family
  raise ``InputError``.
* :func:`check_model`, :func:`check_backbone`, :func:`check_decoder`, :func:`check_pooling`,
  :func:`check_refiner`: the documented output shapes, dtype and device, deterministic in eval
  mode, batch-independent, inputs and train/eval flags left as found.
* :func:`check_deterministic` ``(fn, *args)`` and :func:`check_batch_independent` ``(fn, *args)``:
  the two generic properties, for any callable.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import registry
from .core.component import KINDS
from .core.errors import InputError
from .core.metric import Metric, PooledMetric
from .core.modules import preserved_model_state
from .registry.checkpoints import load, save

__all__ = [
    "check_backbone", "check_batch_independent", "check_component", "check_decoder", "check_deterministic",
    "check_explainer", "check_explainer_errors", "check_metric", "check_metric_errors", "check_model",
    "check_pooling", "check_refiner",
]


# --- registry, config, checkpoint -------------------------------------------------------------

def check_component(name: str, *inputs: Any, **overrides: Any) -> Any:
    """Build ``name`` with ``overrides`` and check config, info and the save/load round trip.

    With ``inputs`` and an ``nn.Module`` component, the loaded copy must also give the same
    outputs as the original on ``component(*inputs)`` (``component.refine(*inputs)`` for a
    refiner), both in eval mode, without gradients.
    Returns the built component.
    """
    comp = registry.build(name, **overrides)
    entry = registry.entry(name)
    assert comp.registry_name == entry.name, f"registry_name {comp.registry_name!r} != {entry.name!r}"
    assert comp.kind in KINDS, f"kind {comp.kind!r} not in {KINDS}"
    assert isinstance(comp.config, type(comp).Config), "component.config is not its Config"
    again = type(comp).Config.model_validate_json(comp.config.model_dump_json())
    assert again == comp.config, "config does not survive a JSON round trip"
    info = registry.info(name)
    assert info["kind"] == comp.kind and "fields" in info
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.safetensors"
        save(comp, path)
        loaded = load(path)
    assert type(loaded) is type(comp), f"load() built {type(loaded).__name__}, expected {type(comp).__name__}"
    a, b = comp.state_dict(), loaded.state_dict()
    assert set(a) == set(b), f"state keys differ after load: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), f"tensor {k!r} differs after load"
    if inputs and isinstance(comp, nn.Module):
        with torch.no_grad(), preserved_model_state(comp), preserved_model_state(loaded):
            if comp.kind == "refiner":
                out, out_loaded = comp.refine(*inputs), loaded.refine(*inputs)
            else:
                out, out_loaded = comp(*inputs), loaded(*inputs)
        _assert_same(out_loaded, out, "the loaded component's output differs from the original's")
    return comp


# --- generic properties -----------------------------------------------------------------------

def check_deterministic(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` twice, after seeding torch's global generator differently, gives
    bit-identical results (NaN where NaN). Stochastic methods must draw from their own seeded
    generator, not from the global one. The global generator is restored afterwards. On a GPU,
    some kernels are nondeterministic unless ``torch.use_deterministic_algorithms(True)``."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(12345)
        first = fn(*args, **kwargs)
        torch.manual_seed(54321)
        second = fn(*args, **kwargs)
    _assert_same(second, first, "two calls on the same input differ (not deterministic)", exact=True)
    return first


def check_batch_independent(fn: Callable[..., Any], *args: Any, rtol: float | None = None,
                            atol: float | None = None, **kwargs: Any) -> Any:
    """``fn`` on a batch equals ``fn`` on each of its samples alone, concatenated.

    Tensors whose first dimension is the batch size B (the first tensor argument's), lists of
    such tensors (multi-scale features) and other lists or tuples of length B (one target per
    sample) are split per sample; ``nn.Module`` and other arguments are passed as they are. The
    outputs (a tensor or a list of tensors with B rows) are compared with
    ``torch.testing.assert_close`` (NaN equal to NaN); ``rtol``/``atol`` default to 1e-4/1e-5 in
    float32 and 1e-7/1e-9 in float64.
    """
    b = _batch_size(args)
    batched = fn(*args, **kwargs)
    singles = [fn(*_row(args, b, i), **_row(kwargs, b, i)) for i in range(b)]
    joined = (torch.cat(singles) if isinstance(batched, torch.Tensor)
              else [torch.cat([s[j] for s in singles]) for j in range(len(batched))])
    for j, (x, y) in enumerate(zip(_tensors(batched), _tensors(joined))):
        tol = _tolerance(x.dtype, rtol, atol)
        try:
            torch.testing.assert_close(x, y, equal_nan=True, **tol)
        except AssertionError as e:
            where = f" (output {j})" if not isinstance(batched, torch.Tensor) else ""
            raise AssertionError(f"a batch differs from its samples computed one by one{where}: {e}") from None
    return batched


# --- explainers -------------------------------------------------------------------------------

def check_explainer(explainer: Any, model: nn.Module, images: torch.Tensor, targets: Any = None) -> torch.Tensor:
    """Run ``explainer.explain`` once and check the contract; returns the maps.

    Maps: shape (B, H, W) of the images, their device and dtype, detached, finite, in [0, 1].
    Left as found: the images, every hook, train/eval flag, ``requires_grad`` and ``.grad`` of
    the model (put the model in train mode or give a parameter a ``.grad`` first to make the
    check bite)."""
    state = _ModelState(model)
    before = images.clone()
    maps = explainer.explain(model, images, targets)
    b, _, h, w = images.shape
    assert isinstance(maps, torch.Tensor), f"explain() returned {type(maps).__name__}, expected a tensor"
    assert maps.shape == (b, h, w), f"maps shape {tuple(maps.shape)}, expected {(b, h, w)}"
    assert maps.device == images.device, f"maps on {maps.device}, images on {images.device}"
    assert maps.dtype == images.dtype, f"maps are {maps.dtype}, images {images.dtype}"
    assert maps.is_floating_point() and not maps.requires_grad, "maps must be detached floats"
    assert bool(torch.isfinite(maps).all()), "maps contain NaN/Inf"
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0, "maps outside [0, 1]"
    assert torch.equal(images, before), "explain() modified the input images"
    state.assert_unchanged("explain()")
    return maps


def check_explainer_errors(explainer: Any, model: nn.Module, images: torch.Tensor) -> None:
    """Bad input raises :class:`InputError` whose message names the argument: a 3-D tensor, a
    NaN pixel, a wrong channel count (the model must have a fixed one), class targets ``K`` and
    ``-1`` for a model with K outputs. The model is left as found after each error."""
    state = _ModelState(model)
    with torch.no_grad(), preserved_model_state(model):
        k = model(images[:1]).shape[1]
    nan = images.clone()
    nan.view(-1)[0] = float("nan")
    c = images.shape[1]
    channels = images[:, :1] if c > 1 else images.expand(-1, 3, -1, -1)
    cases = [
        ("a 3-D tensor (no batch dimension)", "images", images[0], None),
        ("a NaN pixel", "images", nan, None),
        (f"{channels.shape[1]} channels instead of {c}", "images", channels, None),
        (f"class target {k} for a model with {k} outputs", "targets", images, k),
        ("class target -1", "targets", images, [-1] * images.shape[0]),
    ]
    for what, arg, x, targets in cases:
        _expect_input_error(lambda x=x, targets=targets: explainer.explain(model, x, targets), what, arg)
        state.assert_unchanged(f"explain() raising on {what}")


# --- metrics ----------------------------------------------------------------------------------

def check_metric(metric: Metric, *inputs: Any, value_range: tuple[float, float] | None = None,
                 batch: bool = True, **kwargs: Any) -> torch.Tensor:
    """Run ``metric.compute(*inputs, **kwargs)`` and check the metric contract; returns the values.

    ``inputs`` follow the family's signature (:class:`~foveal.core.metric.Metric`): explanation
    ``(model, images, saliency)`` (``targets=`` in ``kwargs``), localisation ``(saliency, masks)``,
    segmentation ``(predictions, masks)``. Checked: a float (B,) tensor on the inputs' device,
    no Inf, non-NaN values within ``value_range`` (when given), inputs and any model among them
    left as found, deterministic, batch-independent (with ``batch``), and :meth:`aggregate`: the
    mean over non-NaN samples (a NaN sample added changes nothing; all NaN gives NaN), or for a
    :class:`PooledMetric` the reduction of :meth:`statistics` (equal to :meth:`score`) and, with
    ``averaging="pooled"``, an ``InputError`` for per-sample values.
    """
    ref = next((a for a in inputs if isinstance(a, torch.Tensor)), None)
    assert ref is not None, "check_metric: no tensor among the inputs"
    b = ref.shape[0]
    clones = [(a, a.clone()) for a in (*inputs, *kwargs.values()) if isinstance(a, torch.Tensor)]
    states = [_ModelState(a) for a in inputs if isinstance(a, nn.Module)]
    values = metric.compute(*inputs, **kwargs)
    assert isinstance(values, torch.Tensor), f"compute() returned {type(values).__name__}, expected a tensor"
    assert values.shape == (b,), f"compute() returned shape {tuple(values.shape)}, expected ({b},)"
    assert values.is_floating_point(), f"compute() returned {values.dtype}, expected floats"
    assert values.device == ref.device, f"values on {values.device}, inputs on {ref.device}"
    assert not values.requires_grad, "values must be detached"
    assert not bool(torch.isinf(values).any()), f"values contain Inf: {values.tolist()}"
    for a, before in clones:
        assert torch.equal(a, before) or (a.is_floating_point() and torch.equal(a.isnan(), before.isnan())
                                          and torch.equal(a.nan_to_num(), before.nan_to_num())), (
            "compute() modified an input tensor")
    for state in states:
        state.assert_unchanged("compute()")
    if value_range is not None:
        lo, hi = value_range
        v = values[~values.isnan()]
        assert bool(((v >= lo) & (v <= hi)).all()), f"values outside the documented range [{lo}, {hi}]: {v.tolist()}"
    check_deterministic(metric.compute, *inputs, **kwargs)
    if batch:
        check_batch_independent(metric.compute, *inputs, **kwargs)
    _check_aggregate(metric, values, inputs)
    return values


def _check_aggregate(metric: Metric, values: torch.Tensor, inputs: Sequence[Any]) -> None:
    nan = values.new_full((1,), float("nan"))
    rel = 1e-12 if values.dtype == torch.float64 else 1e-6  # per-sample values' precision
    pooled = isinstance(metric, PooledMetric) and getattr(metric.config, "averaging", None) == "pooled"
    if pooled:
        try:
            metric.aggregate(values)
        except InputError:
            pass
        else:
            raise AssertionError("aggregate() of per-sample values must raise InputError with averaging='pooled'")
    else:
        counted = values.double()[~values.isnan()]
        expected = float(counted.mean()) if counted.numel() else float("nan")
        got = metric.aggregate(values)
        assert _close(got, expected), f"aggregate() = {got}, expected the mean over non-NaN samples {expected}"
        assert _close(metric.aggregate(torch.cat([values, nan])), expected), "aggregate() counts a NaN sample"
        assert math.isnan(metric.aggregate(nan.expand(3))), "aggregate() of all-NaN values must be NaN"
    if isinstance(metric, PooledMetric):
        stats = metric.statistics(*inputs)
        assert stats.shape == (values.shape[0], metric.n_statistics), (
            f"statistics() shape {tuple(stats.shape)}, expected ({values.shape[0]}, {metric.n_statistics})")
        agg = metric.aggregate(stats)
        assert _close(agg, metric.score(*inputs)), f"aggregate(statistics) = {agg} differs from score()"
        half = values.shape[0] // 2
        if half:  # statistics of several batches concatenate: aggregate over the parts is the whole
            parts = torch.cat([metric.statistics(*_rows(inputs, values.shape[0], slice(0, half))),
                               metric.statistics(*_rows(inputs, values.shape[0], slice(half, None)))])
            assert _close(metric.aggregate(parts), agg), "statistics of two half batches aggregate differently"
        if not pooled:
            assert _close(agg, metric.aggregate(values), rel), (
                "with per-image averaging, aggregate(statistics) must equal aggregate(per-sample values)")


def check_metric_errors(metric: Metric, *inputs: Any, **kwargs: Any) -> None:
    """Bad inputs of the metric's family raise :class:`InputError` naming the argument.

    ``inputs`` are valid inputs (as for :func:`check_metric`); each case spoils one of them.
    Explanation: 3-D images, a NaN pixel, a wrong channel count, a NaN or wrongly sized saliency,
    class targets ``K`` and ``-1``. Localisation: saliency without a batch dimension, NaN or of
    another size than the masks, masks not binary. Segmentation: the same for predictions, and
    predictions outside [0, 1] unless the config min-max normalises them (``normalize=True``).
    """
    family = metric.family

    def nan_of(t: torch.Tensor) -> torch.Tensor:
        t = t.clone().float() if not t.is_floating_point() else t.clone()
        t.view(-1)[0] = float("nan")
        return t

    cases: list[tuple[str, str, tuple, dict]] = []
    if family == "explanation":
        model, images, saliency = inputs[:3]
        with torch.no_grad(), preserved_model_state(model):
            k = model(images[:1]).shape[1]
        c = images.shape[1]
        channels = images[:, :1] if c > 1 else images.expand(-1, 3, -1, -1)
        cases = [
            ("3-D images", "images", (model, images[0], saliency), kwargs),
            ("a NaN pixel", "images", (model, nan_of(images), saliency), kwargs),
            (f"{channels.shape[1]} image channels instead of {c}", "images", (model, channels, saliency), kwargs),
            ("a NaN saliency value", "saliency", (model, images, nan_of(saliency)), kwargs),
            ("saliency of another size", "saliency", (model, images, saliency[..., :-1]), kwargs),
            (f"class target {k} for a model with {k} outputs", "targets", (model, images, saliency),
             {**kwargs, "targets": k}),
            ("class target -1", "targets", (model, images, saliency), {**kwargs, "targets": [-1] * images.shape[0]}),
        ]
    elif family in ("localisation", "segmentation"):
        first, masks = inputs[:2]
        arg = "saliency" if family == "localisation" else "predictions"
        bad_masks = masks.float() * 2
        cases = [
            (f"{arg} without a batch dimension", arg, (first[0], masks), kwargs),
            (f"a NaN in {arg}", arg, (nan_of(first), masks), kwargs),
            (f"{arg} of another size than the masks", arg, (first[..., :-1], masks), kwargs),
            ("masks with values other than 0 and 1", "mask", (first, bad_masks), kwargs),
        ]
        if family == "segmentation" and not getattr(metric.config, "normalize", False) and first.is_floating_point():
            cases.append(("predictions outside [0, 1] (logits)", arg, (first * 4 - 2, masks), kwargs))
    else:
        raise AssertionError(f"check_metric_errors: unknown metric family {family!r}")
    states = [_ModelState(a) for a in inputs if isinstance(a, nn.Module)]
    for what, arg, args, kw in cases:
        _expect_input_error(lambda args=args, kw=kw: metric.compute(*args, **kw), what, arg)
        for state in states:
            state.assert_unchanged(f"compute() raising on {what}")


# --- networks ---------------------------------------------------------------------------------

def check_model(model: nn.Module, images: torch.Tensor, *, batch: bool = True) -> torch.Tensor:
    """``model(images)`` in eval mode: ``task="segmentation"`` gives logits (B, K, H, W) at the
    input size, ``"classification"`` (B, K), with K the config's ``num_classes`` when it has one;
    the images' dtype and device, finite; deterministic; batch-independent (with ``batch``);
    images and train/eval flags left as found. Returns the output."""
    out = _run_module(model, model, images, batch=batch)
    b, _, h, w = images.shape
    task = getattr(model, "task", "")
    k = getattr(getattr(model, "config", None), "num_classes", None)
    assert isinstance(out, torch.Tensor), f"forward returned {type(out).__name__}, expected a tensor"
    if task == "segmentation":
        assert out.dim() == 4 and out.shape[0] == b and out.shape[2:] == (h, w), (
            f"segmentation logits {tuple(out.shape)}, expected (B, K, {h}, {w}) with B={b}")
    elif task == "classification":
        assert out.dim() == 2 and out.shape[0] == b, f"classification logits {tuple(out.shape)}, expected ({b}, K)"
    else:
        raise AssertionError(f"{type(model).__name__}.task is {task!r}, expected 'segmentation' or 'classification'")
    if k is not None:
        assert out.shape[1] == k, f"{out.shape[1]} output channels, config.num_classes = {k}"
    _check_tensor(out, images, "logits")
    return out


def check_backbone(backbone: nn.Module, images: torch.Tensor, *, batch: bool = True) -> list[torch.Tensor]:
    """``backbone(images)``: ``len(channels)`` maps, the i-th (B, channels[i], ceil(H / strides[i]),
    ceil(W / strides[i])), ordered from high to low resolution, the images' dtype and device;
    deterministic, batch-independent, images and flags left as found."""
    feats = _run_module(backbone, backbone, images, batch=batch)
    channels, strides = list(backbone.channels), list(backbone.strides)
    assert isinstance(feats, (list, tuple)), f"forward returned {type(feats).__name__}, expected a list"
    assert len(feats) == len(channels) == len(strides), (
        f"{len(feats)} feature maps for {len(channels)} channels and {len(strides)} strides")
    assert strides == sorted(strides), f"strides {strides} are not ordered from high to low resolution"
    b, _, h, w = images.shape
    for i, (f, c, s) in enumerate(zip(feats, channels, strides)):
        expected = (b, c, -(-h // s), -(-w // s))
        assert tuple(f.shape) == expected, f"feature {i}: shape {tuple(f.shape)}, expected {expected}"
        _check_tensor(f, images, f"feature {i}")
    return list(feats)


def check_decoder(decoder: nn.Module, features: list[torch.Tensor], image_size: tuple[int, int], *,
                  batch: bool = True) -> torch.Tensor:
    """``decoder(features, image_size)``: logits (B, num_classes, *image_size) (``num_classes``
    from the config when it has one), the features' dtype and device; ``forward_all`` starts with
    the same logits; deterministic, batch-independent, features and flags left as found."""
    out = _run_module(decoder, lambda f: decoder(f, image_size), features, batch=batch)
    b = features[0].shape[0]
    k = getattr(getattr(decoder, "config", None), "num_classes", None)
    assert out.dim() == 4 and out.shape[0] == b and tuple(out.shape[2:]) == tuple(image_size), (
        f"decoder output {tuple(out.shape)}, expected (B={b}, K, *{tuple(image_size)})")
    if k is not None:
        assert out.shape[1] == k, f"{out.shape[1]} output channels, config.num_classes = {k}"
    _check_tensor(out, features[0], "logits")
    with torch.no_grad(), preserved_model_state(decoder):
        first = decoder.forward_all(features, image_size)[0]
    _assert_same(first, out, "forward_all()[0] differs from forward()")
    return out


def check_pooling(pooling: nn.Module, features: torch.Tensor | list[torch.Tensor], *,
                  batch: bool = True) -> torch.Tensor:
    """``pooling(features)`` (a (B, C, h, w) map, or the list of stage maps for ``multi_stage``
    poolings): (B, out_features), the features' dtype and device; ``last_attention`` is None or
    (B, h, w) on the last map's grid; deterministic, batch-independent, features left as found."""
    out = _run_module(pooling, pooling, features, batch=batch)
    last = features[-1] if isinstance(features, (list, tuple)) else features
    b = last.shape[0]
    assert tuple(out.shape) == (b, pooling.out_features), (
        f"pooled shape {tuple(out.shape)}, expected ({b}, out_features={pooling.out_features})")
    _check_tensor(out, last, "pooled vector")
    att = pooling.last_attention
    if att is not None:
        assert tuple(att.shape) == (b, *last.shape[-2:]), (
            f"last_attention {tuple(att.shape)}, expected (B, h, w) = {(b, *last.shape[-2:])}")
    return out


def check_refiner(refiner: nn.Module, images: torch.Tensor, seeds: torch.Tensor, *,
                  batch: bool = True) -> torch.Tensor:
    """``refiner.refine(images, seeds)`` with seeds (B, K, H, W) or (B, H, W): class
    probabilities (B, K + 1, H, W) (channel 0 = background) in [0, 1], summing to 1 over the
    classes wherever any is positive, the images' dtype and device; deterministic,
    batch-independent, inputs and flags left as found."""
    out = _run_module(refiner, refiner.refine, images, seeds, batch=batch)
    b, _, h, w = images.shape
    k = 1 if seeds.dim() == 3 else seeds.shape[1]
    assert tuple(out.shape) == (b, k + 1, h, w), f"refined shape {tuple(out.shape)}, expected {(b, k + 1, h, w)}"
    _check_tensor(out, images, "refined probabilities")
    assert float(out.min()) >= 0 and float(out.max()) <= 1 + 1e-6, "refined probabilities outside [0, 1]"
    total = out.sum(1)
    ok = (total - 1).abs() <= 1e-4
    assert bool((ok | (total == 0)).all()), "refined probabilities do not sum to 1 over the classes"
    return out


# --- helpers ----------------------------------------------------------------------------------

def _run_module(module: nn.Module, fn: Callable[..., Any], *args: Any, batch: bool) -> Any:
    """Call ``fn(*args)`` on ``module`` in eval mode without gradients; inputs and the module's
    flags/hooks/gradients must be unchanged; deterministic; batch-independent."""
    state = _ModelState(module)
    clones = [_clone(a) for a in args]

    def call(*a: Any) -> Any:
        with torch.no_grad(), preserved_model_state(module):
            return fn(*a)

    if batch:
        check_batch_independent(call, *args)
    out = check_deterministic(call, *args)  # last: state such as last_attention is the full batch's
    for a, before in zip(args, clones):
        _assert_same(a, before, "the call modified its input", exact=True)
    state.assert_unchanged(type(module).__name__)
    return out


def _check_tensor(t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    assert t.device == like.device, f"{what} on {t.device}, inputs on {like.device}"
    assert t.dtype == like.dtype, f"{what} are {t.dtype}, inputs {like.dtype}"
    assert bool(torch.isfinite(t).all()), f"{what} contain NaN/Inf"


class _ModelState:
    """Hooks, train/eval flags, ``requires_grad`` and ``.grad`` of a module, to compare later."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks = _hook_count(model)
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.requires = {n: p.requires_grad for n, p in model.named_parameters()}
        self.grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}

    def assert_unchanged(self, what: str) -> None:
        m = self.model
        assert _hook_count(m) == self.hooks, f"{what} left hooks on the model"
        assert {n: x.training for n, x in m.named_modules()} == self.modes, f"{what} changed train/eval flags"
        assert {n: p.requires_grad for n, p in m.named_parameters()} == self.requires, f"{what} changed requires_grad"
        for n, p in m.named_parameters():
            g0 = self.grads[n]
            assert (p.grad is None) == (g0 is None) and (g0 is None or torch.equal(p.grad, g0)), (
                f"{what} changed the .grad of parameter {n!r}")


def _hook_count(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_full_backward_hooks",
                     "_full_backward_pre_hooks"):
            total += len(getattr(m, attr, {}) or {})
    total += sum(len(getattr(p, "_backward_hooks", None) or {}) for p in model.parameters())
    return total


def _expect_input_error(call: Callable[[], Any], what: str, arg: str) -> None:
    try:
        call()
    except InputError as e:
        assert arg in str(e), f"the InputError for {what} does not name {arg!r}: {e}"
    except Exception as e:
        raise AssertionError(f"{what}: expected InputError naming {arg!r}, got {type(e).__name__}: {e}") from e
    else:
        raise AssertionError(f"{what}: expected InputError naming {arg!r}, nothing was raised")


def _batch_size(args: Sequence[Any]) -> int:
    """B of the first tensor argument, or of the first tensor in a list argument (features)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.shape[0]
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor) and a[0].dim() > 0:
            return a[0].shape[0]
    raise AssertionError("no batched tensor among the arguments")


def _row(args: Any, b: int, i: int) -> Any:
    return _rows(args, b, slice(i, i + 1))


def _rows(args: Any, b: int, index: slice) -> Any:
    def cut(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == b:
            return a[index]
        if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in a):
            return type(a)(cut(x) for x in a)  # a feature list (multi-scale maps of one batch)
        if isinstance(a, (list, tuple)) and len(a) == b:
            return type(a)(a[index])  # one target per sample
        return a

    if isinstance(args, dict):
        return {k: cut(v) for k, v in args.items()}
    return tuple(cut(a) for a in args)


def _tensors(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _clone(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (list, tuple)):
        return type(a)(_clone(x) for x in a)
    return a


def _tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> dict[str, float]:
    r, a = (1e-7, 1e-9) if dtype == torch.float64 else (1e-4, 1e-5)
    return {"rtol": r if rtol is None else rtol, "atol": a if atol is None else atol}


def _assert_same(got: Any, expected: Any, message: str, *, exact: bool = False) -> None:
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), message
        for g, e in zip(got, expected):
            _assert_same(g, e, message, exact=exact)
        return
    if not isinstance(expected, torch.Tensor):
        assert got == expected or (_is_nan(got) and _is_nan(expected)), f"{message}: {got} != {expected}"
        return
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape, message
    if exact:
        same = torch.equal(got, expected) or (got.is_floating_point() and torch.equal(got.isnan(), expected.isnan())
                                              and torch.equal(got.nan_to_num(), expected.nan_to_num()))
        assert same, f"{message} (max difference {_max_diff(got, expected)})"
    else:
        try:
            torch.testing.assert_close(got, expected, equal_nan=True, **_tolerance(expected.dtype, None, None))
        except AssertionError as e:
            raise AssertionError(f"{message}: {e}") from None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return float((a != b).sum())
    return float((a - b).abs().nan_to_num(float("inf")).max()) if a.numel() else 0.0


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)

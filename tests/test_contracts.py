"""Contract tests: every registered component, parametrized over ``registry.names(kind=...)``.

Each test runs one of the :mod:`foveal.testing` checks (the ones plugin authors use) on one
registered name. What a name runs on is derived from its class, so that a new method needs no
entry here:

* explainers: ``CAMBase`` subclasses explain a tiny timm CNN at its last stage, ``ViTExplainer``
  subclasses a tiny ViT, any other explainer the tiny CNN;
* metrics: their family gives the ``compute`` signature (explanation: the tiny CNN, images,
  saliency; localisation: saliency, masks; segmentation: predictions, masks); values in [0, 1];
* backbones, models, decoders, poolings, refiners: their interface gives the inputs (image
  batches, features of the widths in the config, seeds);
* every component: a config field ``progress`` is switched off.

:data:`CASES` holds the exceptions, one :class:`Case` per name (as captum's test config): another
model, options for a fast or tiny build, a documented value range, or a strict xfail of one
contract with the reason. A failing default says which entry to add.
"""

from __future__ import annotations

import ast
import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from foveal import registry
from foveal.core import (
    Backbone,
    ComponentConfig,
    Decoder,
    Explainer,
    Metric,
    Model,
    Pooling,
    Refiner,
    preserved_model_state,
    target_scores,
)
from foveal.explainers.cam import CAMBase
from foveal.explainers.relevance import ViTExplainer
from foveal.testing import (
    check_backbone,
    check_batch_independent,
    check_component,
    check_decoder,
    check_deterministic,
    check_explainer,
    check_explainer_errors,
    check_metric,
    check_metric_errors,
    check_model,
    check_pooling,
    check_refiner,
)

ROOT = Path(__file__).resolve().parents[1]


# --- the options table ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """What one registered name needs beyond the defaults derived from its class."""

    #: config overrides used by every contract (tiny widths, fewer steps); the default config
    #: itself is built and round-tripped by ``test_default_config_round_trips``
    options: dict[str, Any] = field(default_factory=dict)
    #: explainers and explanation metrics: the key of :data:`MODELS` to run on
    model: str | None = None
    #: metrics: the documented range of per-sample values (default config)
    value_range: tuple[float, float] | None = None
    #: networks: ``component -> inputs`` when the interface alone does not say (see ``inputs_for``)
    inputs: Callable[[Any], tuple] | None = None
    #: the default config takes seconds to build: its round trip is marked heavy
    heavy_default: bool = False
    #: contract name -> reason: a known violation, marked ``xfail(strict=True)``
    xfail: dict[str, str] = field(default_factory=dict)


TINY_AFFINITYNET = {"backbone_options": {"model_name": "test_resnet"}, "levels": [1, 2], "level_channels": [8, 8],
                    "feature_dim": 8, "steps": 4}
TINY_CLASSIFIER = {"model_name": "test_resnet", "num_classes": 3}
PVT_B0 = {"backbone": "pvt-v2-b0", "width": 16}

CASES: dict[str, Case] = {
    # explainers
    # the last stage of a GAP network has an input-independent gradient: the noise would change nothing
    "smoothgrad-cam++": Case(options={"n_samples": 2, "target_layer": "layer3"}),
    # at the last stage of a GAP network the drop of channel k is W_ck mean(A^k); for this random
    # net and the contract's targets ReLU(sum_k W_ck mean(A^k) A^k) is all zero (a correct map)
    "ablation-cam": Case(options={"target_layer": "layer3"}),
    "ca-attention": Case(model="ca-classifier"),
    # metrics: the documented range where it is not [0, 1]; fewer steps for insertion/deletion
    "average-drop": Case(value_range=(0, 100)),
    "average-increase": Case(value_range=(0, 100)),
    "average-gain": Case(value_range=(0, 100)),
    "percentage-in": Case(value_range=(0, 100)),
    "perturbation-auc": Case(value_range=(0, 0.9)),
    "insertion": Case(options={"steps": 8}),
    "deletion": Case(options={"steps": 8}),
    # networks: tiny builds; default configs of the large ones are heavy
    "timm-backbone": Case(options={"model_name": "test_resnet"}),
    "rta-former-t": Case(options={"width": 16}),
    "rta-former-s": Case(options=PVT_B0),
    "rta-former-m": Case(options=PVT_B0, heavy_default=True),
    "rta-former-l": Case(options=PVT_B0, heavy_default=True),
    "rta-former-decoder": Case(options={"channels": [16, 32, 64, 128], "width": 16}),
    "gap": Case(options={"in_channels": 16}),
    "ca-stream": Case(options={"backbone": None, "channels": [8, 16, 32]}),
    "gap-classifier": Case(options=TINY_CLASSIFIER),
    "ca-stream-classifier": Case(options=TINY_CLASSIFIER),
    "affinitynet": Case(options=TINY_AFFINITYNET, heavy_default=True),
}


@dataclass(frozen=True)
class TinyModel:
    make: Callable[[], nn.Module]
    size: int  # input height = width
    last_stage: str | None  # the CAM target layer (last convolutional stage)


MODELS: dict[str, TinyModel] = {
    "cnn": TinyModel(lambda: timm.create_model("test_resnet", num_classes=3), 64, "layer4"),
    "vit": TinyModel(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                               num_classes=3), 32, None),
    "ca-classifier": TinyModel(lambda: registry.build("ca-stream-classifier", **TINY_CLASSIFIER), 64, "net.layer4"),
    "segmenter": TinyModel(lambda: registry.build("rta-former-t", width=16), 64, None),  # logits (B, 1, H, W)
}


def cls_of(name: str) -> type:
    return registry.entry(name).cls


def model_key(name: str) -> str:
    """The model an explainer (or explanation metric) runs on: the table's, else by class."""
    case = CASES.get(name, Case())
    if case.model:
        return case.model
    return "vit" if issubclass(cls_of(name), ViTExplainer) else "cnn"


def options(name: str) -> dict[str, Any]:
    """Config overrides: derived from the class, then the table's."""
    cls = cls_of(name)
    derived: dict[str, Any] = {}
    if "progress" in cls.Config.model_fields:
        derived["progress"] = False
    if issubclass(cls, CAMBase) and MODELS[model_key(name)].last_stage:
        derived["target_layer"] = MODELS[model_key(name)].last_stage
    return {**derived, **CASES.get(name, Case()).options}


def derivation(name: str) -> str:
    cls = cls_of(name)
    kind = registry.entry(name).kind
    if kind == "explainer":
        return f"{cls.__name__} explains the {model_key(name)!r} model with options {options(name)}"
    if kind == "metric":
        value_range = CASES.get(name, Case()).value_range or (0, 1)
        return f"{cls.__name__} (family {cls.family!r}) runs with options {options(name)}, values in {value_range}"
    return f"{cls.__name__} ({kind}) is built with options {options(name)}"


def hint(name: str, contract: str) -> str:
    kind = registry.entry(name).kind
    fields = {"explainer": f"model={' | '.join(map(repr, MODELS))}, options={{...}}",
              "metric": "value_range=(lo, hi), options={...}"}.get(kind, "options={...}, inputs=lambda comp: (...)")
    return (f"\n{name}: {derivation(name)} (defaults derived from its class). If it needs something else, add "
            f"CASES[{name!r}] = Case({fields}) in tests/test_contracts.py; if it breaks the {contract!r} contract "
            f"knowingly, add xfail={{{contract!r}: 'reason'}} there and report it.")


def run(name: str, contract: str, fn: Callable[[], Any]) -> Any:
    """Run a contract; failures carry the hint on which table entry to add."""
    try:
        return fn()
    except Exception as e:  # AssertionError included: the contract or the derived defaults broke
        raise AssertionError(f"{type(e).__name__}: {e}{hint(name, contract)}") from e


def params(kind: str | None, contract: str, *, only: Callable[[str], bool] = lambda n: True) -> list:
    """``registry.names(kind)`` as pytest params, with the table's strict xfails."""
    out = []
    for name in registry.names(kind):
        if not only(name):
            continue
        reason = CASES.get(name, Case()).xfail.get(contract)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- shared fixtures --------------------------------------------------------------------------

class Zoo:
    """The test models, built once per module, in float32 and float64."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, torch.dtype], nn.Module] = {}

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        if (key, dtype) not in self._models:
            if dtype == torch.float32:
                torch.manual_seed(0)
                self._models[key, dtype] = MODELS[key].make().eval()
            else:
                self._models[key, dtype] = copy.deepcopy(self.get(key)).to(dtype)
        return self._models[key, dtype]

    def targets(self, key: str, batch: int) -> list[int]:
        """Different class targets for the images, within the model's K outputs."""
        size = MODELS[key].size
        with torch.no_grad():
            k = self.get(key)(torch.zeros(1, 3, size, size)).shape[1]
        return [(0, 2, 1)[i % 3] % k for i in range(batch)]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="module")
def built() -> dict:
    """Components built once with their options and reused by the contracts of a name."""
    return {}


def build(built: dict, name: str) -> Any:
    if name not in built:
        torch.manual_seed(0)
        built[name] = run(name, "build", lambda: registry.build(name, **options(name)))
    return built[name]


class DisturbedState:
    """The model in a state an explainer must not touch: train mode (mixed), a frozen parameter,
    a parameter with a ``.grad``. Restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        params = list(self.model.parameters())
        self.model.train()
        next(iter(self.model.children())).eval()  # mixed flags
        params[0].requires_grad_(False)
        params[-1].grad = torch.ones_like(params[-1])
        return self.model

    def __exit__(self, *exc: Any) -> None:
        params = list(self.model.parameters())
        self.model.eval()
        params[0].requires_grad_(True)
        params[-1].grad = None


# --- every component: config, checkpoint, documentation -------------------------------------

@pytest.mark.parametrize("name", params(None, "round-trip"))
def test_round_trip_with_equal_outputs(name, built):
    """Build, config JSON, registry info, save/load; networks give the same outputs after load."""
    inputs = run(name, "round-trip", lambda: inputs_for(name, build(built, name))) if is_network(name) else ()
    run(name, "round-trip", lambda: check_component(name, *inputs, **options(name)))


def default_params() -> list:
    out = []
    for name in registry.names():
        case = CASES.get(name, Case())
        if not options(name):
            continue  # built with its defaults by the other contracts already
        marks = [pytest.mark.heavy] if case.heavy_default else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", default_params())
def test_default_config_round_trips(name):
    """The registered defaults build and round-trip too (contracts above use tiny options)."""
    check_component(name)


@pytest.mark.parametrize("name", params(None, "documented"))
def test_documented(name):
    """A docstring, and a description for every config field (``foveal info`` shows them)."""
    cls = cls_of(name)
    assert registry.info(name)["doc"], f"{name}: {cls.__name__} has no docstring"
    missing = [f for f, info in cls.Config.model_fields.items() if not info.description]
    assert not missing, f"{name}: config fields without Field(description=...): {missing}"


def test_table_names_are_registered():
    stale = sorted(set(CASES) - set(registry.names()))
    assert not stale, f"CASES has entries for unregistered names: {stale}"


# --- explainers -------------------------------------------------------------------------------

def explainer_setup(name: str, zoo: Zoo, built: dict, batch: int = 2, dtype=torch.float32):
    key = model_key(name)
    model = zoo.get(key, dtype)
    x = rand(batch, 3, MODELS[key].size, MODELS[key].size, dtype=dtype)
    return build(built, name), model, x, zoo.targets(key, batch)


@pytest.mark.parametrize("name", params("explainer", "explain"))
def test_explainer_contract(name, zoo, built):
    """Maps (B, H, W) in [0, 1] of the images' dtype/device, not all constant; images and the
    model (train mode, a frozen parameter, an existing .grad) left as found."""
    e, model, x, targets = explainer_setup(name, zoo, built)
    with DisturbedState(model):
        maps = run(name, "explain", lambda: check_explainer(e, model, x, targets))
    assert float(maps.flatten(1).amax(1).max()) == 1.0, f"{name}: every map is constant (all zero)"


@pytest.mark.parametrize("name", params("explainer", "deterministic"))
def test_explainer_deterministic(name, zoo, built):
    """The same input twice gives the same maps, whatever the global random state; a ``seed``
    option is used (two seeds give different raw maps: tiny normalised maps may coincide)."""
    e, model, x, targets = explainer_setup(name, zoo, built)
    run(name, "deterministic", lambda: check_deterministic(e.explain, model, x, targets))
    if "seed" in type(e).Config.model_fields:
        raw = []
        for seed in (1, 2):
            with preserved_model_state(model) as hooks:
                raw.append(registry.build(name, **{**options(name), "seed": seed}).attribute(model, x, targets, hooks))
        assert not torch.equal(*raw), f"{name}: seed=1 and seed=2 give the same raw maps (the seed is unused)"


@pytest.mark.parametrize("name", params("explainer", "batch"))
def test_explainer_batch_independent(name, zoo, built):
    """A batch equals its images explained one by one (float64, so float noise cannot hide a
    cross-image dependency, and the maps keep the float64 dtype)."""
    e, model, x, targets = explainer_setup(name, zoo, built, batch=3, dtype=torch.float64)
    run(name, "batch", lambda: check_batch_independent(
        lambda m, x, t: check_explainer(e, m, x, t), model, x, targets))


@pytest.mark.parametrize("name", params("explainer", "errors"))
def test_explainer_input_errors(name, zoo, built):
    """3-D input, NaN, a wrong channel count and out-of-range targets raise InputError."""
    e, model, x, _ = explainer_setup(name, zoo, built)
    run(name, "errors", lambda: check_explainer_errors(e, model, x))


def test_lrp_on_a_resnet(zoo, built):
    """ResNet blocks add the shortcut in place (``out += shortcut``): lrp traces it out of place."""
    e, model, x, targets = explainer_setup("lrp", zoo, built)
    check_explainer(e, zoo.get("cnn"), rand(2, 3, 64, 64), targets)


# --- metrics ----------------------------------------------------------------------------------

def metric_inputs(name: str, metric: Metric, zoo: Zoo) -> tuple[tuple, dict]:
    """Valid inputs of the metric's family: 3 samples, the last one with an empty mask (a sample
    some metrics do not count)."""
    b, h = 3, 16
    g = torch.Generator().manual_seed(1)
    saliency = torch.rand(b, h, h, generator=g)
    masks = torch.zeros(b, h, h, dtype=torch.bool)
    masks[0, 2:9, 3:12] = True
    masks[1, 8:16, 0:6] = True
    if metric.family == "explanation":
        return (zoo.get(model_key(name)), rand(b, 3, h, h, seed=2), saliency), {}
    if metric.family == "localisation":
        return (saliency, masks), {}
    if metric.family == "segmentation":
        predictions = torch.rand(b, h, h, generator=g)
        predictions[2] = 0.1  # empty prediction on an empty mask
        return (predictions, masks), {}
    raise AssertionError(f"{name}: unknown metric family {metric.family!r}; teach metric_inputs() its signature")


@pytest.mark.parametrize("name", params("metric", "compute"))
def test_metric_contract(name, zoo, built):
    """(B,) values in the documented range, inputs and model (train mode, a frozen parameter, an
    existing .grad) left as found, deterministic, batch-independent, aggregate = mean over
    counted samples (or the pooled statistics)."""
    m = build(built, name)
    args, kwargs = run(name, "compute", lambda: metric_inputs(name, m, zoo))
    value_range = CASES.get(name, Case()).value_range or (0.0, 1.0)
    model = next((a for a in args if isinstance(a, nn.Module)), None)
    with DisturbedState(model) if model is not None else contextlib.nullcontext():
        run(name, "compute", lambda: check_metric(m, *args, value_range=value_range, **kwargs))


@pytest.mark.parametrize("name", params("metric", "errors"))
def test_metric_input_errors(name, zoo, built):
    m = build(built, name)
    args, kwargs = run(name, "errors", lambda: metric_inputs(name, m, zoo))
    run(name, "errors", lambda: check_metric_errors(m, *args, **kwargs))


# --- networks ---------------------------------------------------------------------------------

NETWORKS = (Backbone, Decoder, Pooling, Model, Refiner)


def is_network(name: str) -> bool:
    return issubclass(cls_of(name), NETWORKS)


def inputs_for(name: str, comp: Any) -> tuple:
    """Tiny inputs from the component's interface (the table's ``inputs`` first):
    backbones, models, refiners: a 2 x 3 x 64 x 64 batch (refiners also 2 seed maps);
    decoders: features of ``config.channels`` at strides 4, 8, 16, ... of 64 x 64 images;
    poolings: (2, ``config.in_channels``, 4, 4), or for multi-stage ones maps of
    ``config.channels`` halving from 16 x 16."""
    case = CASES.get(name, Case())
    if case.inputs is not None:
        return case.inputs(comp)
    images = rand(2, 3, 64, 64, seed=3)
    cfg = comp.config
    if isinstance(comp, (Backbone, Model)):
        return (images,)
    if isinstance(comp, Refiner):
        return (images, torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(4)))
    if isinstance(comp, Decoder) and hasattr(cfg, "channels"):
        return ([rand(2, c, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2), seed=i) for i, c in enumerate(cfg.channels)],
                (64, 64))
    if isinstance(comp, Pooling) and comp.multi_stage and getattr(cfg, "channels", None):
        return ([rand(2, c, 16 // 2**i, 16 // 2**i, seed=i) for i, c in enumerate(cfg.channels)],)
    if isinstance(comp, Pooling) and hasattr(cfg, "in_channels"):
        return (rand(2, cfg.in_channels, 4, 4),)
    raise AssertionError(f"{name}: cannot derive inputs of {type(comp).__name__} from its interface")


CHECKS = {Backbone: check_backbone, Model: check_model, Pooling: check_pooling, Refiner: check_refiner}


@pytest.mark.parametrize("name", params(None, "forward", only=is_network))
def test_network_forward(name, built):
    """The documented output shapes, dtype and device; deterministic in eval mode; a batch equals
    its samples one by one; inputs and train/eval flags left as found."""
    comp = build(built, name)
    args = run(name, "forward", lambda: inputs_for(name, comp))
    if isinstance(comp, Decoder):
        run(name, "forward", lambda: check_decoder(comp, *args))
        return
    check = next(c for base, c in CHECKS.items() if isinstance(comp, base))
    run(name, "forward", lambda: check(comp, *args))


# --- architecture -----------------------------------------------------------------------------

def foveal_modules() -> dict[str, Path]:
    pkg = ROOT / "foveal"
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """foveal modules ``module`` imports anywhere in its source (function-level imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m == "foveal" or m.startswith("foveal.")}


def test_core_imports_nothing_from_registry_or_plugins():
    """``foveal.core`` does not reach ``foveal.registry`` or ``foveal.plugins``, directly or
    through other foveal modules (the import graph from every core module)."""
    modules = foveal_modules()
    graph = {m: {i for i in imports_of(m, p) if i in modules} for m, p in modules.items()}
    for start in (m for m in modules if m == "foveal.core" or m.startswith("foveal.core.")):
        seen, stack, parent = {start}, [start], {}
        while stack:
            m = stack.pop()
            for nxt in graph[m]:
                if nxt.startswith(("foveal.registry", "foveal.plugins")) or nxt == "foveal":
                    chain = [nxt, m]
                    while chain[-1] in parent:
                        chain.append(parent[chain[-1]])
                    raise AssertionError(f"foveal.core imports {nxt}: {' <- '.join(chain)}")
                if nxt not in seen:
                    seen.add(nxt)
                    parent[nxt] = m
                    stack.append(nxt)


def test_only_plugins_register_components():
    """No module under foveal/ but foveal/plugins/ registers components: no ``register("name",
    ...)`` call and no ``@hookimpl`` function (the registry's own ``register`` closure and
    pluggy's ``PluginManager.register(plugin)`` take no name string)."""
    offenders = []
    for module, path in foveal_modules().items():
        if module.startswith("foveal.plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                named = bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value,
                                                                                                   str)
                if fname == "register" and (isinstance(f, ast.Name) or named):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} calls register(")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    if (isinstance(d, ast.Name) and d.id == "hookimpl") or (
                            isinstance(d, ast.Attribute) and d.attr == "hookimpl"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} defines a @hookimpl")
    assert not offenders, "register components only in foveal/plugins/<family>.py:\n" + "\n".join(offenders)


def test_bundled_plugins_hold_only_registration():
    """Each bundled plugin module is imports, a docstring and one ``register_components`` hook
    whose body only calls ``register`` (loops over variants allowed); algorithms live elsewhere."""
    from foveal.plugins import BUNDLED

    on_disk = {m for m in foveal_modules() if m.startswith("foveal.plugins.")}
    assert set(BUNDLED) == on_disk, f"BUNDLED {sorted(BUNDLED)} differs from the modules {sorted(on_disk)}"
    for module in BUNDLED:
        path = foveal_modules()[module]
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                    isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                continue
            assert isinstance(node, ast.FunctionDef) and node.name == "register_components", (
                f"{path.relative_to(ROOT)}:{node.lineno}: only imports and the register_components hook belong here")
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
            loops = ("range", "enumerate", "sorted", "zip", "items", "keys", "values")  # over variants
            others = [ast.unparse(c.func) for c in calls
                      if not (isinstance(c.func, ast.Name) and c.func.id in ("register", *loops)
                              or isinstance(c.func, ast.Attribute) and c.func.attr in loops)]
            assert not others, f"{path.relative_to(ROOT)}: the hook calls {others}, expected only register(...)"


# --- the checks catch what they claim: foveal.testing on deliberately broken components ------

class Saliency(Explainer):
    """|d score / d x| summed over channels; each subclass below breaks one rule."""

    class Config(ComponentConfig):
        pass

    def attribute(self, model, images, targets, hooks):
        x = images.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(target_scores(model(x), targets).sum(), x)
        return g.abs().sum(1)


class CentredOnTheBatch(Saliency):
    def attribute(self, model, images, targets, hooks):
        raw = super().attribute(model, images, targets, hooks)
        return raw - raw.mean(0)  # depends on the other images


class LeavesAHook(Saliency):
    def attribute(self, model, images, targets, hooks):
        model.register_forward_hook(lambda *a: None)  # not appended to hooks
        return super().attribute(model, images, targets, hooks)


class GlobalNoise(Saliency):
    def attribute(self, model, images, targets, hooks):
        return super().attribute(model, images, targets, hooks) + torch.rand(images.shape[0], *images.shape[2:])


class NoChannelCheck(Saliency):
    def check_input(self, model, images):
        pass  # the convolution's RuntimeError escapes


class Hits(Metric):
    """1 where the map's maximum lies in the mask, NaN for an empty mask (correct)."""

    family = "localisation"

    class Config(ComponentConfig):
        pass

    def compute(self, saliency, masks):
        hit = saliency.flatten(1).argmax(1)
        v = masks.flatten(1).gather(1, hit[:, None])[:, 0].to(saliency.dtype)
        return torch.where(masks.flatten(1).any(1), v, float("nan"))


class NaNCounted(Hits):
    def aggregate(self, per_sample):
        return float(per_sample.nan_to_num(0).mean())  # counts a NaN sample as a miss


class ModifiesItsInput(Hits):
    def compute(self, saliency, masks):
        saliency[:, 0, 0] = 0  # in place
        return super().compute(saliency, masks)


class BatchMeanPooling(Pooling):
    class Config(ComponentConfig):
        in_channels: int = 4

    @property
    def out_features(self):
        return self.config.in_channels

    def forward(self, features):
        return features.mean((2, 3)) - features.mean()  # the batch mean leaks into every row


@pytest.mark.parametrize(("explainer", "check", "message"), [
    (CentredOnTheBatch(), "batch", "one by one"),
    (LeavesAHook(), "explain", "left hooks"),
    (GlobalNoise(), "deterministic", "not deterministic"),
    (NoChannelCheck(), "errors", "expected InputError naming 'images', got RuntimeError"),
])
def test_explainer_checks_catch_broken_explainers(explainer, check, message, zoo):
    model = zoo.get("cnn")
    x = rand(2, 3, 64, 64)
    call = {
        "batch": lambda: check_batch_independent(lambda m, x, t: check_explainer(explainer, m, x, t), model, x, [0, 1]),
        "explain": lambda: check_explainer(explainer, model, x, [0, 1]),
        "deterministic": lambda: check_deterministic(explainer.explain, model, x, [0, 1]),
        "errors": lambda: check_explainer_errors(explainer, model, x),
    }[check]
    try:
        with pytest.raises(AssertionError, match=message):
            call()
        check_explainer(Saliency(), model, x, [0, 1])  # the unbroken method passes
    finally:
        for m in model.modules():
            m._forward_hooks.clear()


def test_metric_and_network_checks_catch_broken_components():
    s = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4] = masks[1, 4:] = True  # the third mask is empty: NaN, not counted
    s[0, 0, 0] = s[1, 7, 7] = 2  # two hits: the mean over counted samples is 1, not 2/3
    check_metric(Hits(), s, masks, value_range=(0, 1))  # the unbroken metric passes
    with pytest.raises(AssertionError, match="mean over non-NaN samples"):
        check_metric(NaNCounted(), s, masks)
    with pytest.raises(AssertionError, match="modified an input"):
        check_metric(ModifiesItsInput(), s.clone(), masks)
    with pytest.raises(AssertionError, match="documented range"):
        check_metric(Hits(), s, masks, value_range=(0, 0.5))
    with pytest.raises(AssertionError, match="one by one"):
        check_pooling(BatchMeanPooling(), rand(2, 4, 3, 3))


# --- one spelling in public names -------------------------------------------------------------

#: (module, name) kept with the old spelling as a deprecated alias only
DEPRECATED_SPELLINGS = {("foveal.explainers.relevance", "normalise")}


def test_public_names_spell_normalize():
    """Functions, parameters, config fields, attributes, keywords and CLI flags say "normalize"
    (the torch/numpy spelling); prose and comments may say normalise. An old spelling survives
    only as a deprecated alias listed in DEPRECATED_SPELLINGS."""
    offenders = []
    for module, path in foveal_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, ast.arg):
                names.append(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.append(node.arg)
            elif isinstance(node, (ast.AnnAssign, ast.Assign)):
                targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
                names += [t.id if isinstance(t, ast.Name) else t.attr for t in targets
                          if isinstance(t, (ast.Name, ast.Attribute))]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                names.append(node.value)  # a CLI flag
            for name in names:
                if "normalis" in name.lower() and (module, name) not in DEPRECATED_SPELLINGS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not offenders, "spell public names 'normalize' (keep a deprecated alias for a rename):\n" + "\n".join(
        offenders)


def test_rollout_old_spelling_is_a_deprecated_alias():
    from foveal.explainers.relevance import rollout

    layers = [torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.warns(DeprecationWarning, match="normalize="):
        old = rollout(layers, 1, normalise=True)
    assert torch.equal(old, rollout(layers, 1, normalize=True))
    assert not torch.allclose(old, rollout(layers, 1, normalize=False))

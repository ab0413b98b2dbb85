"""Registry: lookup, validation, info, and plugin isolation through real entry-point discovery.

Third-party plugins are simulated by writing a real ``*.dist-info`` folder (METADATA +
entry_points.txt) and a module into a temporary directory on ``sys.path``; importlib.metadata
discovers them exactly as it discovers pip-installed distributions.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
from pydantic import ValidationError

from foveal import registry
from foveal.core.errors import PluginWarning, RegistryError
from foveal.registry import Registry, normalize


def make_dist(root, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[foveal]\n{ep_name or dist} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


GOOD = """
from foveal.core import ComponentConfig, Metric
from foveal.registry import hookimpl

class Const(Metric):
    family = "segmentation"
    class Config(ComponentConfig):
        value: float = 1.0
    def compute(self, predictions, masks):
        return predictions.new_full((predictions.shape[0],), self.config.value)

@hookimpl
def register_components(register):
    register("{name}", Const, aliases=("{alias}",))
"""




def fresh() -> Registry:
    reg = Registry()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        reg.load()
    reg.caught = [x for x in w if issubclass(x.category, PluginWarning)]
    return reg


def test_lookup_is_case_dash_underscore_and_space_insensitive():
    assert normalize(" Timm_Backbone ") == "timm-backbone"
    for spelling in ("timm-backbone", "TIMM_BACKBONE", "Timm Backbone", "global_average_pooling"):
        assert registry.has(spelling)
    assert registry.entry("Global Average Pooling").name == "gap"


def test_unknown_name_lists_close_matches():
    with pytest.raises(RegistryError, match=r"unknown component 'timm-backbon'.*did you mean: timm-backbone"):
        registry.build("timm-backbon")
    with pytest.raises(RegistryError, match="unknown kind 'backbones'.*did you mean backbone"):
        registry.names("backbones")


def test_overrides_are_validated_with_field_names():
    with pytest.raises(ValidationError, match="in_channels"):
        registry.build("gap", in_channels=-3)
    with pytest.raises(ValidationError, match="no_such_field"):
        registry.build("gap", no_such_field=1)
    assert registry.build("gap", in_channels=7).config.in_channels == 7


def test_info_documents_fields_and_defaults():
    info = registry.info("gap")
    assert info["kind"] == "pooling" and "Global average pooling" in info["doc"]
    assert info["fields"]["in_channels"]["default"] == 2048
    assert info["fields"]["in_channels"]["description"]
    assert info["schema"]["properties"]["in_channels"]["type"] == "integer"
    assert "gap" in registry.names("pooling") and "gap" not in registry.names("backbone")


def test_bundled_plugins_use_the_same_hook():
    plugins = {p.name: p for p in registry.list_plugins()}
    assert "gap" in plugins["foveal.plugins.pooling"].components
    assert plugins["foveal.plugins.pooling"].distribution == "foveal"


def test_third_party_plugin_is_discovered_and_builds(site):
    make_dist(site, "tp-good", "tp_good", GOOD.format(name="const-metric", alias="constant"))
    reg = fresh()
    assert reg.has("constant") and reg.entry("const-metric").distribution == "tp-good"
    assert reg.build("const_metric", value=2.0).config.value == 2.0
    info = [p for p in reg.list_plugins() if p.distribution == "tp-good"][0]
    assert info.version == "0.3" and info.components == ["const-metric"] and info.error is None


def test_import_failure_is_isolated(site):
    make_dist(site, "tp-broken", "tp_broken", "raise ImportError('needs libfoo')")
    make_dist(site, "tp-good", "tp_good", GOOD.format(name="const-metric", alias="constant"))
    reg = fresh()
    assert reg.has("const-metric") and reg.has("gap")
    assert any("tp-broken" in str(w.message) and "needs libfoo" in str(w.message) for w in reg.caught)
    broken = [p for p in reg.list_plugins() if p.distribution == "tp-broken"][0]
    assert "needs libfoo" in broken.error and broken.components == []


def test_hook_failure_leaves_no_half_registered_entries(site):
    make_dist(site, "tp-half", "tp_half", GOOD.format(name="half-one", alias="half-alias").replace(
        'register("half-one"', 'register("half-one", Const)\n    raise RuntimeError("late failure")\n    register("x"'))
    reg = fresh()
    assert not reg.has("half-one") and not reg.has("half-alias")
    assert any("late failure" in str(w.message) for w in reg.caught)


def test_bad_registration_is_a_plugin_failure(site):
    make_dist(site, "tp-bad", "tp_bad", """
        from foveal.registry import hookimpl
        @hookimpl
        def register_components(register):
            register("not-a-component", dict)
    """)
    reg = fresh()
    assert not reg.has("not-a-component")
    assert any("not a foveal Component subclass" in str(w.message) for w in reg.caught)


def test_name_claimed_twice_names_both_plugins(site):
    make_dist(site, "tp-dup", "tp_dup", GOOD.format(name="gap", alias="zzz"))
    with pytest.raises(RegistryError, match=r"'gap' claimed twice.*foveal\.plugins\.pooling.*tp-dup"):
        Registry().load()


def test_env_var_restricts_third_party_loading(site, monkeypatch):
    make_dist(site, "tp-good", "tp_good", GOOD.format(name="const-metric", alias="constant"))
    make_dist(site, "tp-other", "tp_other", GOOD.format(name="other-metric", alias="other"))
    monkeypatch.setenv("FOVEAL_LOAD_PLUGINS", "")
    reg = fresh()
    assert not reg.has("const-metric") and not reg.has("other-metric") and reg.has("gap")
    monkeypatch.setenv("FOVEAL_LOAD_PLUGINS", "tp-other")
    reg = fresh()
    assert reg.has("other-metric") and not reg.has("const-metric")


def test_plugins_load_lazily():
    reg = Registry()
    assert not reg._loaded
    reg.names()
    assert reg._loaded

"""The registry: one flat table of named components filled by plugins through pluggy."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..core.component import KINDS, Component
from ..core.errors import PluginWarning, RegistryError
from . import hookspecs

ENTRY_POINT_GROUP = "foveal"
BUNDLED_DISTRIBUTION = "foveal"


def normalize(name: str) -> str:
    """Canonical lookup key: lower case; ``_`` and spaces become ``-``."""
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    kind: str
    defaults: dict[str, Any]
    aliases: tuple[str, ...]
    plugin: str
    distribution: str
    distribution_version: str


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    components: list[str] = field(default_factory=list)
    error: str | None = None


class Registry:
    """Components by name. Plugins load lazily on first use (see :meth:`load`)."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._lookup: dict[str, str] = {}
        self._plugins: list[PluginInfo] = []
        self._loaded = False
        self._lock = threading.RLock()

    # --- loading -------------------------------------------------------------------------
    def load(self, *, reload: bool = False) -> None:
        """Load the bundled plugins (the modules listed in ``foveal.plugins.BUNDLED``) and, unless restricted by
        ``FOVEAL_LOAD_PLUGINS`` (comma list of entry-point or distribution names; empty = none),
        every third-party plugin of the entry-point group ``foveal``."""
        with self._lock:
            if self._loaded and not reload:
                return
            self._entries.clear()
            self._lookup.clear()
            self._plugins.clear()
            self._loaded = True
            from .. import __version__
            from ..plugins import BUNDLED

            try:
                for qual in BUNDLED:
                    self._load_plugin(qual, lambda q=qual: importlib.import_module(q),
                                      BUNDLED_DISTRIBUTION, __version__)
                for ep, dist, version in self._third_party_entry_points():
                    self._load_plugin(ep.name, ep.load, dist, version)
            except BaseException:
                # A name conflict (raised on every use until resolved), or Ctrl-C while loading: never
                # leave a half-filled table marked as loaded; the next use loads again from scratch.
                self._entries.clear()
                self._lookup.clear()
                self._loaded = False
                raise

    @staticmethod
    def _third_party_entry_points():
        allowed = os.environ.get("FOVEAL_LOAD_PLUGINS")
        allow = None if allowed is None else {normalize(a) for a in allowed.split(",") if a.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else ""
            version = ep.dist.version if ep.dist is not None else ""
            if normalize(dist) == BUNDLED_DISTRIBUTION:
                continue
            if allow is not None and normalize(ep.name) not in allow and normalize(dist) not in allow:
                continue
            yield ep, dist, version

    def _load_plugin(self, plugin_name: str, loader, dist: str, version: str) -> None:
        info = PluginInfo(plugin_name, dist, version)
        self._plugins.append(info)
        staged: list[Entry] = []

        def register(name: str, cls: type, *, aliases: tuple[str, ...] | list[str] = (), **defaults: Any) -> None:
            staged.append(self._make_entry(name, cls, tuple(aliases), defaults, plugin_name, dist, version))

        try:
            obj = loader()
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            pm.register(obj, name=plugin_name)
            impls = pm.hook.register_components.get_hookimpls()
            if not impls:
                raise RegistryError(f"{plugin_name} has no register_components hook implementation")
            for impl in impls:
                impl.function(register=register)
        except RegistryError as e:
            if "claimed twice" in str(e):
                raise
            self._fail(info, e)
            return
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - any import/hook failure, sys.exit() included, isolates this
            self._fail(info, e)     # plugin only; nothing it staged is registered
            return
        # Commit all-or-nothing: check every staged name first.
        seen: dict[str, Entry] = {}
        for entry in staged:
            for key in (entry.name, *entry.aliases):
                k = normalize(key)
                other = seen.get(k) or (self._entries.get(self._lookup[k]) if k in self._lookup else None)
                if other is not None:
                    raise RegistryError(
                        f"component name {key!r} claimed twice: by plugin {other.plugin!r} "
                        f"({other.distribution or 'local'}) as {other.cls.__qualname__} and by plugin "
                        f"{entry.plugin!r} ({entry.distribution or 'local'}) as {entry.cls.__qualname__}; "
                        "uninstall one, or restrict third-party plugins with FOVEAL_LOAD_PLUGINS"
                    )
                seen[k] = entry
        for entry in staged:
            self._entries[entry.name] = entry
            for key in (entry.name, *entry.aliases):
                self._lookup[normalize(key)] = entry.name
            info.components.append(entry.name)

    @staticmethod
    def _fail(info: PluginInfo, err: BaseException) -> None:
        if isinstance(err, SystemExit):
            info.error = f"SystemExit: the plugin called sys.exit({err.code!r})"
        else:
            info.error = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"foveal plugin {info.name!r} ({info.distribution or 'local'}) was skipped: {info.error}",
            PluginWarning,
            stacklevel=4,
        )

    @staticmethod
    def _make_entry(name, cls, aliases, defaults, plugin, dist, version) -> Entry:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"register: name must be a non-empty string, got {name!r}")
        if not (inspect.isclass(cls) and issubclass(cls, Component)):
            raise TypeError(f"register({name!r}): {cls!r} is not a foveal Component subclass")
        if cls.kind not in KINDS:
            raise TypeError(f"register({name!r}): {cls.__qualname__}.kind={cls.kind!r} is not one of {KINDS}")
        unknown = set(defaults) - set(cls.Config.model_fields)
        if unknown:
            raise TypeError(
                f"register({name!r}): defaults {sorted(unknown)} are not fields of "
                f"{cls.__qualname__}.Config (fields: {sorted(cls.Config.model_fields)})"
            )
        return Entry(normalize(name), cls, cls.kind, dict(defaults), tuple(normalize(a) for a in aliases),
                     plugin, dist, version)

    # --- queries ----------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        self.load()
        key = normalize(name)
        if key in self._lookup:
            return self._entries[self._lookup[key]]
        choices = sorted(self._lookup)
        close = difflib.get_close_matches(key, choices, n=5, cutoff=0.6)
        close += [c for c in choices if key and key in c and c not in close][: 5 - len(close)]
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise RegistryError(
            f"unknown component {name!r}{hint} (list them with `foveal list` or registry.names())"
        )

    def has(self, name: str) -> bool:
        self.load()
        return normalize(name) in self._lookup

    def names(self, kind: str | None = None) -> list[str]:
        self.load()
        if kind is not None and kind not in KINDS:
            close = difflib.get_close_matches(kind, KINDS, n=3)
            raise RegistryError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
                                + (f" (did you mean {close[0]}?)" if close else ""))
        return sorted(n for n, e in self._entries.items() if kind is None or e.kind == kind)

    def build(self, name: str, **overrides: Any) -> Any:
        """Build a component; ``overrides`` are validated by its Config (pydantic
        ``ValidationError`` with field names on bad values)."""
        entry = self.entry(name)
        config = entry.cls.Config(**{**entry.defaults, **overrides})
        obj = entry.cls(config)
        obj.registry_name = entry.name
        return obj

    def info(self, name: str) -> dict[str, Any]:
        """Kind, class, plugin, docstring and config fields (type, default, description)."""
        e = self.entry(name)
        schema = e.cls.Config.model_json_schema()
        fields = {}
        for fname, f in e.cls.Config.model_fields.items():
            default = e.defaults.get(fname, None if f.is_required() else f.get_default(call_default_factory=True))
            fields[fname] = {
                "type": _type_name(f.annotation),
                "default": default,
                "required": f.is_required() and fname not in e.defaults,
                "description": f.description or "",
            }
        return {
            "name": e.name,
            "kind": e.kind,
            "class": f"{e.cls.__module__}.{e.cls.__qualname__}",
            "aliases": list(e.aliases),
            "plugin": e.plugin,
            "distribution": e.distribution,
            "version": e.distribution_version,
            "doc": inspect.cleandoc(e.cls.__doc__ or ""),
            "defaults": dict(e.defaults),
            "fields": fields,
            "schema": schema,
        }

    def list_plugins(self) -> list[PluginInfo]:
        self.load()
        return list(self._plugins)


def _type_name(annotation: Any) -> str:
    if inspect.isclass(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")

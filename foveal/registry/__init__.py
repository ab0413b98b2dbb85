"""The component registry (``from foveal import registry``).

``registry.build("rta-former-m", num_classes=2)``, ``registry.names(kind="explainer")``,
``registry.info("grad-cam")``, ``registry.list_plugins()``. See :mod:`foveal.registry.core`.
"""

from __future__ import annotations

from ..core.errors import PluginWarning, RegistryError
from .core import ENTRY_POINT_GROUP, Entry, PluginInfo, Registry, normalize
from .hookspecs import hookimpl, hookspec

REGISTRY = Registry()

build = REGISTRY.build
names = REGISTRY.names
info = REGISTRY.info
entry = REGISTRY.entry
has = REGISTRY.has
list_plugins = REGISTRY.list_plugins
load = REGISTRY.load


def reload() -> None:
    """Forget every loaded plugin and load them again (after installing one, or in tests)."""
    REGISTRY.load(reload=True)


__all__ = [
    "ENTRY_POINT_GROUP", "Entry", "PluginInfo", "PluginWarning", "REGISTRY", "Registry",
    "RegistryError", "build", "entry", "has", "hookimpl", "hookspec", "info", "list_plugins",
    "load", "names", "normalize", "reload",
]

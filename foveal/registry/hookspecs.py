"""The hook every foveal plugin implements (bundled plugins included)."""

from __future__ import annotations

import pluggy

PROJECT = "foveal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(register):
    """Register this plugin's components.

    Call ``register(name, cls, *, aliases=(), **defaults)`` once per component: ``name`` is the
    public registry name (lower-case, words joined by ``-``), ``cls`` a subclass of one of
    foveal's core interfaces with a nested ``Config``, ``aliases`` extra names, and
    ``defaults`` config values that define a named variant (e.g. ``register("rta-former-t",
    RTAFormer, backbone="pvt-v2-b0")``).
    """

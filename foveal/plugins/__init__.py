"""Bundled plugins: registration only, one module per component family.

Each module implements the same ``register_components`` hook (``foveal.registry.hookimpl``) that a
third-party plugin implements, and holds nothing but ``register(...)`` lines; the algorithms live
in :mod:`foveal.models`, :mod:`foveal.explainers`, :mod:`foveal.metrics` and :mod:`foveal.refine`.
The registry loads the modules listed in :data:`BUNDLED`, each in isolation (a failing module is
skipped with a warning), then the third-party plugins of the entry-point group ``foveal``.
"""

BUNDLED = (
    "foveal.plugins.backbones",
    "foveal.plugins.models",
    "foveal.plugins.pooling",
    "foveal.plugins.explainers",
    "foveal.plugins.metrics",
    "foveal.plugins.refiners",
)

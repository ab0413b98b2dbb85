"""foveal: plugin-based PyTorch library for attention-based medical segmentation and for
explaining vision models.

``from foveal import registry``; ``registry.build(name, **overrides)``; ``foveal.save`` /
``foveal.load`` for checkpoints.
"""

__version__ = "0.1.0"

from . import registry  # noqa: E402
from .core.errors import CheckpointError, FovealError, InputError, PluginWarning, RegistryError  # noqa: E402
from .registry.checkpoints import load, save  # noqa: E402

__all__ = [
    "CheckpointError", "FovealError", "InputError", "PluginWarning", "RegistryError",
    "__version__", "load", "registry", "save",
]

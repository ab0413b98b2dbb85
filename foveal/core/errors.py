"""Exceptions and warnings raised by foveal.

Every error says what was expected and what came instead, so that a user can fix the call
without reading the source.
"""

from __future__ import annotations


class FovealError(Exception):
    """Base class of every error foveal raises on purpose."""


class RegistryError(FovealError, LookupError):
    """Unknown component name, a name claimed twice, or a bad registration."""

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(FovealError, ValueError):
    """A checkpoint cannot be read, is not a foveal checkpoint, or does not fit its model."""


class InputError(FovealError, ValueError):
    """An argument has the wrong shape, dtype, range or value."""


class PluginWarning(UserWarning):
    """A plugin failed to import or to register; it was skipped and the others still load."""

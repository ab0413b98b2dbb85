"""The base every registered component shares: a validated config and a registry identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import ValidationError

from .config import ComponentConfig
from .errors import CheckpointError

KINDS = ("backbone", "decoder", "pooling", "model", "explainer", "refiner", "metric")


class Component:
    """Mixin for every component: ``kind``, a nested pydantic ``Config`` and ``self.config``.

    Subclasses declare ``class Config(ComponentConfig)`` with every constructor argument as a
    field (documented with ``Field(description=...)``), and take ``(config=None, **overrides)``
    in ``__init__``. ``registry_name`` is filled in by ``registry.build`` so that
    ``foveal.save`` knows how to rebuild the component.

    ``nn.Module`` components keep torch's ``state_dict``; the others derive from
    :class:`PlainComponent`.
    """

    kind: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    config: ComponentConfig
    registry_name: str | None = None
    #: Config fields that only matter when building from scratch (paths to initial weights):
    #: :func:`foveal.save` writes them as their defaults, since the checkpoint's own tensors
    #: replace them, and a checkpoint must not depend on a file that may be gone.
    checkpoint_exclude: ClassVar[tuple[str, ...]] = ("weights", "backbone_weights", "pretrained")

    @classmethod
    def parse_config(cls, config: Any = None, **overrides: Any) -> ComponentConfig:
        """Validate ``config`` (a Config, a mapping or None) updated with ``overrides``."""
        if config is None:
            values: dict[str, Any] = {}
        elif isinstance(config, cls.Config):
            values = config.model_dump()
        elif isinstance(config, ComponentConfig):
            raise TypeError(
                f"{cls.__name__} expects a {cls.__name__}.Config, got {type(config).__qualname__}"
            )
        elif isinstance(config, Mapping):
            values = dict(config)
        else:
            raise TypeError(
                f"{cls.__name__}: config must be a {cls.__name__}.Config, a mapping or None, "
                f"got {type(config).__name__}"
            )
        values.update(overrides)
        return cls.Config(**values)

    def _init_config(self, config: Any, overrides: Mapping[str, Any]) -> None:
        # object.__setattr__ keeps nn.Module's __setattr__ out of the way for a plain attribute
        object.__setattr__(self, "config", self.parse_config(config, **overrides))


class PlainComponent(Component):
    """A component that is not an ``nn.Module`` (explainers, metrics): its checkpoint state is
    empty unless a subclass overrides :meth:`state_dict`/:meth:`load_state_dict` (for example
    an explainer holding trained attention weights)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        if strict and state:
            raise CheckpointError(
                f"{type(self).__name__} holds no tensors, but the checkpoint has "
                f"{len(state)}: {sorted(state)[:10]}"
            )
        return None



def format_validation_error(err: ValidationError) -> str:
    """One line per bad field: ``field: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "<config>"
        lines.append(f"{loc}: {e.get('msg')} (got {e.get('input')!r})")
    return "; ".join(lines)

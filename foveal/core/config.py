"""Pydantic configuration base shared by every component.

A component's ``Config`` fully describes an instance: ``registry.build(name, **config)`` on the
saved config JSON rebuilds the same architecture, which is what checkpoints rely on.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ComponentConfig(BaseModel):
    """Base of every component ``Config``: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), ser_json_inf_nan="constants"
    )

"""The base of every config model: typed, and strict about unknown keys.

Its own module so that each component's config section (illada.config, illada.model.config)
builds on it without importing the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

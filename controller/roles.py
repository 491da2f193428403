"""Operator roles: what an operator token may do. No web framework here: fleetctl imports it.

Each role includes the ones before it: a viewer reads; a deployer also publishes models and
creates and controls rollouts; an admin also enrolls, labels and removes devices and manages
operator tokens.
"""
from __future__ import annotations

import enum

from .errors import InvalidInput


class Role(str, enum.Enum):
    VIEWER = "viewer"
    DEPLOYER = "deployer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(value.lower())
        except ValueError:
            raise InvalidInput(f"role {value!r} is unknown; use one of {', '.join(r.value for r in cls)}") from None


_ORDER = (Role.VIEWER, Role.DEPLOYER, Role.ADMIN)

"""Events the core emits, in order, while holding its lock.

Observers run synchronously inside ``create``/``remove``/``register``, so
a view updated from them is consistent by the time the call returns.
Observers must not call back into the core (the rule is in
``mdevcore.observers``, shared with the PCI bus).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdevcore.core.model import MdevDevice, Parent


@dataclasses.dataclass(frozen=True, slots=True)
class ParentAdded:
    parent: Parent


@dataclasses.dataclass(frozen=True, slots=True)
class ParentRemoved:
    """Emitted after the parent's devices were removed (each with DeviceRemoved)."""

    parent: Parent


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceAdded:
    device: MdevDevice


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceRemoved:
    device: MdevDevice


MdevEvent = ParentAdded | ParentRemoved | DeviceAdded | DeviceRemoved

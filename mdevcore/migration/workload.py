"""The workload contract shared by the migration tool and its workloads.

A workload drives a device the way a guest driver would, from inside the
VMM-side tool, with guest memory in a :class:`GuestMemory`.  It talks to the
device with the blocking vfio-user :class:`Client`.  Workloads live in
``mdevcore.migration.workloads.<name>`` and call :func:`register` when
imported; :func:`create` imports them lazily by name.
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Callable
from typing import Protocol

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.vfio_user.client import Client


class WorkloadMismatch(AssertionError):
    """What the device or guest memory holds differs from what was written."""


class Workload(Protocol):
    name: str  # registry key: "mtty", "nvme"

    def start(self, dev: Client, mem: GuestMemory) -> None:
        """Bring a fresh device up as a driver would (probe, queues, IRQ eventfds)."""

    def run_for(self, seconds: float) -> None:
        """Drive I/O for about `seconds` (blocking), checking completions as they come."""

    def quiesce(self) -> None:
        """vCPUs paused: issue nothing new. Work in flight inside the device may remain."""

    def save(self) -> bytes:
        """The driver's state that travels with the VM (journal of what was written
        where, queue positions, commands in flight, expected bytes...)."""

    def restore(self, data: bytes, dev: Client, mem: GuestMemory) -> None:
        """On the destination (device already RUNNING with the migrated state, mem
        holding the migrated guest pages): rebuild from `data`, re-wire IRQ
        eventfds with SET_IRQS as a VMM re-creates its irqfds, and continue."""

    def resume(self) -> None:
        """The migration failed and the source was rolled back to RUNNING: continue
        on the same device as before quiesce()."""

    def verify(self) -> None:
        """Check every byte written before, during and after; raise
        WorkloadMismatch (an AssertionError subclass) with details on any difference."""

    def stats(self) -> dict[str, int]:
        """Counters for the report, e.g. {"writes": n, "verified_bytes": n}."""

    def close(self) -> None: ...


WORKLOADS: dict[str, Callable[[], Workload]] = {}  # name -> factory taking no args


def register(name: str, factory: Callable[[], Workload]) -> None:
    WORKLOADS[name] = factory


def create(name: str) -> Workload:
    """A new workload by name, importing ``workloads.<name>`` on first use.

    Raises OSError(ENOENT) naming the module when no such workload exists.
    """
    if name not in WORKLOADS:
        module = f"mdevcore.migration.workloads.{name}"
        if not name.isidentifier():
            raise OSError(errno.EINVAL, f"bad workload name {name!r}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise OSError(errno.ENOENT, f"no workload {name!r} ({module} is missing)") from None
        if name not in WORKLOADS:
            raise OSError(errno.ENOENT, f"{module} registers no workload {name!r}")
    return WORKLOADS[name]()

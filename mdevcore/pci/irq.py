"""Interrupt state of a PCI device as VFIO sees it: eventfds, masks, pending.

One :class:`IrqIndex` per VFIO IRQ index (INTx, MSI, MSI-X, ERR, REQ).
SET_IRQS requests arrive structurally checked (mdevcore.vfio_user.validate)
and are applied here; every fd kept is our own ``os.dup`` (the engine closes its copies).
Delivery (``signal``) honours masks: a masked vector becomes pending and
fires when it is unmasked.  INTx auto-masks after each signal, as VFIO's
AUTOMASKED contract says; the client unmasks it with SET_IRQS UNMASK.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence

from mdevcore.vfio_user import backend as vfio

log = logging.getLogger(__name__)

_DATA_TYPES = vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_DATA_BOOL | vfio.IRQ_SET_DATA_EVENTFD
_ACTION_TYPES = vfio.IRQ_SET_ACTION_MASK | vfio.IRQ_SET_ACTION_UNMASK | vfio.IRQ_SET_ACTION_TRIGGER
# Indexes that are mutually exclusive: the guest uses one of them at a time.
_VECTOR_INDEXES = (vfio.PCI_INTX_IRQ_INDEX, vfio.PCI_MSI_IRQ_INDEX, vfio.PCI_MSIX_IRQ_INDEX)

INDEX_NAMES = ("INTx", "MSI", "MSI-X", "ERR", "REQ")


class IrqIndex:
    """Eventfds, masks and pending bits of one IRQ index."""

    def __init__(self, index: int, count: int, owner: str = "") -> None:
        self.owner = owner  # the device's name, for logs
        self.index = index
        self.count = count
        self.fds: list[int | None] = [None] * count
        self.assigned = 0  # how many of fds are set (active() is on the hot path)
        self.masked = [False] * count
        self.pending = [False] * count

    @property
    def name(self) -> str:
        return INDEX_NAMES[self.index]

    def active(self) -> bool:
        return self.assigned > 0

    def assign(self, vector: int, fd: int | None) -> None:
        """Keep a dup of ``fd`` for ``vector`` (None: no eventfd), closing the old one.

        The dup comes first: if it fails (EMFILE), the vector keeps its eventfd.
        """
        self.install(vector, os.dup(fd) if fd is not None else None)

    def install(self, vector: int, owned: int | None) -> None:
        """Put ``owned`` (an fd that is now ours, or None) in ``vector``; close the old one."""
        old, self.fds[vector] = self.fds[vector], owned
        self.assigned += (owned is not None) - (old is not None)
        if old is not None:
            os.close(old)

    def close_all(self) -> None:
        for vector in range(self.count):
            self.assign(vector, None)
        self.masked = [False] * self.count
        self.pending = [False] * self.count

    def fire(self, vector: int) -> bool:
        """Signal the eventfd of ``vector``; False if none is assigned."""
        fd = self.fds[vector]
        if fd is None:
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            # Counter overflow or a non-eventfd fd from the client: drop it.
            log.warning(
                "[%s] %s vector %d: eventfd write failed: %s", self.owner, self.name, vector, exc
            )
            return False
        return True


def _dup_all(fds: Sequence[int]) -> list[int]:
    """Our own copies of ``fds``, all or none (the ones made are closed on failure)."""
    owned: list[int] = []
    try:
        for fd in fds:
            owned.append(os.dup(fd))
    except OSError:
        for fd in owned:
            os.close(fd)
        raise
    return owned


class IrqController:
    """All five VFIO IRQ indexes of a PCI device.

    ``intx_allowed`` reports whether the command register lets INTx through
    (its INTx-disable bit clear); a suppressed INTx stays pending.
    """

    def __init__(
        self,
        counts: Sequence[int],
        intx_allowed: Callable[[], bool],
        device_mask: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.indexes = [IrqIndex(i, n) for i, n in enumerate(counts)]
        self._owner = ""
        self._intx_allowed = intx_allowed
        # Masks the device itself knows of besides SET_IRQS (e.g. MSI-X table
        # vector control written by the client): (index, vector) -> masked.
        self._device_mask = device_mask or (lambda index, vector: False)
        self.intx_level = False  # the device asserts its INTx line (level mode)

    @property
    def owner(self) -> str:
        """The device's name, used in log messages."""
        return self._owner

    @owner.setter
    def owner(self, name: str) -> None:
        self._owner = name
        for irq in self.indexes:
            irq.owner = name

    def resize(self, index: int, count: int) -> None:
        """Change an index's vector count (device description time only)."""
        self.indexes[index].close_all()
        self.indexes[index] = IrqIndex(index, count, self._owner)

    # --- SET_IRQS ----------------------------------------------------------

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        """Apply a SET_IRQS whose structure was checked (``vfio_user.validate``).

        What is checked here needs this device: the index, ERR/REQ being
        trigger-only, eventfd mask/unmask (not offered: ENOTTY), one of
        INTx/MSI/MSI-X at a time, and that each fd is open.
        """
        if not 0 <= index < vfio.PCI_NUM_IRQS:
            raise OSError(errno.EINVAL, f"no IRQ index {index}")
        irq = self.indexes[index]
        dtype = flags & _DATA_TYPES
        action = flags & _ACTION_TYPES
        if count == 0:
            log.debug("[%s] %s disabled", self._owner, irq.name)
            irq.close_all()
            return
        if index in (vfio.PCI_ERR_IRQ_INDEX, vfio.PCI_REQ_IRQ_INDEX):
            if action != vfio.IRQ_SET_ACTION_TRIGGER:
                raise OSError(errno.EINVAL, f"{irq.name} only supports ACTION_TRIGGER")
        bools = [b != 0 for b in data] if dtype == vfio.IRQ_SET_DATA_BOOL else None
        if dtype == vfio.IRQ_SET_DATA_EVENTFD and action != vfio.IRQ_SET_ACTION_TRIGGER:
            # Resample/unmask eventfds (irqfd-style) are not offered.
            raise OSError(errno.ENOTTY, f"{irq.name}: eventfd mask/unmask not supported")
        if action == vfio.IRQ_SET_ACTION_TRIGGER:
            if dtype == vfio.IRQ_SET_DATA_EVENTFD:
                self._assign(irq, start, count, fds)
            else:
                for i in range(count):
                    if bools is None or bools[i]:
                        self.signal(index, start + i)
            return
        self._set_mask(irq, start, count, bools, action == vfio.IRQ_SET_ACTION_MASK)

    def _assign(self, irq: IrqIndex, start: int, count: int, fds: Sequence[int]) -> None:
        if fds and irq.index in _VECTOR_INDEXES:
            for other in _VECTOR_INDEXES:
                if other != irq.index and self.indexes[other].active():
                    raise OSError(
                        errno.EINVAL,
                        f"{irq.name} requested while {INDEX_NAMES[other]} is enabled",
                    )
        for fd in fds:
            # Validate before changing anything: the request is all or nothing.
            try:
                os.fstat(fd)
            except OSError as exc:
                raise OSError(errno.EBADF, f"{irq.name}: bad fd") from exc
        owned = _dup_all(fds)  # EMFILE here changes nothing
        for i in range(count):
            vector = start + i
            irq.install(vector, owned[i] if owned else None)
            if irq.index == vfio.PCI_INTX_IRQ_INDEX:
                # A fresh INTx setup starts unmasked with nothing latched.
                irq.masked[vector] = False
                irq.pending[vector] = False
        state = "set" if fds else "cleared"
        log.debug("[%s] %s vectors %d+%d %s", self._owner, irq.name, start, count, state)
        if fds and irq.index == vfio.PCI_INTX_IRQ_INDEX and self.intx_level:
            self.signal(vfio.PCI_INTX_IRQ_INDEX, 0)

    def _set_mask(
        self, irq: IrqIndex, start: int, count: int, bools: list[bool] | None, mask: bool
    ) -> None:
        for i in range(count):
            if bools is not None and not bools[i]:
                continue
            vector = start + i
            if mask:
                irq.masked[vector] = True
            elif irq.masked[vector]:
                irq.masked[vector] = False
                self._deliver_pending(irq.index, vector)

    def _deliver_pending(self, index: int, vector: int) -> None:
        irq = self.indexes[index]
        if index == vfio.PCI_INTX_IRQ_INDEX:
            if irq.pending[0] or self.intx_level:
                self.signal(index, 0)
        else:
            self.retry_pending(index, vector)

    def retry_pending(self, index: int, vector: int) -> None:
        """A mask was lifted somewhere: fire ``vector`` if pending and unmasked."""
        irq = self.indexes[index]
        if not 0 <= vector < irq.count or not irq.pending[vector]:
            return
        if irq.masked[vector] or self._device_mask(index, vector):
            return
        irq.pending[vector] = False
        irq.fire(vector)

    # --- delivery ------------------------------------------------------------

    def signal(self, index: int, vector: int) -> bool:
        """Deliver ``vector`` of ``index``; masked -> pending.  True if signalled."""
        irq = self.indexes[index]
        if not 0 <= vector < irq.count:
            log.debug("[%s] %s: no vector %d", self._owner, irq.name, vector)
            return False
        if index == vfio.PCI_INTX_IRQ_INDEX:
            if irq.masked[0] or not self._intx_allowed() or irq.fds[0] is None:
                irq.pending[0] = True
                return False
            irq.pending[0] = False
            irq.masked[0] = True  # automasked until the client unmasks
            return irq.fire(0)
        if irq.masked[vector] or self._device_mask(index, vector):
            irq.pending[vector] = True
            return False
        return irq.fire(vector)

    def active_index(self) -> int | None:
        """The index the client enabled (MSI-X, else MSI, else INTx), if any."""
        for index in (vfio.PCI_MSIX_IRQ_INDEX, vfio.PCI_MSI_IRQ_INDEX, vfio.PCI_INTX_IRQ_INDEX):
            if self.indexes[index].active():
                return index
        return None

    def set_intx_level(self, level: bool) -> None:
        self.intx_level = level
        intx = self.indexes[vfio.PCI_INTX_IRQ_INDEX]
        if level:
            self.signal(vfio.PCI_INTX_IRQ_INDEX, 0)
        elif intx.count:
            intx.pending[0] = False

    def intx_asserted(self) -> bool:
        """Status register Interrupt Status bit: INTx level or a latched signal."""
        intx = self.indexes[vfio.PCI_INTX_IRQ_INDEX]
        return self.intx_level or (intx.count > 0 and intx.pending[0])

    def intx_reenabled(self) -> None:
        """The INTx-disable bit was cleared: deliver what was held back."""
        intx = self.indexes[vfio.PCI_INTX_IRQ_INDEX]
        if intx.count and not intx.masked[0] and (intx.pending[0] or self.intx_level):
            self.signal(vfio.PCI_INTX_IRQ_INDEX, 0)

    def close_all(self) -> None:
        for irq in self.indexes:
            irq.close_all()
        self.intx_level = False

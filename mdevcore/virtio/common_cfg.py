"""The virtio PCI common configuration structure (4.1.4.3), as a register file.

Sans-IO: reads and writes arrive as (offset, bytes) and act on the queues
and on an owner (the transport) through :class:`CommonCfgOwner`.  This is
where the driver's side of the handshake is checked:

* feature negotiation: the driver may only accept features the device
  offered, VERSION_1 included (no legacy interface); setting FEATURES_OK
  with anything else leaves FEATURES_OK clear, which is how a device
  refuses (3.1.1 step 6);
* the status state machine: 0 resets the device; status bits only ever get
  set (a driver that clears one is ignored); DRIVER_OK needs FEATURES_OK;
  DEVICE_NEEDS_RESET belongs to the device;
* queue registers: size, vector and ring addresses only change while the
  queue is disabled; enabling checks the layout; queue_reset (with
  VIRTIO_F_RING_RESET) returns one queue to its power-on state.

Writes must be naturally aligned and as wide as the field (64-bit fields
also as two 32-bit halves); anything else is ignored, as real hardware
would.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from mdevcore.virtio import spec
from mdevcore.virtio.chain import VirtqError
from mdevcore.virtio.virtqueue import SplitQueue

log = logging.getLogger(__name__)

# Field widths by offset; 64-bit queue addresses are listed by their halves.
_FIELDS = {
    spec.COMMON_DFSELECT: 4,
    spec.COMMON_DF: 4,
    spec.COMMON_GFSELECT: 4,
    spec.COMMON_GF: 4,
    spec.COMMON_MSIX: 2,
    spec.COMMON_NUMQ: 2,
    spec.COMMON_STATUS: 1,
    spec.COMMON_CFGGENERATION: 1,
    spec.COMMON_Q_SELECT: 2,
    spec.COMMON_Q_SIZE: 2,
    spec.COMMON_Q_MSIX: 2,
    spec.COMMON_Q_ENABLE: 2,
    spec.COMMON_Q_NOFF: 2,
    spec.COMMON_Q_DESCLO: 4,
    spec.COMMON_Q_DESCHI: 4,
    spec.COMMON_Q_AVAILLO: 4,
    spec.COMMON_Q_AVAILHI: 4,
    spec.COMMON_Q_USEDLO: 4,
    spec.COMMON_Q_USEDHI: 4,
    spec.COMMON_Q_NDATA: 2,
    spec.COMMON_Q_RESET: 2,
}
_ADDR_FIELDS = {
    spec.COMMON_Q_DESCLO: "desc",
    spec.COMMON_Q_AVAILLO: "driver",
    spec.COMMON_Q_USEDLO: "device",
}


class CommonCfgOwner(Protocol):
    """What the register file asks of the transport."""

    def msix_vectors(self) -> int: ...

    def validate_features(self, features: int) -> str | None: ...

    def virtio_reset(self) -> None: ...

    def status_changed(self, old: int, new: int) -> None: ...

    def queue_failed(self, queue: SplitQueue, error: VirtqError) -> None: ...

    def queue_was_reset(self, queue: SplitQueue) -> None: ...


class CommonConfig:
    """Registers of one virtio PCI function; ``queues`` are indexed by queue_select."""

    def __init__(self, owner: CommonCfgOwner, queues: list[SplitQueue], features: int) -> None:
        self.owner = owner
        self.queues = queues
        self.device_features = features
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        """Device reset: everything but the offered features and the generation."""
        self.dfselect = 0
        self.gfselect = 0
        self.driver_features = 0
        self.msix_config = spec.MSI_NO_VECTOR
        self.status = 0
        self.queue_select = 0
        self.queue_vectors = [spec.MSI_NO_VECTOR] * len(self.queues)
        self.queue_resetting = [False] * len(self.queues)

    @property
    def negotiated(self) -> int:
        """The accepted features (meaningful once FEATURES_OK is set)."""
        return self.driver_features if self.status & spec.STATUS_FEATURES_OK else 0

    def has(self, feature: int) -> bool:
        return bool(self.negotiated & spec.bit(feature))

    def _selected(self) -> SplitQueue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    # --- reads ----------------------------------------------------------------

    def image(self) -> bytes:
        """The structure as the driver would read it now."""
        q = self._selected()
        word = self.dfselect
        df = (self.device_features >> (32 * word)) & 0xFFFFFFFF if word < 2 else 0
        gword = self.gfselect
        gf = (self.driver_features >> (32 * gword)) & 0xFFFFFFFF if gword < 2 else 0
        head = struct.pack(
            "<IIIIHHBBH",
            self.dfselect,
            df,
            self.gfselect,
            gf,
            self.msix_config,
            len(self.queues),
            self.status,
            self.generation & 0xFF,
            self.queue_select,
        )
        if q is None:  # queue_size 0 tells the driver there is no such queue
            return head + bytes(spec.COMMON_CFG_SIZE - len(head))
        i = q.index
        tail = struct.pack(
            "<HHHHQQQHH",
            q.size,
            self.queue_vectors[i],
            int(q.enabled),
            i,
            q.desc,
            q.driver,
            q.device,
            i,
            int(self.queue_resetting[i]),
        )
        return head + tail

    def read(self, offset: int, size: int) -> bytes:
        return self.image()[offset : offset + size].ljust(size, b"\0")

    # --- writes -----------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        width = _FIELDS.get(offset)
        if width is None and offset - 4 in _ADDR_FIELDS and len(data) == 4:
            width = 4  # high half of a queue address
        if offset in _ADDR_FIELDS and len(data) == 8:
            width = 8
        if width is None or len(data) != width:
            log.debug("common cfg: ignoring %d-byte write at %#x", len(data), offset)
            return
        value = int.from_bytes(data, "little")
        if offset == spec.COMMON_DFSELECT:
            self.dfselect = value
        elif offset == spec.COMMON_GFSELECT:
            self.gfselect = value
        elif offset == spec.COMMON_GF:
            self._write_driver_features(value)
        elif offset == spec.COMMON_MSIX:
            self.msix_config = self._vector(value)
        elif offset == spec.COMMON_STATUS:
            self._write_status(value)
        elif offset == spec.COMMON_Q_SELECT:
            self.queue_select = value
        elif offset >= spec.COMMON_Q_SIZE:
            self._write_queue(offset, data, value)

    def _write_driver_features(self, value: int) -> None:
        if self.status & spec.STATUS_FEATURES_OK or self.gfselect >= 2:
            return  # features are frozen once accepted; there are only 64 bits
        shift = 32 * self.gfselect
        mask = 0xFFFFFFFF << shift
        self.driver_features = (self.driver_features & ~mask) | (value << shift)

    def _vector(self, value: int) -> int:
        """A vector the device can use, or NO_VECTOR (which tells the driver it failed)."""
        if value != spec.MSI_NO_VECTOR and value >= self.owner.msix_vectors():
            return spec.MSI_NO_VECTOR
        return value

    def features_problem(self, features: int) -> str | None:
        """Why the device refuses ``features`` (None: it accepts them)."""
        extra = features & ~self.device_features
        if extra:
            return f"features {extra:#x} were not offered"
        if not features & spec.bit(spec.F_VERSION_1):
            return "VERSION_1 not accepted (no legacy interface)"
        return self.owner.validate_features(features)

    def _write_status(self, value: int) -> None:
        old = self.status
        if value == 0:
            self.owner.virtio_reset()
            return
        new = (value & ~spec.STATUS_DEVICE_NEEDS_RESET) | old
        if old & ~value & ~spec.STATUS_DEVICE_NEEDS_RESET & 0xFF:
            log.info("status %#x -> %#x clears bits; keeping them", old, value)
        if new & spec.STATUS_FEATURES_OK and not old & spec.STATUS_FEATURES_OK:
            problem = self.features_problem(self.driver_features)
            if problem is not None:
                log.info("refusing features %#x: %s", self.driver_features, problem)
                new &= ~(spec.STATUS_FEATURES_OK | spec.STATUS_DRIVER_OK)
        if new & spec.STATUS_DRIVER_OK and not new & spec.STATUS_FEATURES_OK:
            log.info("DRIVER_OK without FEATURES_OK ignored")
            new &= ~spec.STATUS_DRIVER_OK
        self.status = new
        if new != old:
            self.owner.status_changed(old, new)

    def _write_queue(self, offset: int, data: bytes, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        i = q.index
        if offset == spec.COMMON_Q_RESET:
            if value == 1 and self.has(spec.F_RING_RESET):
                q.reset()
                self.queue_vectors[i] = spec.MSI_NO_VECTOR
                self.queue_resetting[i] = True
                self.owner.queue_was_reset(q)
            return
        if offset == spec.COMMON_Q_ENABLE:
            if value == 1 and not q.enabled:
                self._enable(q)
            return
        if q.enabled:
            log.debug("queue %d: register %#x written while enabled; ignored", i, offset)
            return
        if offset == spec.COMMON_Q_SIZE:
            q.size = value
        elif offset == spec.COMMON_Q_MSIX:
            self.queue_vectors[i] = self._vector(value)
        else:
            base = offset if offset in _ADDR_FIELDS else offset - 4
            name = _ADDR_FIELDS.get(base)
            if name is None:
                return  # read-only fields (notify_off, notif_config_data)
            old = getattr(q, name)
            if len(data) == 8:
                new = value
            elif offset == base:
                new = (old & ~0xFFFFFFFF) | value
            else:
                new = (old & 0xFFFFFFFF) | value << 32
            setattr(q, name, new)

    def _enable(self, q: SplitQueue) -> None:
        if not self.status & spec.STATUS_FEATURES_OK:
            self.owner.queue_failed(q, VirtqError(f"queue {q.index} enabled before FEATURES_OK"))
            return
        try:
            q.enable(self.driver_features)
        except VirtqError as exc:
            self.owner.queue_failed(q, q.fail(exc))
            return
        self.queue_resetting[q.index] = False

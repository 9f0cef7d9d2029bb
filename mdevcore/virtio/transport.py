"""VirtioPciDevice: the virtio PCI modern transport on top of PciDevice.

A virtio device type (net, blk, ...) subclasses this, offers its features,
queue count and device config, and reacts to queue notifications.  The
transport owns everything else the driver sees:

  BAR ``layout.bar``: common config, ISR, device config and notify
  structures (see pci_caps.VirtioBarLayout), described by vendor
  capabilities; MSI-X table and PBA in BAR ``msix_bar``.

Interrupts follow the PCI transport rules (4.1.4.5, 4.1.5): with MSI-X
enabled by the guest, queue ``i`` signals ``queue_msix_vector[i]`` and
configuration changes ``config_msix_vector`` (NO_VECTOR: nothing); without
MSI-X the device sets ISR bit 0 (queue) or 1 (configuration) and asserts
INTx until the driver reads the ISR, which clears it.

A protocol error on a queue (VirtqError) marks it broken, sets
DEVICE_NEEDS_RESET and (after DRIVER_OK) raises a configuration change
interrupt: the driver has to reset the device.

Migration (a device type that sets ``migration_flags``): outside RUNNING
and PRE_COPY the device touches no guest memory and raises no interrupt.
Notifications are latched and interrupts held, and both are served when
it runs again; after a restore every queue is looked at and every
interrupt raised once (the source may have had some in flight; a
spurious virtio interrupt costs the driver one look at its rings).
"""

from __future__ import annotations

import errno
from typing import Any

from mdevcore.pci import caps
from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user import backend as vfio
from mdevcore.virtio import spec
from mdevcore.virtio.chain import VirtqError
from mdevcore.virtio.common_cfg import CommonConfig
from mdevcore.virtio.pci_caps import VirtioBarLayout, add_virtio_caps
from mdevcore.virtio.virtqueue import QueueState, SplitQueue


class VirtioPciDevice(PciDevice):
    """Base of every virtio device served here; see the module doc."""

    layout = VirtioBarLayout()
    msix_bar = 4
    msix_bar_size = 0x1000
    msix_pba_offset = 0x800

    def __init__(
        self,
        identity: PciIdentity,
        *,
        device_features: int,
        num_queues: int,
        queue_size: int,
        msix_vectors: int,
        device_cfg_size: int,
    ) -> None:
        super().__init__(identity)
        try:
            self.add_bar(self.layout.bar, self.layout.size, BarKind.MEM64)
            self.add_bar(self.msix_bar, self.msix_bar_size, BarKind.MEM64)
            self.add_msix(
                msix_vectors,
                table_bar=self.msix_bar,
                table_offset=0,
                pba_bar=self.msix_bar,
                pba_offset=self.msix_pba_offset,
            )
            add_virtio_caps(self.config, self.layout, device_cfg_size)
            self.queues = [SplitQueue(self.dma, i, queue_size) for i in range(num_queues)]
        except BaseException:
            PciDevice.close(self)
            raise
        self.device_cfg_size = device_cfg_size
        self._msix_vectors = msix_vectors
        self.common = CommonConfig(self, self.queues, device_features)
        self.isr = 0
        self.reset_count = 0  # virtio resets so far (status 0, DEVICE_RESET, FLR): for logs/tests
        self._latched: set[int] = set()  # queues notified while not executing
        self._held_irqs: set[tuple[int, int]] = set()  # (vector, ISR bit) held meanwhile
        self.restored = False  # state loaded; the resume looks at everything

    # --- what a device type overrides ------------------------------------------

    def validate_features(self, features: int) -> str | None:
        """Device-type rules on the accepted features (e.g. MQ needs CTRL_VQ)."""
        return None

    def device_config_read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def device_config_write(self, offset: int, data: bytes) -> None:
        """Driver writes to device config (most fields are read-only)."""

    def queue_notified(self, queue: SplitQueue) -> None:
        """The driver kicked ``queue`` (enabled and not broken)."""

    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK: the device may start using its queues."""

    def on_virtio_reset(self) -> None:
        """Device reset (status 0, DEVICE_RESET or FLR): drop device-type state."""

    def on_queue_reset(self, queue: SplitQueue) -> None:
        """One queue was reset (VIRTIO_F_RING_RESET): drop its in-flight work."""

    def on_resume(self) -> None:
        """The device executes again after a migration stop: catch up (e.g. RX)."""

    # --- CommonCfgOwner ---------------------------------------------------------

    def msix_vectors(self) -> int:
        return self._msix_vectors

    def virtio_reset(self) -> None:
        self.reset_count += 1
        self._latched.clear()
        self._held_irqs.clear()
        for q in self.queues:
            q.reset()
        self.common.reset()
        self.isr = 0
        self.set_intx(False)
        self.on_virtio_reset()

    def status_changed(self, old: int, new: int) -> None:
        self.log.debug("virtio status %#x -> %#x", old, new)
        if new & spec.STATUS_DRIVER_OK and not old & spec.STATUS_DRIVER_OK:
            self.on_driver_ok()

    def queue_failed(self, queue: SplitQueue, error: VirtqError) -> None:
        self.log.warning("queue %d: %s; device needs reset", queue.index, error)
        self.needs_reset()

    def queue_was_reset(self, queue: SplitQueue) -> None:
        self.on_queue_reset(queue)

    # --- state the device type reads ----------------------------------------------

    @property
    def executing(self) -> bool:
        """May the device touch guest memory and interrupt (migration RUNNING/PRE_COPY)?"""
        return self.mig_state in (MigState.RUNNING, MigState.PRE_COPY)

    @property
    def driver_ok(self) -> bool:
        status = self.common.status
        return bool(status & spec.STATUS_DRIVER_OK) and not status & (
            spec.STATUS_DEVICE_NEEDS_RESET | spec.STATUS_FAILED
        )

    def has(self, feature: int) -> bool:
        return self.common.has(feature)

    def needs_reset(self) -> None:
        """Tell the driver the device is unusable until it resets it (2.1.2)."""
        if self.common.status & spec.STATUS_DEVICE_NEEDS_RESET:
            return
        self.common.status |= spec.STATUS_DEVICE_NEEDS_RESET
        if self.common.status & spec.STATUS_DRIVER_OK:
            self._interrupt(self.common.msix_config, spec.ISR_CONFIG)

    def config_changed(self) -> None:
        """Device config changed (link, MAC...): new generation, config interrupt."""
        self.common.generation = (self.common.generation + 1) & 0xFF
        if self.common.status & spec.STATUS_DRIVER_OK:
            self._interrupt(self.common.msix_config, spec.ISR_CONFIG)

    def notify_used(self, queue: SplitQueue) -> None:
        """Used entries were pushed: interrupt the driver if it wants one."""
        try:
            wanted = queue.should_notify()
        except VirtqError as exc:
            self.queue_failed(queue, exc)
            return
        if wanted:
            self._interrupt(self.common.queue_vectors[queue.index], spec.ISR_QUEUE)

    def run_queue_safely(self, queue: SplitQueue, work: Any) -> None:
        """Call ``work(queue)``; a VirtqError from it breaks the queue and the device."""
        try:
            work(queue)
        except VirtqError as exc:
            self.queue_failed(queue, queue.fail(exc))

    def _msix_enabled(self) -> bool:
        assert self.msix is not None
        return bool(
            self.config.get_u16(self.msix.offset + caps.MSIX_FLAGS) & caps.MSIX_FLAGS_ENABLE
        )

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if not self.executing:
            self._held_irqs.add((vector, isr_bit))
            return
        if self._msix_enabled():
            if vector != spec.MSI_NO_VECTOR:
                self.trigger(vfio.PCI_MSIX_IRQ_INDEX, vector)
            return
        self.isr |= isr_bit
        self.set_intx(True)

    # --- BAR access ---------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        where = self.layout.region(offset) if bar == self.layout.bar else None
        if where is None:
            return super().bar_read(bar, offset, size) if bar != self.layout.bar else bytes(size)
        name, off = where
        if name == "common":
            return self.common.read(off, size)
        if name == "isr":
            value, self.isr = self.isr, 0  # read-to-clear, deasserting INTx
            self.set_intx(False)
            return bytes([value]).ljust(size, b"\0") if off == 0 else bytes(size)
        if name == "device":
            if off + size > self.device_cfg_size:
                return bytes(size)
            return self.device_config_read(off, size)
        return bytes(size)  # notify is write-only

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar != self.layout.bar:
            super().bar_write(bar, offset, data)
            return
        where = self.layout.region(offset)
        if where is None:
            return
        name, off = where
        if name == "common":
            self.common.write(off, data)
        elif name == "device":
            if off + len(data) <= self.device_cfg_size:
                self.device_config_write(off, data)
        elif name == "notify":
            self._notify(off)

    def _notify(self, offset: int) -> None:
        index, rest = divmod(offset, self.layout.notify_off_multiplier)
        if rest or index >= len(self.queues):
            return
        queue = self.queues[index]
        if not queue.enabled or queue.broken is not None or not self.driver_ok:
            return
        if not self.executing:
            self._latched.add(index)  # served when the device runs again
            return
        self.queue_notified(queue)

    # --- PciDevice hooks ------------------------------------------------------------

    def on_reset(self) -> None:
        self.virtio_reset()

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        running = (MigState.RUNNING, MigState.PRE_COPY)
        if new in running and old not in running:
            self._resume()

    def _resume(self) -> None:
        held, self._held_irqs = self._held_irqs, set()
        latched, self._latched = self._latched, set()
        if self.restored:
            self.restored = False
            latched = set(range(len(self.queues)))
            if self.driver_ok:
                held.add((self.common.msix_config, spec.ISR_CONFIG))
                for q in self.queues:
                    if q.enabled:
                        held.add((self.common.queue_vectors[q.index], spec.ISR_QUEUE))
        for vector, isr_bit in sorted(held):
            self._interrupt(vector, isr_bit)
        for index in sorted(latched):
            queue = self.queues[index]
            if queue.enabled and queue.broken is None and self.driver_ok:
                self.queue_notified(queue)
        self.on_resume()

    # --- migration helpers -----------------------------------------------------------

    def save_transport(self) -> dict[str, Any]:
        """Transport and queue state, JSON-friendly (for a device's save_state)."""
        c = self.common
        return {
            "features": c.driver_features,
            "status": c.status,
            "generation": c.generation,
            "msix_config": c.msix_config,
            "queue_vectors": list(c.queue_vectors),
            "queues": [q.save().to_dict() for q in self.queues],
            "isr": self.isr,
        }

    def load_transport(self, blob: Any) -> None:
        """Restore save_transport() output; OSError(EINVAL) if it does not fit this device."""
        try:
            if not isinstance(blob, dict):
                raise VirtqError("not a mapping")
            features, status = blob["features"], blob["status"]
            generation, msix_config, isr = blob["generation"], blob["msix_config"], blob["isr"]
            vectors, queues = blob["queue_vectors"], blob["queues"]
            ints = (features, status, generation, msix_config, isr)
            if any(type(v) is not int for v in ints) or not isinstance(vectors, list):
                raise VirtqError("fields of the wrong type")
            if not isinstance(queues, list) or len(queues) != len(self.queues):
                raise VirtqError("queue count differs")
            if len(vectors) != len(self.queues) or any(type(v) is not int for v in vectors):
                raise VirtqError("queue vectors")
            if not 0 <= status <= 0xFF or not 0 <= generation <= 0xFF or not 0 <= isr <= 3:
                raise VirtqError("status/generation/isr out of range")
            if status & spec.STATUS_FEATURES_OK and self.common.features_problem(features):
                raise VirtqError(f"features {features:#x} not acceptable here")
            for v in [msix_config, *vectors]:
                if v != spec.MSI_NO_VECTOR and not 0 <= v < self._msix_vectors:
                    raise VirtqError(f"vector {v}")
            states = [QueueState.from_dict(q, self.queues[0].max_size) for q in queues]
        except (VirtqError, KeyError, TypeError) as exc:
            raise OSError(errno.EINVAL, f"virtio transport state: {exc}") from None
        self.virtio_reset()
        c = self.common
        c.driver_features, c.status, c.generation = features, status, generation
        c.msix_config, c.queue_vectors = msix_config, list(vectors)
        try:
            for q, state in zip(self.queues, states, strict=True):
                q.load(state, features)
        except VirtqError as exc:
            self.virtio_reset()
            raise OSError(errno.EINVAL, f"virtio transport state: {exc}") from None
        self.isr = isr

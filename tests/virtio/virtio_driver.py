"""A virtio PCI modern driver for tests, over anything with region_read/region_write.

It works the same against a device in-process (PciDevice's region methods)
and over vfio-user (mdevcore.vfio_user.client.Client): it walks the
capability list for the vendor capabilities, negotiates features, sets up
split queues in GuestRam and kicks them through the notify structure.
"""

from __future__ import annotations

import struct
from typing import Protocol

from virtio_guest import DriverQueue, GuestRam

from mdevcore.pci import caps
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CONFIG
from mdevcore.virtio import spec


class Regions(Protocol):
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...


class VirtioDriver:
    def __init__(self, dev: Regions) -> None:
        self.dev = dev
        self.caps: dict[int, tuple[int, int, int, int]] = {}  # cfg_type -> (cap, bar, off, len)
        self.notify_mult = 0
        self.queues: dict[int, DriverQueue] = {}
        ptr = self.cfg(0x34, 1)
        while ptr:
            cap_id, nxt = self.dev.region_read(CONFIG, ptr, 2)
            if cap_id == caps.CAP_ID_VENDOR:
                body = self.dev.region_read(CONFIG, ptr, 20)
                cfg_type, bar = body[3], body[4]
                offset, length = struct.unpack_from("<II", body, 8)
                self.caps.setdefault(cfg_type, (ptr, bar, offset, length))
                if cfg_type == spec.PCI_CAP_NOTIFY_CFG:
                    self.notify_mult = struct.unpack_from("<I", body, 16)[0]
            ptr = nxt

    def cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.region_read(CONFIG, offset, size), "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.dev.region_write(CONFIG, offset, value.to_bytes(size, "little"))

    # --- structures -------------------------------------------------------------

    def _at(self, cfg_type: int, offset: int) -> tuple[int, int]:
        _, bar, base, _ = self.caps[cfg_type]
        return bar, base + offset

    def read(self, offset: int, size: int, cfg_type: int = spec.PCI_CAP_COMMON_CFG) -> int:
        bar, off = self._at(cfg_type, offset)
        return int.from_bytes(self.dev.region_read(bar, off, size), "little")

    def write(
        self, offset: int, size: int, value: int, cfg_type: int = spec.PCI_CAP_COMMON_CFG
    ) -> None:
        bar, off = self._at(cfg_type, offset)
        self.dev.region_write(bar, off, value.to_bytes(size, "little"))

    def device_cfg(self, offset: int, size: int) -> bytes:
        bar, off = self._at(spec.PCI_CAP_DEVICE_CFG, offset)
        return self.dev.region_read(bar, off, size)

    def isr(self) -> int:
        return self.read(0, 1, spec.PCI_CAP_ISR_CFG)

    @property
    def status(self) -> int:
        return self.read(spec.COMMON_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.write(spec.COMMON_STATUS, 1, value)

    # --- the driver's steps (3.1.1) ------------------------------------------------

    def device_features(self) -> int:
        words = []
        for word in (0, 1):
            self.write(spec.COMMON_DFSELECT, 4, word)
            words.append(self.read(spec.COMMON_DF, 4))
        return words[0] | words[1] << 32

    def write_features(self, features: int) -> None:
        for word in (0, 1):
            self.write(spec.COMMON_GFSELECT, 4, word)
            self.write(spec.COMMON_GF, 4, (features >> (32 * word)) & 0xFFFFFFFF)

    def negotiate(self, wanted: int) -> int:
        """Reset, ACK, DRIVER, features & wanted, FEATURES_OK; returns the features."""
        self.set_status(0)
        self.set_status(spec.STATUS_ACKNOWLEDGE)
        self.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
        features = self.device_features() & wanted
        self.write_features(features)
        self.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_FEATURES_OK)
        assert self.status & spec.STATUS_FEATURES_OK, "device refused the features"
        return features

    def setup_queue(self, ram: GuestRam, index: int, size: int, vector: int) -> DriverQueue:
        self.write(spec.COMMON_Q_SELECT, 2, index)
        assert self.read(spec.COMMON_Q_SIZE, 2) >= size
        q = DriverQueue(ram, size)
        self.write(spec.COMMON_Q_SIZE, 2, size)
        self.write(spec.COMMON_Q_MSIX, 2, vector)
        for offset, addr in (
            (spec.COMMON_Q_DESCLO, q.desc),
            (spec.COMMON_Q_AVAILLO, q.avail),
            (spec.COMMON_Q_USEDLO, q.used),
        ):
            self.write(offset, 4, addr & 0xFFFFFFFF)
            self.write(offset + 4, 4, addr >> 32)
        self.write(spec.COMMON_Q_ENABLE, 2, 1)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.set_status(self.status | spec.STATUS_DRIVER_OK)

    def kick(self, index: int) -> None:
        self.write(spec.COMMON_Q_SELECT, 2, index)
        noff = self.read(spec.COMMON_Q_NOFF, 2)
        self.write(noff * self.notify_mult, 2, index, spec.PCI_CAP_NOTIFY_CFG)

    def enable_msix(self) -> None:
        off = next(ptr for ptr, cap_id in self.cap_list() if cap_id == caps.CAP_ID_MSIX)
        ctl = self.cfg(off + caps.MSIX_FLAGS, 2)
        self.cfg_write(off + caps.MSIX_FLAGS, 2, ctl | caps.MSIX_FLAGS_ENABLE)

    def cap_list(self) -> list[tuple[int, int]]:
        """(offset, capability id) along the standard list."""
        out = []
        ptr = self.cfg(0x34, 1)
        while ptr:
            cap_id, nxt = self.dev.region_read(CONFIG, ptr, 2)
            out.append((ptr, cap_id))
            ptr = nxt
        return out

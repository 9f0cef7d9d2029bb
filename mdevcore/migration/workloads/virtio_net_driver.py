"""A virtio PCI modern driver for the migration tool's workloads: rings in GuestMemory.

What a guest's virtio_pci + virtio_ring do, from the VMM side, over the
blocking vfio-user Client: walk the capability list for the virtio
structures, reset, negotiate, lay out split virtqueues in guest memory,
enable MSI-X and kick through the notify structure.  Every store into
guest memory goes through GuestMemory.write, so the migration tool sees
it as a vCPU write (its own dirty tracking); the device's stores are the
device's to log.

Each queue here uses one descriptor per buffer and descriptor ``i``
always points at buffer ``i`` (a fixed pool per queue), which is all a
packet workload needs and keeps the driver state small enough to travel
in the workload's save().
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from typing import Any

from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory
from mdevcore.pci import caps
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CONFIG
from mdevcore.vfio_user.client import Client
from mdevcore.virtio import spec

_U16 = struct.Struct("<H")


@dataclasses.dataclass(slots=True)
class Ring:
    """One split virtqueue as the driver owns it, and its buffer pool."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    buffers: int  # IOVA of buffer 0; buffer i at buffers + i * buf_size
    buf_size: int
    avail_idx: int = 0
    used_seen: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Ring:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != fields:
            raise ValueError("ring state: wrong fields")
        if any(type(v) is not int for v in data.values()):
            raise ValueError("ring state: not integers")
        return cls(**data)

    def buffer(self, head: int) -> int:
        return self.buffers + head * self.buf_size


class VirtioPciDriver:
    """The transport side of a virtio driver on ``dev``, its rings in ``mem``."""

    def __init__(self, dev: Client, mem: GuestMemory) -> None:
        self.dev = dev
        self.mem = mem
        self.structs: dict[int, tuple[int, int]] = {}  # cfg_type -> (bar, offset)
        self.notify_mult = 0
        self.msix_cap = 0
        ptr = self._cfg(0x34, 1) & ~3
        for _ in range(48):  # a capability list cannot be longer than config space allows
            if not ptr:
                break
            cap_id, nxt = dev.region_read(CONFIG, ptr, 2)
            if cap_id == caps.CAP_ID_VENDOR:
                body = dev.region_read(CONFIG, ptr, spec.PCI_NOTIFY_CAP_LEN)
                cfg_type, bar = body[3], body[4]
                (offset,) = struct.unpack_from("<I", body, 8)
                self.structs.setdefault(cfg_type, (bar, offset))
                if cfg_type == spec.PCI_CAP_NOTIFY_CFG:
                    (self.notify_mult,) = struct.unpack_from("<I", body, 16)
            elif cap_id == caps.CAP_ID_MSIX:
                self.msix_cap = ptr
            ptr = nxt & ~3
        needed = (spec.PCI_CAP_COMMON_CFG, spec.PCI_CAP_NOTIFY_CFG, spec.PCI_CAP_DEVICE_CFG)
        if any(t not in self.structs for t in needed) or not self.msix_cap:
            raise OSError(errno.ENODEV, "not a virtio PCI modern device with MSI-X")

    def _cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.region_read(CONFIG, offset, size), "little")

    # --- structures ------------------------------------------------------------------

    def read(self, offset: int, size: int, cfg_type: int = spec.PCI_CAP_COMMON_CFG) -> int:
        bar, base = self.structs[cfg_type]
        return int.from_bytes(self.dev.region_read(bar, base + offset, size), "little")

    def write(
        self, offset: int, size: int, value: int, cfg_type: int = spec.PCI_CAP_COMMON_CFG
    ) -> None:
        bar, base = self.structs[cfg_type]
        self.dev.region_write(bar, base + offset, value.to_bytes(size, "little"))

    def device_cfg(self, offset: int, size: int) -> bytes:
        bar, base = self.structs[spec.PCI_CAP_DEVICE_CFG]
        return self.dev.region_read(bar, base + offset, size)

    @property
    def status(self) -> int:
        return self.read(spec.COMMON_STATUS, 1)

    # --- bring-up (3.1.1) ------------------------------------------------------------

    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, the features both sides have, FEATURES_OK."""
        self.write(spec.COMMON_STATUS, 1, 0)
        self.write(spec.COMMON_STATUS, 1, spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
        offered = 0
        for word in (0, 1):
            self.write(spec.COMMON_DFSELECT, 4, word)
            offered |= self.read(spec.COMMON_DF, 4) << (32 * word)
        features = offered & wanted
        for word in (0, 1):
            self.write(spec.COMMON_GFSELECT, 4, word)
            self.write(spec.COMMON_GF, 4, (features >> (32 * word)) & 0xFFFFFFFF)
        ok = spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_FEATURES_OK
        self.write(spec.COMMON_STATUS, 1, ok)
        if not self.status & spec.STATUS_FEATURES_OK:
            raise OSError(errno.EPROTO, f"device refused features {features:#x}")
        return features

    def setup_queue(self, index: int, size: int, vector: int, buf_size: int) -> Ring:
        """Lay out queue ``index`` (rings and ``size`` buffers) and enable it."""
        self.write(spec.COMMON_Q_SELECT, 2, index)
        offered = self.read(spec.COMMON_Q_SIZE, 2)
        if offered < size:
            raise OSError(errno.EINVAL, f"queue {index}: device offers {offered} < {size}")
        ring = Ring(
            index=index,
            size=size,
            desc=self.mem.alloc(size * spec.DESC_SIZE, PAGE_SIZE),
            avail=self.mem.alloc(spec.avail_bytes(size), PAGE_SIZE),
            used=self.mem.alloc(spec.used_bytes(size), PAGE_SIZE),
            buffers=self.mem.alloc(size * buf_size, PAGE_SIZE),
            buf_size=buf_size,
        )
        self.write(spec.COMMON_Q_SIZE, 2, size)
        self.write(spec.COMMON_Q_MSIX, 2, vector)
        for offset, addr in (
            (spec.COMMON_Q_DESCLO, ring.desc),
            (spec.COMMON_Q_AVAILLO, ring.avail),
            (spec.COMMON_Q_USEDLO, ring.used),
        ):
            self.write(offset, 4, addr & 0xFFFFFFFF)
            self.write(offset + 4, 4, addr >> 32)
        if self.read(spec.COMMON_Q_MSIX, 2) != vector:
            raise OSError(errno.ENOSPC, f"queue {index}: no MSI-X vector {vector}")
        self.write(spec.COMMON_Q_ENABLE, 2, 1)
        return ring

    def driver_ok(self) -> None:
        self.write(spec.COMMON_STATUS, 1, self.status | spec.STATUS_DRIVER_OK)

    def enable_msix(self) -> None:
        flags = self.msix_cap + caps.MSIX_FLAGS
        ctl = self._cfg(flags, 2)
        self.dev.region_write(CONFIG, flags, (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little"))

    def kick(self, ring: Ring) -> None:
        self.write(spec.COMMON_Q_SELECT, 2, ring.index)
        noff = self.read(spec.COMMON_Q_NOFF, 2)
        self.write(noff * self.notify_mult, 2, ring.index, spec.PCI_CAP_NOTIFY_CFG)

    # --- rings (2.7) -------------------------------------------------------------------

    def set_desc(self, ring: Ring, head: int, length: int, writable: bool) -> None:
        flags = spec.DESC_F_WRITE if writable else 0
        raw = spec.DESC.pack(ring.buffer(head), length, flags, 0)
        self.mem.write(ring.desc + head * spec.DESC_SIZE, raw)

    def publish(self, ring: Ring, heads: list[int]) -> None:
        """Make ``heads`` available with one avail idx update."""
        for n, head in enumerate(heads):
            slot = (ring.avail_idx + n) % ring.size
            self.mem.write(ring.avail + 4 + 2 * slot, _U16.pack(head))
        ring.avail_idx = (ring.avail_idx + len(heads)) & 0xFFFF
        self.mem.write(ring.avail + 2, _U16.pack(ring.avail_idx))

    def used_idx(self, ring: Ring) -> int:
        return int(_U16.unpack(self.mem.read(ring.used + 2, 2))[0])

    def reap(self, ring: Ring) -> list[tuple[int, int]]:
        """Used (id, len) since the last reap; then used_event, as Linux re-arms."""
        out: list[tuple[int, int]] = []
        idx = self.used_idx(ring)
        ahead = (idx - ring.used_seen) & 0xFFFF
        if ahead > ring.size:
            raise ValueError(
                f"queue {ring.index}: used idx {idx} is {ahead} ahead (size {ring.size})"
            )
        for _ in range(ahead):
            slot = ring.used_seen % ring.size
            out.append(spec.USED_ELEM.unpack(self.mem.read(ring.used + 4 + 8 * slot, 8)))
            ring.used_seen = (ring.used_seen + 1) & 0xFFFF
        self.mem.write(ring.avail + 4 + 2 * ring.size, _U16.pack(ring.used_seen))  # used_event
        return out

    def avail_idx_in_memory(self, ring: Ring) -> int:
        return int(_U16.unpack(self.mem.read(ring.avail + 2, 2))[0])

"""Record what the project's own vfio-user client sends to a served device.

A real server (``mdevcore.testing.serve``, a trio thread and a UNIX
socket) runs the device; the blocking ``Client`` drives it through the
session QEMU goes through (VERSION, device/region/IRQ info, config space
walk and BAR sizing, BAR traffic, DMA_MAP with a memfd, SET_IRQS with
eventfds, WRITE_MULTI, migration feature probe, reset, unmap).  A tap on
``Connection.receive_data`` keeps each recvmsg's bytes and fd kinds,
which is the engine target's input format.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from mdevcore.pci.device import PciDevice
from mdevcore.pci.migration import MigState
from mdevcore.testing import serve
from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MIG_DEVICE_STATE,
    DEVICE_FEATURE_MIGRATION,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PCI_CONFIG_REGION_INDEX,
)
from mdevcore.vfio_user.client import Client, VfioUserError
from mdevcore.vfio_user.engine import Connection

Chunk = tuple[bytes, int, bool]  # bytes, fd count, memfd?
CFG = PCI_CONFIG_REGION_INDEX
DMA_BASE = 0x100000


def _is_memfd(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


@contextmanager
def tap() -> Iterator[dict[int, list[Chunk]]]:
    """Every recvmsg each Connection gets while the block runs, by id(backend)."""
    seen: dict[int, list[Chunk]] = {}
    original = Connection.receive_data

    def recording(self: Connection, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        chunk = (bytes(data), len(fds), any(_is_memfd(fd) for fd in fds))
        seen.setdefault(id(self.backend), []).append(chunk)
        original(self, data, fds)

    Connection.receive_data = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Connection.receive_data = original  # type: ignore[method-assign]


def without_version(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks after the first message (VERSION: the target negotiates itself)."""
    stream = b"".join(c for c, _, _ in chunks)
    skip = int.from_bytes(stream[4:8], "little") if len(stream) >= 8 else len(stream)
    out = []
    for data, nfds, memfd in chunks:
        if skip >= len(data):
            skip -= len(data)
            continue
        out.append((data[skip:], nfds if skip == 0 else 0, memfd and skip == 0))
        skip = 0
    return out


def _tolerant(fn: Callable[..., object]) -> Callable[..., object]:
    """Call ``fn``; a refusal (the device lacks that IRQ, feature...) is part of the session."""

    def call(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except VfioUserError:
            return None

    return call


def qemu_like_session(c: Client, bars: Sequence[int], io_offsets: Sequence[int]) -> None:
    """Roughly what QEMU's vfio-user-pci does from realize to a running guest."""
    info = c.device_info()
    for index in range(info.num_regions):
        reply = c.region_info(index)
        if reply.fd is not None:
            os.close(reply.fd)
    for index in range(info.num_irqs):
        _tolerant(c.irq_info)(index)
    for offset in range(0, 256, 4):  # the config space walk
        c.region_read(CFG, offset, 4)
    for bar in bars:  # BAR sizing
        reg = 0x10 + 4 * bar
        old = c.region_read(CFG, reg, 4)
        c.region_write(CFG, reg, b"\xff\xff\xff\xff")
        c.region_read(CFG, reg, 4)
        c.region_write(CFG, reg, old)
    c.region_write(CFG, 0x04, struct.pack("<H", 0x0007))  # memory, I/O, bus master
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 20)
        c.dma_map(DMA_BASE, 1 << 20, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, fd=fd)
    finally:
        os.close(fd)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        _tolerant(c.set_irqs)(0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[efd])
    finally:
        os.close(efd)
    for bar in bars:
        for offset in io_offsets:
            c.region_read(bar, offset, 1 if io_offsets[-1] < 8 else 4)
            c.region_write(bar, offset, b"\x41" if io_offsets[-1] < 8 else b"\x05\0\0\0")
    c.region_write_multi([(bars[0], io_offsets[0], b"\x01"), (bars[0], io_offsets[-1], b"\x02")])
    c.region_write(bars[0], io_offsets[0], b"\x01", no_reply=True)
    _tolerant(c.device_feature)(DEVICE_FEATURE_PROBE | DEVICE_FEATURE_MIGRATION, argsz=16)
    _tolerant(c.device_feature)(DEVICE_FEATURE_GET | DEVICE_FEATURE_MIGRATION)
    _tolerant(c.device_feature)(DEVICE_FEATURE_GET | DEVICE_FEATURE_MIG_DEVICE_STATE)
    _tolerant(c.region_io_fds)(bars[0])
    _tolerant(c.set_irqs)(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0)
    c.reset()
    c.dma_unmap(DMA_BASE, 1 << 20)


def set_state(c: Client, state: MigState) -> None:
    """One MIG_DEVICE_STATE SET as written (the server walks to it): the recorded request."""
    flags = DEVICE_FEATURE_SET | DEVICE_FEATURE_MIG_DEVICE_STATE
    c.device_feature(flags, struct.pack("<Ii", state, -1))


def migration_session(c: Client) -> None:
    """The source side of a migration: STOP_COPY and the stream read out."""
    c.region_read(CFG, 0, 4)
    set_state(c, MigState.STOP_COPY)
    while c.mig_data_read(4096):
        pass
    set_state(c, MigState.STOP)
    set_state(c, MigState.RESUMING)


def record(device: PciDevice, session: Callable[[Client], None]) -> list[Chunk]:
    """The recvmsg chunks the server got while ``session`` ran (VERSION removed)."""
    with tap() as seen, serve(device) as served:
        with served.connect() as client:
            session(client)
    return without_version(seen.get(id(device), []))

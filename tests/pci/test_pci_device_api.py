"""The parent-facing API: what a subclass may and may not define, and the hooks."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from pcitest_helpers import PlainDevice

from mdevcore.pci.device import Irq, PciDevice, PciIdentity
from mdevcore.pci.migration import MIGRATION_STOP_COPY
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DmaMapping

IDENT = PciIdentity(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("reset", "on_reset"), ("close", "on_close"), ("run", "background"),
     ("set_irqs", "on_irqs_changed"), ("connected", None), ("device_feature", None)],
)  # fmt: skip
def test_defining_a_backend_name_is_refused(name: str, hint: str | None) -> None:
    with pytest.raises(TypeError) as info:
        type("Sneaky", (PciDevice,), {name: lambda self: None})
    assert name in str(info.value)
    if hint:
        assert hint in str(info.value)


def test_hooks_are_called() -> None:
    calls: list[str] = []

    class Hooked(PciDevice):
        def __init__(self) -> None:
            super().__init__(IDENT, name="hooked")
            self.add_msi(vectors=2)

        def on_irqs_changed(self, index: int) -> None:
            calls.append(f"irqs {index}")

        def on_close(self) -> None:
            calls.append("close")

    dev = Hooked()
    assert dev.name == "hooked"
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        flags = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER
        dev.set_irqs(Irq.MSI, flags, 0, 1, b"", [efd])
        assert dev.irq_in_use() is Irq.MSI
        dev.raise_irq(0)
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)
    dev.close()
    dev.close()  # twice is harmless: the hook runs once
    assert calls == ["irqs 1", "close"]


def test_absent_irq_index_is_einval() -> None:
    class NoErr(PciDevice):
        def __init__(self) -> None:
            super().__init__(IDENT)
            self.declare_irqs(Irq.ERR, None)
            self.declare_irqs(Irq.MSI, 1)  # without an MSI capability, as mtty

    dev = NoErr()
    assert dev.irq_info(Irq.MSI).count == 1
    assert dev.irq_info(Irq.REQ).count == 1
    for call in (
        lambda: dev.irq_info(Irq.ERR),
        lambda: dev.set_irqs(Irq.ERR, vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_ACTION_TRIGGER, 0, 0,
                             b"", []),
    ):  # fmt: skip
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_migration_can_be_switched_off() -> None:
    class Mig(PlainDevice):
        migration_flags = MIGRATION_STOP_COPY

        def save_state(self) -> bytes:
            return b""

    dev = Mig()
    get = vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_MIGRATION
    assert struct.unpack("<Q", dev.device_feature(get, b""))[0] == MIGRATION_STOP_COPY
    dev.set_migratable(False)
    with pytest.raises(OSError) as info:
        dev.device_feature(get, b"")
    assert info.value.errno == errno.ENOTTY
    dev.set_migratable(True)
    assert dev.device_feature(get, b"")


# --- DMA_LOGGING_REPORT at a page size other than START's -----------------------

LOG = vfio.DEVICE_FEATURE_DMA_LOGGING_START
REPORT = vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT


class Logged(PlainDevice):
    migration_flags = MIGRATION_STOP_COPY

    def save_state(self) -> bytes:
        return b""


def report(dev: PciDevice, iova: int, length: int, page_size: int) -> int:
    reply = dev.device_feature(
        vfio.DEVICE_FEATURE_GET | REPORT, struct.pack("<QQQ", iova, length, page_size)
    )
    return int.from_bytes(reply[24:], "little")


@pytest.fixture
def logged() -> Logged:
    dev = Logged()
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 1 << 20)
    try:
        dev.dma_map(DmaMapping(address=0x100000, size=1 << 20, flags=3, fd=ram, offset=0))
    finally:
        os.close(ram)
    start = struct.pack("<QII", 4096, 1, 0) + struct.pack("<QQ", 0x100000, 1 << 20)
    dev.device_feature(vfio.DEVICE_FEATURE_SET | LOG, start)
    return dev


def test_report_at_a_larger_page_size_merges(logged: Logged) -> None:
    logged.dma.mark_dirty(0x100000 + 5 * 4096, 1)  # 4 KiB page 5 -> 16 KiB page 1
    logged.dma.mark_dirty(0x100000 + 12 * 4096, 8192)  # pages 12, 13 -> 16 KiB page 3
    assert report(logged, 0x100000, 1 << 20, 16384) == 0b1010
    assert report(logged, 0x100000, 1 << 20, 4096) == 0  # reported pages are cleared


def test_report_at_a_smaller_page_size_replicates(logged: Logged) -> None:
    logged.dma.mark_dirty(0x100000 + 4096, 1)
    assert report(logged, 0x100000, 0x4000, 1024) == 0b1111 << 4
    assert report(logged, 0x100000, 0x4000, 1024) == 0


def test_report_range_not_covering_a_logged_page_keeps_it(logged: Logged) -> None:
    logged.dma.mark_dirty(0x100000 + 4096, 1)
    # 2 KiB pages over the first half of the dirty 4 KiB page only.
    assert report(logged, 0x100000 + 4096, 2048, 2048) == 1
    assert report(logged, 0x100000 + 4096 + 2048, 2048, 2048) == 1
    # Never wholly inside a report yet: still dirty, until one covers it.
    assert report(logged, 0x100000, 1 << 20, 4096) == 0b10
    assert report(logged, 0x100000, 1 << 20, 4096) == 0


@pytest.mark.parametrize("page_size", [0, 3, 4096 + 1, 1 << 31])
def test_report_bad_page_size_is_einval(logged: Logged, page_size: int) -> None:
    with pytest.raises(OSError) as info:
        report(logged, 0x100000, 1 << 20, page_size)
    assert info.value.errno == errno.EINVAL


def test_config_read_and_disconnect_hooks() -> None:
    seen: list[str] = []

    class Windowed(PciDevice):
        def __init__(self) -> None:
            super().__init__(IDENT)

        def on_config_read(self, offset: int, size: int) -> bytes | None:
            return b"\xab" * size if offset >= 0xF0 else None

        def on_disconnected(self) -> None:
            seen.append(f"mapped {len(self.dma)}")

    dev = Windowed()
    assert dev.region_read(7, 0xF0, 4) == b"\xab" * 4
    assert dev.region_read(7, 0, 2) == (0x1234).to_bytes(2, "little")
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 4096)
    try:
        dev.dma_map(DmaMapping(address=0, size=4096, flags=3, fd=ram, offset=0))
    finally:
        os.close(ram)
    dev.disconnected()
    assert seen == ["mapped 1"] and len(dev.dma) == 0

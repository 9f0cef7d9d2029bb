"""The virtio PCI modern transport, driven in-process through the region handlers.

The device under test is a toy virtio type (EchoDevice) whose queue 0
writes each chain's readable bytes, reversed and with a '!', into
its writable ones: enough to push
the whole path (notify, pop, scatter, used ring, interrupt) through the
transport.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from virtio_driver import VirtioDriver
from virtio_guest import GuestRam

from mdevcore.pci.device import PciIdentity
from mdevcore.vfio_user.backend import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PCI_INTX_IRQ_INDEX,
    PCI_MSIX_IRQ_INDEX,
)
from mdevcore.virtio import spec
from mdevcore.virtio.chain import gather, scatter
from mdevcore.virtio.transport import VirtioPciDevice
from mdevcore.virtio.virtqueue import SplitQueue

V1 = spec.bit(spec.F_VERSION_1)
OFFERED = (
    V1
    | spec.bit(spec.F_EVENT_IDX)
    | spec.bit(spec.F_INDIRECT_DESC)
    | spec.bit(spec.F_RING_RESET)
    | 1 << 3
)
FEATURE_NEEDS_3 = 1 << 4  # offered, but only together with bit 3
VECTORS = 4
TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER


class EchoDevice(VirtioPciDevice):
    def __init__(self) -> None:
        super().__init__(
            PciIdentity(vendor_id=0x1AF4, device_id=0x105A, class_code=0xFF0000),
            device_features=OFFERED | FEATURE_NEEDS_3,
            num_queues=2,
            queue_size=64,
            msix_vectors=VECTORS,
            device_cfg_size=8,
        )
        self.cfg_bytes = bytearray(b"ECHO\0\0\0\0")
        self.resets = 0

    def validate_features(self, features: int) -> str | None:
        if features & FEATURE_NEEDS_3 and not features & 1 << 3:
            return "bit 4 needs bit 3"
        return None

    def device_config_read(self, offset: int, size: int) -> bytes:
        return bytes(self.cfg_bytes[offset : offset + size])

    def queue_notified(self, queue: SplitQueue) -> None:
        self.run_queue_safely(queue, self._echo)

    def _echo(self, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            data = gather(self.dma, chain, 1 << 16)
            queue.push([(chain.head, scatter(self.dma, chain, data[::-1] + b"!"))])
        self.notify_used(queue)

    def on_virtio_reset(self) -> None:
        self.resets += 1


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam()
    yield r
    r.close()


@pytest.fixture
def dev(ram: GuestRam) -> Iterator[EchoDevice]:
    d = EchoDevice()
    d.dma_map(ram.mapping())
    yield d
    d.close()


@pytest.fixture
def efds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(VECTORS)]
    yield fds
    for fd in fds:
        os.close(fd)


def fired(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_capabilities_point_into_bar0(dev: EchoDevice) -> None:
    drv = VirtioDriver(dev)
    layout = dev.layout
    assert {t: v[1:] for t, v in drv.caps.items()} == {
        spec.PCI_CAP_COMMON_CFG: (0, layout.common, spec.COMMON_CFG_SIZE),
        spec.PCI_CAP_NOTIFY_CFG: (0, layout.notify, layout.page),
        spec.PCI_CAP_ISR_CFG: (0, layout.isr, 1),
        spec.PCI_CAP_DEVICE_CFG: (0, layout.device, 8),
    }
    assert drv.notify_mult == 4
    for cap, *_ in drv.caps.values():
        assert drv.cfg(cap + 2, 1) in (16, 20)  # cap_len
    assert drv.device_cfg(0, 4) == b"ECHO"
    assert drv.read(spec.COMMON_NUMQ, 2) == 2


def test_feature_negotiation(dev: EchoDevice) -> None:
    drv = VirtioDriver(dev)
    assert drv.device_features() == OFFERED | FEATURE_NEEDS_3
    ack = spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER
    for bad in (V1 | 1 << 50, 1 << 3, V1 | FEATURE_NEEDS_3):  # not offered, no V1, device rule
        drv.set_status(0)
        drv.set_status(ack)
        drv.write_features(bad)
        drv.set_status(ack | spec.STATUS_FEATURES_OK)
        assert drv.status == ack, hex(bad)  # FEATURES_OK refused
    features = drv.negotiate(V1 | spec.bit(spec.F_EVENT_IDX))
    assert features == V1 | spec.bit(spec.F_EVENT_IDX)
    drv.write_features(OFFERED)  # frozen after FEATURES_OK
    drv.write(spec.COMMON_GFSELECT, 4, 1)
    assert drv.read(spec.COMMON_GF, 4) == 1  # VERSION_1 (bit 32) only
    assert dev.common.negotiated == features


def test_status_machine(dev: EchoDevice) -> None:
    drv = VirtioDriver(dev)
    drv.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_DRIVER_OK)
    assert drv.status == spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER  # no FEATURES_OK yet
    drv.set_status(spec.STATUS_ACKNOWLEDGE)  # clearing DRIVER is not allowed
    assert drv.status == spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER
    drv.set_status(drv.status | spec.STATUS_DEVICE_NEEDS_RESET)  # the device's bit
    assert not drv.status & spec.STATUS_DEVICE_NEEDS_RESET
    drv.negotiate(OFFERED)
    drv.driver_ok()
    assert drv.status == 0x0F
    before = dev.resets
    drv.set_status(0)
    assert drv.status == 0 and dev.resets == before + 1
    assert dev.common.driver_features == 0


def test_queue_registers(dev: EchoDevice, ram: GuestRam) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    drv.write(spec.COMMON_Q_SELECT, 2, 7)  # no such queue: size 0
    assert drv.read(spec.COMMON_Q_SIZE, 2) == 0
    drv.write(spec.COMMON_Q_SELECT, 2, 1)
    assert drv.read(spec.COMMON_Q_SIZE, 2) == 64
    assert drv.read(spec.COMMON_Q_NOFF, 2) == 1
    drv.write(spec.COMMON_Q_MSIX, 2, VECTORS)  # beyond the table: refused
    assert drv.read(spec.COMMON_Q_MSIX, 2) == spec.MSI_NO_VECTOR
    drv.write(spec.COMMON_Q_DESCLO, 4, 0x1234_5000)
    drv.write(spec.COMMON_Q_DESCHI, 4, 0xAB)
    assert drv.read(spec.COMMON_Q_DESCLO, 8) == 0xAB_1234_5000
    drv.write(spec.COMMON_Q_USEDLO, 8, 0x9000)  # one 64-bit write works too
    assert dev.queues[1].device == 0x9000
    drv.write(spec.COMMON_Q_DESCLO + 1, 2, 0xFFFF)  # misaligned: ignored
    assert dev.queues[1].desc == 0xAB_1234_5000
    q = drv.setup_queue(ram, 1, 32, 2)
    assert drv.read(spec.COMMON_Q_ENABLE, 2) == 1
    drv.write(spec.COMMON_Q_SIZE, 2, 16)  # frozen while enabled
    drv.write(spec.COMMON_Q_DESCLO, 4, 0)
    assert (dev.queues[1].size, dev.queues[1].desc) == (32, q.desc)


def test_bad_queue_layout_needs_reset(dev: EchoDevice) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    drv.write(spec.COMMON_Q_SIZE, 2, 48)  # not a power of two
    drv.write(spec.COMMON_Q_ENABLE, 2, 1)
    assert drv.read(spec.COMMON_Q_ENABLE, 2) == 0
    assert drv.status & spec.STATUS_DEVICE_NEEDS_RESET
    drv.set_status(0)
    assert drv.status == 0 and dev.queues[0].broken is None


def test_echo_through_notify_with_msix(dev: EchoDevice, ram: GuestRam, efds: list[int]) -> None:
    drv = VirtioDriver(dev)
    drv.enable_msix()
    dev.set_irqs(PCI_MSIX_IRQ_INDEX, TRIGGER, 0, VECTORS, b"", efds)
    drv.negotiate(OFFERED)
    q = drv.setup_queue(ram, 0, 16, vector=1)
    drv.driver_ok()
    out, inp = ram.alloc(5), ram.alloc(16)
    ram.write(out, b"hello")
    head = q.add_indirect([(out, 5, False), (inp, 16, True)])
    drv.kick(0)
    assert q.reap() == [(head, 6)]
    assert ram.read(inp, 6) == b"olleh!"
    assert fired(efds[1]) == 1 and fired(efds[0]) == 0
    assert drv.isr() == 0  # MSI-X: the ISR stays clear


def test_intx_isr_read_to_clear_and_config_change(dev: EchoDevice, ram: GuestRam) -> None:
    intx = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        dev.set_irqs(PCI_INTX_IRQ_INDEX, TRIGGER, 0, 1, b"", [intx])
        drv = VirtioDriver(dev)
        drv.negotiate(OFFERED)
        q = drv.setup_queue(ram, 0, 16, vector=spec.MSI_NO_VECTOR)
        drv.driver_ok()
        buf = ram.alloc(4)
        q.add([(buf, 4, True)])
        drv.kick(0)
        assert fired(intx) == 1
        assert dev.irqs.intx_asserted()
        assert drv.isr() == spec.ISR_QUEUE
        assert drv.isr() == 0 and not dev.irqs.intx_asserted()
        gen = drv.read(spec.COMMON_CFGGENERATION, 1)
        dev.set_irqs(PCI_INTX_IRQ_INDEX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, b"", [])
        dev.config_changed()
        assert drv.read(spec.COMMON_CFGGENERATION, 1) == (gen + 1) & 0xFF
        assert fired(intx) == 1
        assert drv.isr() == spec.ISR_CONFIG
    finally:
        os.close(intx)


def test_config_change_msix_vector(dev: EchoDevice, efds: list[int]) -> None:
    drv = VirtioDriver(dev)
    drv.enable_msix()
    dev.set_irqs(PCI_MSIX_IRQ_INDEX, TRIGGER, 0, VECTORS, b"", efds)
    drv.negotiate(OFFERED)
    drv.write(spec.COMMON_MSIX, 2, 3)
    assert drv.read(spec.COMMON_MSIX, 2) == 3
    dev.config_changed()
    assert fired(efds[3]) == 0  # before DRIVER_OK the driver is not told
    drv.driver_ok()
    dev.config_changed()
    assert fired(efds[3]) == 1


def test_bad_chain_sets_needs_reset_and_interrupts(
    dev: EchoDevice, ram: GuestRam, efds: list[int]
) -> None:
    drv = VirtioDriver(dev)
    drv.enable_msix()
    dev.set_irqs(PCI_MSIX_IRQ_INDEX, TRIGGER, 0, VECTORS, b"", efds)
    drv.negotiate(OFFERED)
    drv.write(spec.COMMON_MSIX, 2, 0)
    q = drv.setup_queue(ram, 0, 16, vector=1)
    drv.driver_ok()
    q.set_desc(0, ram.base - 4096, 16, spec.DESC_F_WRITE)  # outside the DMA table
    q.publish(0)
    drv.kick(0)
    assert drv.status & spec.STATUS_DEVICE_NEEDS_RESET
    assert fired(efds[0]) == 1 and fired(efds[1]) == 0
    drv.kick(0)  # a broken queue is not walked again
    assert q.reap() == []
    drv.negotiate(OFFERED)  # includes the reset
    assert not drv.status & spec.STATUS_DEVICE_NEEDS_RESET


def test_queue_reset(dev: EchoDevice, ram: GuestRam) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    drv.setup_queue(ram, 1, 16, vector=0)
    drv.write(spec.COMMON_Q_SELECT, 2, 1)
    drv.write(spec.COMMON_Q_RESET, 2, 1)
    assert drv.read(spec.COMMON_Q_RESET, 2) == 1
    assert drv.read(spec.COMMON_Q_ENABLE, 2) == 0
    assert drv.read(spec.COMMON_Q_SIZE, 2) == 64
    drv.setup_queue(ram, 1, 16, vector=0)
    assert drv.read(spec.COMMON_Q_RESET, 2) == 0


def test_queue_reset_needs_the_feature(dev: EchoDevice, ram: GuestRam) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(V1)
    drv.setup_queue(ram, 0, 16, vector=0)
    drv.write(spec.COMMON_Q_RESET, 2, 1)
    assert drv.read(spec.COMMON_Q_ENABLE, 2) == 1


def test_device_reset_from_vmm_resets_virtio(dev: EchoDevice, ram: GuestRam) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    drv.setup_queue(ram, 0, 16, vector=0)
    drv.driver_ok()
    dev.reset()  # VFIO_DEVICE_RESET
    assert drv.status == 0 and not dev.queues[0].enabled


def test_transport_state_round_trip(dev: EchoDevice, ram: GuestRam) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    drv.setup_queue(ram, 0, 16, vector=2)
    drv.driver_ok()
    saved = dev.save_transport()
    other = EchoDevice()
    try:
        other.dma_map(ram.mapping())
        other.load_transport(saved)
        assert other.save_transport() == saved
        assert other.driver_ok and other.queues[0].enabled
        assert other.common.queue_vectors[0] == 2
    finally:
        other.close()


@pytest.mark.parametrize(
    "change",
    [
        {"features": 1 << 50},
        {"status": 0x1FF},
        {"queue_vectors": [VECTORS, 0]},
        {"queues": []},
        {"msix_config": "0"},
    ],
)
def test_transport_state_is_checked(dev: EchoDevice, change: dict[str, object]) -> None:
    drv = VirtioDriver(dev)
    drv.negotiate(OFFERED)
    saved = {**dev.save_transport(), **change}
    with pytest.raises(OSError) as err:
        dev.load_transport(saved)
    assert err.value.errno == 22


def test_isr_pointer_and_notify_bounds(dev: EchoDevice) -> None:
    # a notify beyond the last queue, and a misaligned one, are ignored
    dev.bar_write(0, dev.layout.notify + 4 * 9, struct.pack("<H", 9))
    dev.bar_write(0, dev.layout.notify + 2, struct.pack("<H", 0))
    assert dev.region_read(0, dev.layout.isr + 1, 1) == b"\0"

"""MttyDevice through the DeviceBackend methods the vfio-user engine calls."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator

import pytest

from mdevcore.vfio_user import backend as vfio
from samples.mtty import MttyDevice
from samples.mtty import uart as u

CONFIG = vfio.PCI_CONFIG_REGION_INDEX
TRIGGER_EVENTFD = vfio.IRQ_SET_ACTION_TRIGGER | vfio.IRQ_SET_DATA_EVENTFD
UNMASK = vfio.IRQ_SET_ACTION_UNMASK | vfio.IRQ_SET_DATA_NONE


def kernel_config(nr_ports: int) -> bytes:
    """The first 0x70 config bytes as mtty.c's mtty_create_config_space builds them."""
    cfg = bytearray(0x70)
    cfg[0x00:0x04] = (0x32534348).to_bytes(4, "little")
    cfg[0x04:0x06] = (0x0001).to_bytes(2, "little")
    cfg[0x06:0x08] = (0x0200).to_bytes(2, "little")
    cfg[0x08] = 0x10
    cfg[0x09] = 0x02
    cfg[0x0A] = 0x00
    cfg[0x0B] = 0x07
    cfg[0x10:0x14] = (1).to_bytes(4, "little")
    if nr_ports == 2:
        cfg[0x14:0x18] = (1).to_bytes(4, "little")
    cfg[0x2C:0x30] = (0x32534348).to_bytes(4, "little")
    cfg[0x34] = 0x00
    cfg[0x3D] = 0x01
    for off in (0x40, 0x44, 0x48, 0x4C):
        cfg[off] = 0x23
    cfg[0x43] = 0x80
    cfg[0x60:0x6F] = b"PCI Serial/UART"
    return bytes(cfg)


@pytest.fixture(params=[1, 2])
def dev(request: pytest.FixtureRequest) -> Iterator[MttyDevice]:
    device = MttyDevice(request.param)
    yield device
    device.disconnected()  # closes the eventfds the device dup'ed


@pytest.fixture
def dual() -> Iterator[MttyDevice]:
    device = MttyDevice(2)
    yield device
    device.disconnected()


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def fired(fd: int) -> int:
    """How many times ``fd`` was signalled since the last look (0 if never)."""
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


def cfg_u32(dev: MttyDevice, off: int) -> int:
    return int.from_bytes(dev.region_read(CONFIG, off, 4), "little")


def reg_write(dev: MttyDevice, port: int, off: int, value: int) -> None:
    dev.region_write(port, off, bytes([value]))


def reg_read(dev: MttyDevice, port: int, off: int) -> int:
    return dev.region_read(port, off, 1)[0]


# --- identity -------------------------------------------------------------


def test_config_space_matches_the_kernel_sample(dev: MttyDevice) -> None:
    info = dev.region_info(CONFIG)
    assert info.size >= 0x100
    space = dev.region_read(CONFIG, 0, 0x100)
    assert space[:0x70] == kernel_config(dev.nr_ports)
    assert space[0x70:] == bytes(0x90)  # nothing else, no capabilities


def test_device_region_and_irq_info(dev: MttyDevice) -> None:
    info = dev.device_info()
    assert info.flags & vfio.DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)
    rw = vfio.REGION_FLAG_READ | vfio.REGION_FLAG_WRITE
    bar0 = dev.region_info(0)
    assert (bar0.size, bar0.flags & rw, bar0.fd) == (8, rw, None)
    assert dev.region_info(1).size == (8 if dev.nr_ports == 2 else 0)
    for index in (2, 3, 4, 5, 6, 8):
        assert dev.region_info(index).size == 0
    intx = dev.irq_info(vfio.PCI_INTX_IRQ_INDEX)
    assert intx.count == 1
    assert intx.flags == vfio.IRQ_INFO_EVENTFD | vfio.IRQ_INFO_MASKABLE | vfio.IRQ_INFO_AUTOMASKED
    msi = dev.irq_info(vfio.PCI_MSI_IRQ_INDEX)
    assert (msi.count, msi.flags) == (1, vfio.IRQ_INFO_EVENTFD | vfio.IRQ_INFO_NORESIZE)
    # mtty.c answers GET_IRQ_INFO for INTx and MSI only.
    for index in (vfio.PCI_MSIX_IRQ_INDEX, vfio.PCI_ERR_IRQ_INDEX, vfio.PCI_REQ_IRQ_INDEX, 5):
        with pytest.raises(OSError) as e:
            dev.irq_info(index)
        assert e.value.errno == errno.EINVAL


# --- BAR sizing ----------------------------------------------------------------


def test_bar_sizing(dev: MttyDevice) -> None:
    dev.region_write(CONFIG, 0x10, b"\xff\xff\xff\xff")
    assert cfg_u32(dev, 0x10) == 0xFFFFFFF9  # 8 bytes of I/O space
    dev.region_write(CONFIG, 0x10, (0xC040).to_bytes(4, "little"))
    assert cfg_u32(dev, 0x10) == 0xC041
    dev.region_write(CONFIG, 0x14, b"\xff\xff\xff\xff")
    assert cfg_u32(dev, 0x14) == (0xFFFFFFF9 if dev.nr_ports == 2 else 0)
    for off in (0x18, 0x1C, 0x20, 0x24):
        dev.region_write(CONFIG, off, b"\xff\xff\xff\xff")
        assert cfg_u32(dev, off) == 0


def test_command_register_only_io_and_intx_disable(dev: MttyDevice) -> None:
    dev.region_write(CONFIG, 0x04, b"\xff\xff")
    assert dev.region_read(CONFIG, 0x04, 2) == (0x0401).to_bytes(2, "little")
    dev.region_write(CONFIG, 0x04, b"\x00\x00")
    assert dev.region_read(CONFIG, 0x04, 2) == b"\x00\x00"
    dev.reset()  # DEVICE_RESET keeps what the VMM programmed
    assert dev.region_read(CONFIG, 0x04, 2) == b"\x00\x00"


def test_interrupt_line_is_writable_pin_is_not(dev: MttyDevice) -> None:
    dev.region_write(CONFIG, 0x3C, b"\x0b\x04")
    assert dev.region_read(CONFIG, 0x3C, 2) == b"\x0b\x01"


# --- BAR accesses reach the UARTs -------------------------------------------------


def test_loopback_through_the_bar(dev: MttyDevice) -> None:
    reg_write(dev, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO)
    dev.region_write(0, u.RBR_THR, b"A")
    dev.region_write(0, u.RBR_THR, b"B")
    assert reg_read(dev, 0, u.LSR) & u.LSR_DR
    assert dev.region_read(0, u.RBR_THR, 1) == b"A"
    assert dev.region_read(0, u.RBR_THR, 1) == b"B"
    assert reg_read(dev, 0, u.LSR) == u.LSR_THRE | u.LSR_TEMT


def test_wide_access_is_a_run_of_byte_accesses(dev: MttyDevice) -> None:
    # A 4-byte write at offset 4 sets MCR, (LSR ignored), (MSR ignored), SCR.
    dev.region_write(0, 4, bytes([0x0B, 0xFF, 0xFF, 0x5A]))
    assert reg_read(dev, 0, u.MCR) == 0x0B
    assert reg_read(dev, 0, u.SCR) == 0x5A
    assert dev.region_read(0, 6, 2)[1] == 0x5A


def test_ports_are_independent(dual: MttyDevice) -> None:
    reg_write(dual, 0, u.SCR, 0x11)
    reg_write(dual, 1, u.SCR, 0x22)
    dual.region_write(1, u.RBR_THR, b"z")
    assert reg_read(dual, 0, u.SCR) == 0x11
    assert reg_read(dual, 1, u.SCR) == 0x22
    assert reg_read(dual, 0, u.LSR) & u.LSR_DR == 0
    assert dual.region_read(1, u.RBR_THR, 1) == b"z"


def test_out_of_range_accesses_are_refused(dev: MttyDevice) -> None:
    for index, off, n in ((0, 8, 1), (0, 7, 2), (0, 0, 9), (2, 0, 1), (9, 0, 1)):
        with pytest.raises(OSError) as e:
            dev.region_read(index, off, n)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            dev.region_write(index, off, bytes(n))
        assert e.value.errno == errno.EINVAL
    if dev.nr_ports == 1:
        with pytest.raises(OSError):
            dev.region_read(1, 0, 1)


# --- interrupts -------------------------------------------------------------


def test_intx_signalled_and_automasked_until_unmask(dual: MttyDevice, efd: int) -> None:
    dual.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [efd])
    reg_write(dual, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO)
    reg_write(dual, 0, u.IER, u.IER_RDI)
    assert fired(efd) == 0  # nothing pending yet
    dual.region_write(0, u.RBR_THR, b"x")
    assert fired(efd) == 1
    assert dual.irq_line
    # Auto-masked: another source on the other port does not signal...
    reg_write(dual, 1, u.IER, u.IER_THRI)
    assert fired(efd) == 0
    # ...until the client unmasks; the line is still high, so it fires again.
    dual.set_irqs(vfio.PCI_INTX_IRQ_INDEX, UNMASK, 0, 1, b"", [])
    assert fired(efd) == 1
    # The guest handles both ports: the line drops, unmask brings nothing.
    assert reg_read(dual, 0, u.IIR_FCR) & 0x0F == u.IIR_RDI
    reg_read(dual, 0, u.RBR_THR)
    assert reg_read(dual, 1, u.IIR_FCR) & 0x0F == u.IIR_THRI
    assert not dual.irq_line
    dual.set_irqs(vfio.PCI_INTX_IRQ_INDEX, UNMASK, 0, 1, b"", [])
    assert fired(efd) == 0
    # A new event after the unmask signals once more.
    dual.region_write(0, u.RBR_THR, b"y")
    assert fired(efd) == 1


def test_intx_mask_eventfd_is_not_supported(dev: MttyDevice, efd: int) -> None:
    with pytest.raises(OSError) as e:
        dev.set_irqs(
            vfio.PCI_INTX_IRQ_INDEX,
            vfio.IRQ_SET_ACTION_UNMASK | vfio.IRQ_SET_DATA_EVENTFD,
            0,
            1,
            b"",
            [efd],
        )
    assert e.value.errno == errno.ENOTTY


def test_msi_path(dev: MttyDevice, efd: int) -> None:
    dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [efd])
    reg_write(dev, 0, u.IER, u.IER_THRI)
    assert fired(efd) == 1
    assert reg_read(dev, 0, u.IIR_FCR) == u.IIR_THRI  # acknowledges THRE
    dev.region_write(0, u.RBR_THR, b"q")  # THR empties again at once: new edge
    assert fired(efd) == 1
    # MSI is an edge per event, not auto-masked.
    reg_read(dev, 0, u.IIR_FCR)
    dev.region_write(0, u.RBR_THR, b"r")
    assert fired(efd) == 1
    # Disabling MSI (count 0) stops delivery.
    dev.set_irqs(
        vfio.PCI_MSI_IRQ_INDEX, vfio.IRQ_SET_ACTION_TRIGGER | vfio.IRQ_SET_DATA_NONE, 0, 0, b"", []
    )
    reg_read(dev, 0, u.IIR_FCR)
    dev.region_write(0, u.RBR_THR, b"s")
    assert fired(efd) == 0


# --- reset and migration ------------------------------------------------------------


def test_reset_returns_ports_to_power_on(dual: MttyDevice) -> None:
    for port in (0, 1):
        reg_write(dual, port, u.IIR_FCR, u.FCR_ENABLE_FIFO)
        reg_write(dual, port, u.SCR, 0x44)
        reg_write(dual, port, u.IER, 0x0F)
        for b in b"abc":
            reg_write(dual, port, u.RBR_THR, b)
    assert dual.irq_line
    dual.reset()
    assert not dual.irq_line
    for port in (0, 1):
        assert reg_read(dual, port, u.SCR) == 0
        assert reg_read(dual, port, u.IER) == 0
        assert reg_read(dual, port, u.LSR) == u.LSR_THRE | u.LSR_TEMT
        assert reg_read(dual, port, u.IIR_FCR) == u.IIR_NO_INT


def test_migration_state_roundtrip_and_validation(dual: MttyDevice) -> None:
    assert dual.migration_flags == 0b111  # STOP_COPY | P2P | PRE_COPY
    reg_write(dual, 1, u.IIR_FCR, u.FCR_ENABLE_FIFO | 0x80)
    for b in b"keep me":
        reg_write(dual, 1, u.RBR_THR, b)
    reg_write(dual, 0, u.SCR, 0x99)
    blob = dual.save_state()
    assert blob[:8] == (0x7E9D09898C3E2C4E).to_bytes(8, "little")
    assert int.from_bytes(blob[16:20], "little") == 2

    other = MttyDevice(2)
    other.load_state(blob)
    assert reg_read(other, 0, u.SCR) == 0x99
    assert bytes(reg_read(other, 1, u.RBR_THR) for _ in range(7)) == b"keep me"
    assert other.save_state() != blob  # the reads above drained the FIFO

    single = MttyDevice(1)
    bad_cases = [
        blob[:-1],  # short
        blob + b"\0",  # long
        b"\0" + blob[1:],  # magic
        blob[:8] + (2).to_bytes(4, "little") + blob[12:],  # major version
        blob[:20] + (1).to_bytes(4, "little") + blob[24:],  # flags
    ]
    for bad in bad_cases:
        with pytest.raises(OSError) as e:
            other.load_state(bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        single.load_state(blob)  # two ports into a one-port card
    assert e.value.errno == errno.EINVAL
    # A failed load leaves the device as it was.
    assert reg_read(other, 0, u.SCR) == 0x99


def _set_state(dev: MttyDevice, state: int) -> None:
    flags = vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE
    dev.device_feature(flags, state.to_bytes(4, "little"))


def test_migration_through_the_vfio_state_machine() -> None:
    """Save on one card, resume on another, via DEVICE_FEATURE and MIG_DATA."""
    stop, running, stop_copy, resuming, pre_copy = 1, 2, 3, 4, 6
    src = MttyDevice(2)
    get = vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_MIGRATION
    assert int.from_bytes(src.device_feature(get, b""), "little") == 0b111
    reg_write(src, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO | 0x40)
    reg_write(src, 0, u.IER, u.IER_RDI)
    for b in b"in flight":
        reg_write(src, 0, u.RBR_THR, b)
    reg_write(src, 1, u.SCR, 0x5C)
    _set_state(src, pre_copy)  # PRE_COPY is offered (nothing to send early)
    _set_state(src, stop_copy)
    stream = b""
    while chunk := src.mig_data_read(7):  # odd chunk size on purpose
        stream += chunk
    _set_state(src, stop)

    dst = MttyDevice(2)
    _set_state(dst, resuming)
    for i in range(0, len(stream), 5):
        dst.mig_data_write(stream[i : i + 5])
    _set_state(dst, stop)
    _set_state(dst, running)
    assert reg_read(dst, 1, u.SCR) == 0x5C
    assert reg_read(dst, 0, u.IIR_FCR) == u.IIR_FIFOS_ENABLED | u.IIR_RDI
    assert dst.irq_line
    assert bytes(reg_read(dst, 0, u.RBR_THR) for _ in range(9)) == b"in flight"

    # A truncated stream is refused at RESUMING -> STOP; the device stays put.
    bad = MttyDevice(2)
    _set_state(bad, resuming)
    bad.mig_data_write(stream[:-1])
    with pytest.raises(OSError) as e:
        _set_state(bad, stop)
    assert e.value.errno == errno.EINVAL


def test_switching_msi_to_intx_while_the_line_is_high(dev: MttyDevice) -> None:
    msi_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [msi_fd])
        reg_write(dev, 0, u.IER, u.IER_RDI)
        reg_write(dev, 0, u.RBR_THR, 0x41)  # data waits: line high
        assert fired(msi_fd) == 1
        assert not dev.irqs.intx_level  # no INTx while MSI is in use
        off = vfio.IRQ_SET_ACTION_TRIGGER | vfio.IRQ_SET_DATA_NONE
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, off, 0, 0, b"", [])
        dev.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [intx_fd])
        assert fired(intx_fd) == 1  # the still-high line shows up on INTx
        assert fired(msi_fd) == 0
    finally:
        os.close(msi_fd)
        os.close(intx_fd)

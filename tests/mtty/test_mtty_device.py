"""MttyDevice through the DeviceBackend methods the vfio-user engine calls."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator

import pytest

from mdevcore.samples.mtty import MttyDevice
from mdevcore.samples.mtty import uart as u
from mdevcore.vfio_user import backend as vfio

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
    dev.region_write(0, u.RBR_THR, b"H")
    dev.region_write(0, u.RBR_THR, b"i")
    dev.region_write(0, u.RBR_THR, b"!")
    assert reg_read(dev, 0, u.LSR) & u.LSR_DR
    assert b"".join(dev.region_read(0, u.RBR_THR, 1) for _ in range(3)) == b"Hi!"
    assert reg_read(dev, 0, u.LSR) == u.LSR_THRE | u.LSR_TEMT


def test_wide_accesses_split_as_mtty_c_splits_them(dev: MttyDevice) -> None:
    # A 4-byte write at offset 4 is one write of its low byte to MCR:
    # LSR, MSR and SCR see nothing.
    dev.region_write(0, 4, bytes([0x0B, 0xFF, 0xFF, 0x5A]))
    assert reg_read(dev, 0, u.MCR) == 0x0B
    assert reg_read(dev, 0, u.SCR) == 0
    # Reads: the register in the low byte of each piece, zeroes above.
    assert dev.region_read(0, 4, 4) == bytes([0x0B, 0, 0, 0])
    reg_write(dev, 0, u.SCR, 0x77)
    assert dev.region_read(0, 6, 2) == bytes([0xB3, 0])  # MSR, one access
    assert dev.region_read(0, 5, 3) == bytes([0x60, 0xB3, 0])  # 1 at 5, then 2 at 6
    # 8 bytes at 0 are two accesses: RBR (one byte taken) and MCR.
    dev.region_write(0, u.RBR_THR, b"AB")  # 2 at 0: one byte, "A"
    assert dev.region_read(0, 0, 8) == b"A\0\0\0\x0b\0\0\0"
    assert reg_read(dev, 0, u.LSR) == u.LSR_THRE | u.LSR_TEMT  # "B" never sent
    # Odd offsets go byte by byte: 2 bytes at 1 are IER then FCR.
    dev.region_write(0, 1, bytes([u.IER_RDI, u.FCR_ENABLE_FIFO]))
    assert dev.ports[0].ier == u.IER_RDI
    assert dev.ports[0].s.trigger_level == 1


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
    assert fired(efd) == 0  # nothing received yet
    dual.region_write(0, u.RBR_THR, b"x")  # count reaches the trigger level
    assert fired(efd) == 1
    # Auto-masked: an event on the other port is held...
    reg_write(dual, 1, u.IER, u.IER_THRI)
    assert fired(efd) == 0
    # ...and delivered when the client unmasks.
    dual.set_irqs(vfio.PCI_INTX_IRQ_INDEX, UNMASK, 0, 1, b"", [])
    assert fired(efd) == 1
    # No line level: with "x" still unread and port 1's THRE still showing
    # in IIR, an unmask brings nothing new; only a new event signals.
    dual.set_irqs(vfio.PCI_INTX_IRQ_INDEX, UNMASK, 0, 1, b"", [])
    assert fired(efd) == 0
    assert reg_read(dual, 0, u.IIR_FCR) == 0xC4
    assert reg_read(dual, 1, u.IIR_FCR) == 0xC2
    dual.region_write(0, u.RBR_THR, b"y")  # count 2: above the level, no event
    assert fired(efd) == 0
    reg_write(dual, 1, u.IER, u.IER_THRI)  # every such write is an event
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
    assert reg_read(dev, 0, u.IIR_FCR) == 0xC2  # reading IIR acknowledges nothing
    dev.region_write(0, u.RBR_THR, b"q")  # a THR write raises no THRE event
    assert fired(efd) == 0
    reg_read(dev, 0, u.RBR_THR)  # the read that empties the FIFO does
    assert fired(efd) == 1
    # MSI is one message per event, never masked: MCR with OUT2 and DTR
    # and IER.MSI is two events.
    reg_write(dev, 0, u.IER, u.IER_MSI)
    reg_write(dev, 0, u.MCR, u.MCR_OUT2 | u.MCR_DTR)
    assert fired(efd) == 2
    # Disabling MSI (count 0) stops delivery.
    dev.set_irqs(
        vfio.PCI_MSI_IRQ_INDEX, vfio.IRQ_SET_ACTION_TRIGGER | vfio.IRQ_SET_DATA_NONE, 0, 0, b"", []
    )
    reg_write(dev, 0, u.MCR, u.MCR_OUT2)
    assert fired(efd) == 0


def test_no_interrupt_without_an_eventfd(dev: MttyDevice, efd: int) -> None:
    reg_write(dev, 0, u.IER, u.IER_THRI)  # an event with nothing wired: gone
    dev.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [efd])
    assert fired(efd) == 0
    assert dev.region_read(CONFIG, 0x06, 2) == (0x0200).to_bytes(2, "little")  # no INTx status
    reg_write(dev, 0, u.IER, u.IER_THRI)
    assert fired(efd) == 1


# --- reset and migration ------------------------------------------------------------


def test_switching_msi_to_intx_carries_no_level(dev: MttyDevice) -> None:
    msi_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [msi_fd])
        reg_write(dev, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO)
        reg_write(dev, 0, u.IER, u.IER_RDI)
        reg_write(dev, 0, u.RBR_THR, 0x41)  # data waits: IIR shows it
        assert fired(msi_fd) == 1
        off = vfio.IRQ_SET_ACTION_TRIGGER | vfio.IRQ_SET_DATA_NONE
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, off, 0, 0, b"", [])
        dev.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [intx_fd])
        assert fired(intx_fd) == 0  # an event, not a level: nothing to re-send
        assert reg_read(dev, 0, u.IIR_FCR) == 0xC4
        reg_read(dev, 0, u.RBR_THR)
        reg_write(dev, 0, u.RBR_THR, 0x42)  # the next event goes to INTx
        assert fired(intx_fd) == 1
        assert fired(msi_fd) == 0
    finally:
        dev.disconnected()
        os.close(msi_fd)
        os.close(intx_fd)


def test_reset_keeps_the_ports_as_mtty_c_does(dual: MttyDevice) -> None:
    for port in (0, 1):
        reg_write(dual, port, u.IIR_FCR, u.FCR_ENABLE_FIFO)
        reg_write(dual, port, u.SCR, 0x44)
        reg_write(dual, port, u.IER, 0x0F)
        for b in b"abc":
            reg_write(dual, port, u.RBR_THR, b)
    before = [port.save() for port in dual.ports]
    _set_state(dual, PRE_COPY)
    dual.reset()
    assert dual.mig_state == RUNNING  # the reset's one effect on mtty.c
    assert [port.save() for port in dual.ports] == before
    for port in (0, 1):
        assert reg_read(dual, port, u.SCR) == 0x44
        assert bytes(reg_read(dual, port, u.RBR_THR) for _ in range(3)) == b"abc"


# --- migration ------------------------------------------------------------------

STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = 1, 2, 3, 4, 5, 6, 7
HEADER_SIZE = 24
MAGIC = (0x7E9D09898C3E2C4E).to_bytes(8, "little")


def _set_state(dev: MttyDevice, state: int) -> None:
    flags = vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE
    dev.device_feature(flags, state.to_bytes(4, "little"))


def _read_all(dev: MttyDevice, chunk: int = 7) -> bytes:
    stream = b""
    while data := dev.mig_data_read(chunk):  # odd chunk size on purpose
        stream += data
    return stream


def _data_size(dev: MttyDevice) -> int:
    get = vfio.DEVICE_FEATURE_GET | 9  # MIG_DATA_SIZE
    return int.from_bytes(dev.device_feature(get, b""), "little")


def _header(nr_ports: int, major: int = 1, minor: int = 0, flags: int = 0) -> bytes:
    return MAGIC + b"".join(v.to_bytes(4, "little") for v in (major, minor, nr_ports, flags))


def _busy(dev: MttyDevice) -> None:
    """Ports with state worth keeping: FIFO bytes (one wrapped), overrun, IER..."""
    reg_write(dev, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_RCVR)
    reg_write(dev, 0, u.IER, u.IER_RDI | u.IER_RLSI | u.IER_MSI)
    for b in bytes(range(14)):
        reg_write(dev, 0, u.RBR_THR, b)
    for _ in range(12):
        reg_read(dev, 0, u.RBR_THR)
    for b in b"in flight, lost":  # 2 + 14 fit: the final "t" overruns
        reg_write(dev, 0, u.RBR_THR, b)
    reg_write(dev, 0, u.MCR, u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2 | u.MCR_AFE)
    reg_write(dev, 0, u.LCR, u.LCR_DLAB | 0x03)
    reg_write(dev, 0, u.RBR_THR, 0x0C)
    reg_write(dev, 0, u.LCR, 0x03)
    reg_write(dev, 0, u.SCR, 0x99)
    if dev.nr_ports == 2:
        reg_write(dev, 1, u.IER, u.IER_THRI)
        reg_write(dev, 1, u.RBR_THR, ord("z"))  # power-on FIFO, level 0


def _registers(dev: MttyDevice, port: int) -> list[int]:
    return [reg_read(dev, port, off) for off in (1, 2, 3, 4, 5, 6, 7)]


def test_pre_copy_yields_the_header_and_stop_copy_the_ports(dev: MttyDevice) -> None:
    assert dev.migration_flags == 0b111  # STOP_COPY | P2P | PRE_COPY
    _busy(dev)
    size = HEADER_SIZE + 36 * dev.nr_ports
    assert _data_size(dev) == size  # mtty_get_data_size: header included
    _set_state(dev, PRE_COPY)
    assert _read_all(dev) == _header(dev.nr_ports)
    _set_state(dev, PRE_COPY_P2P)
    assert _read_all(dev) == b""
    _set_state(dev, STOP_COPY)
    ports = _read_all(dev)
    assert ports == b"".join(port.save() for port in dev.ports)
    assert len(ports) == 36 * dev.nr_ports
    _set_state(dev, STOP)


def test_stop_copy_straight_from_stop_yields_the_whole_stream(dev: MttyDevice) -> None:
    _busy(dev)
    # A pre-copy session abandoned (PRE_COPY -> RUNNING) leaves nothing behind.
    _set_state(dev, PRE_COPY)
    _set_state(dev, RUNNING)
    for _ in range(2):
        _set_state(dev, STOP)
        _set_state(dev, STOP_COPY)
        stream = _read_all(dev)
        assert stream == _header(dev.nr_ports) + b"".join(p.save() for p in dev.ports)
    _set_state(dev, STOP)


def test_round_trip_keeps_fifo_contents_and_interrupt_state(dev: MttyDevice) -> None:
    _busy(dev)
    src_regs = [_registers(dev, p) for p in range(dev.nr_ports)]
    _set_state(dev, PRE_COPY)
    stream = _read_all(dev, 5)
    _set_state(dev, STOP_COPY)
    stream += _read_all(dev, 11)
    _set_state(dev, STOP)

    dst = MttyDevice(dev.nr_ports)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        dst.set_irqs(vfio.PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, b"", [efd])
        _set_state(dst, RESUMING)
        for i in range(0, len(stream), 13):
            dst.mig_data_write(stream[i : i + 13])
        _set_state(dst, STOP)
        _set_state(dst, RUNNING)
        assert fired(efd) == 0  # loading raises nothing, as mtty.c
        assert [p.save() for p in dst.ports] == [p.save() for p in dev.ports]
        for p in range(dst.nr_ports):
            assert _registers(dst, p) == src_regs[p]
        # Port 0: overrun and data pending (IIR 0xC6), OE, AFE full FIFO (no CTS).
        assert src_regs[0][1:] == [0xC6, 0x03, 0x2B, 0x03, 0xA2, 0x99]
        assert dst.ports[0].divisor == 0x0C
        assert bytes(reg_read(dst, 0, u.RBR_THR) for _ in range(16)) == b"\x0c\x0din flight, los"
        # Interrupt triggers carry on from the migrated state: the FIFO
        # refills from empty to the trigger level.
        reg_write(dst, 0, u.RBR_THR, 0x41)
        assert fired(efd) == 1
        if dst.nr_ports == 2:
            assert reg_read(dst, 1, u.IIR_FCR) == 0xC1  # "z" waits, no THRE
            assert reg_read(dst, 1, u.RBR_THR) == ord("z")
            assert fired(efd) == 1  # the read that empties it, with IER.THRI
    finally:
        dst.disconnected()
        os.close(efd)


def _refused(dev: MttyDevice, stream: bytes) -> None:
    before = [p.save() for p in dev.ports]
    _set_state(dev, RESUMING)
    if stream:
        dev.mig_data_write(stream)
    with pytest.raises(OSError) as e:
        _set_state(dev, STOP)
    assert e.value.errno == errno.EINVAL
    assert dev.mig_state == RESUMING
    assert [p.save() for p in dev.ports] == before  # unchanged
    dev.reset()  # back to RUNNING for the next case


def test_bad_streams_are_refused_leaving_the_device_unchanged(dev: MttyDevice) -> None:
    src = MttyDevice(dev.nr_ports)
    _busy(src)
    _set_state(src, STOP)
    _set_state(src, STOP_COPY)
    good = _read_all(src)
    header, ports = good[:HEADER_SIZE], good[HEADER_SIZE:]
    reg_write(dev, 0, u.SCR, 0x5C)
    reg_write(dev, 0, u.RBR_THR, 0x21)
    other_ports = 3 - dev.nr_ports
    corrupt_port = bytearray(ports)
    corrupt_port[26] = 17  # port 0's count
    bad_streams = [
        b"",
        ports,  # no header
        header,  # no ports
        good[:-1],  # truncated
        good + b"\0",  # too long
        b"\0" + good[1:],  # magic
        _header(dev.nr_ports, major=2) + ports,
        _header(dev.nr_ports, minor=1) + ports,
        _header(dev.nr_ports, flags=1) + ports,
        _header(other_ports) + ports,  # port count mismatch, right length for neither
        _header(other_ports) + ports[:36] * other_ports,  # the other card's full stream
        header + bytes(corrupt_port),
    ]
    for bad in bad_streams:
        _refused(dev, bad)
    assert reg_read(dev, 0, u.SCR) == 0x5C
    assert reg_read(dev, 0, u.RBR_THR) == 0x21

"""Config space: header, write masks, RW1C, BAR sizing, vendor bytes."""

from __future__ import annotations

import errno

import pytest
from pcitest_helpers import CFG, PlainDevice, cfg_read, cfg_write

from mdevcore.pci import config as cfg
from mdevcore.pci.config import ConfigSpace
from mdevcore.pci.device import BarKind, PciDevice, PciIdentity


def test_header_from_identity() -> None:
    dev = PlainDevice()
    assert cfg_read(dev, cfg.VENDOR_ID, 2) == 0x1234
    assert cfg_read(dev, cfg.DEVICE_ID, 2) == 0x5678
    assert cfg_read(dev, cfg.REVISION_ID, 1) == 3
    assert cfg_read(dev, cfg.CLASS_PROG, 3) == 0xFF0000
    assert cfg_read(dev, cfg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert cfg_read(dev, cfg.SUBSYSTEM_ID, 2) == 0x1100
    assert cfg_read(dev, cfg.INTERRUPT_PIN, 1) == 1
    assert cfg_read(dev, cfg.HEADER_TYPE, 1) == 0
    assert cfg_read(dev, cfg.STATUS, 2) & cfg.STATUS_CAP_LIST


def test_read_only_registers_ignore_writes() -> None:
    dev = PlainDevice()
    cfg_write(dev, cfg.VENDOR_ID, 0xFFFFFFFF, 4)
    cfg_write(dev, cfg.CLASS_PROG, 0x123456, 3)
    cfg_write(dev, cfg.INTERRUPT_PIN, 4, 1)
    cfg_write(dev, cfg.CAPABILITY_LIST, 0x80, 1)
    assert cfg_read(dev, 0, 4) == 0x56781234
    assert cfg_read(dev, cfg.CLASS_PROG, 3) == 0xFF0000
    assert cfg_read(dev, cfg.INTERRUPT_PIN, 1) == 1
    assert cfg_read(dev, cfg.CAPABILITY_LIST, 1) == 0x40


def test_command_register_mask() -> None:
    dev = PlainDevice()
    cfg_write(dev, cfg.COMMAND, 0xFFFF, 2)
    assert cfg_read(dev, cfg.COMMAND, 2) == cfg.COMMAND_WRITABLE
    cfg_write(dev, cfg.COMMAND, 0, 2)
    assert cfg_read(dev, cfg.COMMAND, 2) == 0


def test_interrupt_line_writable() -> None:
    dev = PlainDevice()
    cfg_write(dev, cfg.INTERRUPT_LINE, 0x0B, 1)
    assert cfg_read(dev, cfg.INTERRUPT_LINE, 1) == 0x0B


def test_status_rw1c() -> None:
    space = ConfigSpace()
    space.set(cfg.STATUS, (0x0010).to_bytes(2, "little"), w1c_mask=cfg.STATUS_W1C)
    # The device reports errors: signalled target abort + detected parity error.
    space.update_u16(cfg.STATUS, 0x0010 | (1 << 11) | (1 << 15))
    space.write(cfg.STATUS, (1 << 11).to_bytes(2, "little"))  # clear one
    assert space.get_u16(cfg.STATUS) == 0x0010 | (1 << 15)
    space.write(cfg.STATUS, (0).to_bytes(2, "little"))  # writing 0 keeps bits
    assert space.get_u16(cfg.STATUS) == 0x0010 | (1 << 15)
    space.write(cfg.STATUS, (0xFFFF).to_bytes(2, "little"))  # all ones: RO bit stays
    assert space.get_u16(cfg.STATUS) == 0x0010


def _bar(dev: PciDevice, index: int) -> int:
    return cfg_read(dev, cfg.BAR0 + 4 * index, 4)


def _size_bar(dev: PciDevice, index: int) -> int:
    cfg_write(dev, cfg.BAR0 + 4 * index, 0xFFFFFFFF, 4)
    return _bar(dev, index)


def test_bar_sizing_mem32() -> None:
    dev = PlainDevice()
    assert _bar(dev, 0) == 0
    assert _size_bar(dev, 0) == 0xFFFFF000
    cfg_write(dev, cfg.BAR0, 0xFEB01234, 4)
    assert _bar(dev, 0) == 0xFEB01000  # address bits below the size are zero


def test_bar_sizing_io() -> None:
    dev = PlainDevice()
    assert _bar(dev, 1) == 0x1
    assert _size_bar(dev, 1) == 0xFFFFFFF9  # 8 bytes, bit0 = I/O
    cfg_write(dev, cfg.BAR0 + 4, 0xC040, 4)
    assert _bar(dev, 1) == 0xC041


def test_bar_sizing_mem64_prefetchable() -> None:
    dev = PlainDevice()
    assert _bar(dev, 2) == 0x4 | 0x8  # 64-bit, prefetchable
    assert _size_bar(dev, 2) == 0xFFFFC000 | 0xC
    assert _size_bar(dev, 3) == 0xFFFFFFFF  # upper half: the whole dword
    cfg_write(dev, cfg.BAR0 + 8, 0xE0000000, 4)
    cfg_write(dev, cfg.BAR0 + 12, 0x1, 4)
    assert _bar(dev, 2) == 0xE000000C and _bar(dev, 3) == 1


def test_bar_sizing_large_mem64() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    dev.add_bar(0, 1 << 33, BarKind.MEM64)
    assert _size_bar(dev, 0) == 0x4
    assert _size_bar(dev, 1) == 0xFFFFFFFE


def test_absent_bars_and_rom_read_zero() -> None:
    dev = PlainDevice()
    assert _size_bar(dev, 5) == 0
    cfg_write(dev, cfg.ROM_ADDRESS, 0xFFFFFFFF, 4)
    assert cfg_read(dev, cfg.ROM_ADDRESS, 4) == 0


@pytest.mark.parametrize(
    ("index", "size", "kind"),
    [(6, 0x1000, BarKind.MEM32), (0, 0x1800, BarKind.MEM32), (5, 0x1000, BarKind.MEM64),
     (0, 0x200, BarKind.IO), (0, 2, BarKind.IO)],
)  # fmt: skip
def test_bad_bar_declarations(index: int, size: int, kind: BarKind) -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    with pytest.raises(ValueError):
        dev.add_bar(index, size, kind)


def test_bar_pair_conflicts() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    dev.add_bar(2, 0x1000, BarKind.MEM64)
    with pytest.raises(ValueError):
        dev.add_bar(3, 0x1000)
    with pytest.raises(ValueError):
        dev.add_bar(2, 0x1000)


def test_vendor_bytes_with_mask() -> None:
    dev = PciDevice(PciIdentity(vendor_id=0x4348, device_id=0x3253, class_code=0x070002))
    dev.config.set(0x40, bytes.fromhex("23280000"), writable_mask=0x0000FF00)
    dev.config.set(0x60, b"PCI Serial/UART")
    assert dev.region_read(CFG, 0x60, 15) == b"PCI Serial/UART"
    cfg_write(dev, 0x40, 0xFFFFFFFF, 4)
    assert cfg_read(dev, 0x40, 4) == 0x0000FF23
    # Capabilities are never placed over vendor bytes.
    off = dev.add_pm()
    assert not 0x40 <= off < 0x44 and not 0x60 <= off < 0x6F


def test_config_access_bounds() -> None:
    dev = PlainDevice()
    assert dev.region_info(CFG).size == 256
    for offset, count in ((256, 1), (255, 2), (-1, 1), (0, 257)):
        with pytest.raises(OSError) as info:
            dev.region_read(CFG, offset, count)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        dev.region_write(CFG, 254, b"\0\0\0\0")
    assert info.value.errno == errno.EINVAL
    assert dev.region_read(CFG, 252, 4) == bytes(4)


def test_unaligned_and_byte_writes_honour_masks() -> None:
    dev = PlainDevice()
    # A 2-byte write straddling BAR0's low flag byte and its address bits.
    dev.region_write(CFG, cfg.BAR0 + 1, b"\xff\xff")
    assert _bar(dev, 0) == 0x00FFF000

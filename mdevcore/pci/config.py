"""PCI configuration space: bytes plus per-bit write behaviour.

Every byte carries two masks: ``wmask`` (bits a guest write may change) and
``w1cmask`` (bits a guest write of 1 clears, e.g. status error bits).  Bits
in neither mask are read-only to the guest.  The device itself changes
registers with :meth:`ConfigSpace.set` (which also defines the power-on
default and the masks) or :meth:`ConfigSpace.update` (a runtime change that
a reset undoes).
"""

from __future__ import annotations

import errno

# Standard header offsets (type 0).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR
) | COMMAND_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# Error bits software clears by writing 1: master data parity error,
# signalled/received target abort, received master abort, signalled system
# error, detected parity error.
STATUS_W1C = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)

CONFIG_SPACE_SIZE = 256
CONFIG_SPACE_EXP_SIZE = 4096
HEADER_SIZE = 0x40


def _mask_bytes(mask: bytes | int | None, length: int) -> bytes:
    if mask is None:
        return bytes(length)
    if isinstance(mask, int):
        return (mask & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
    if len(mask) != length:
        raise ValueError(f"mask is {len(mask)} bytes, data {length}")
    return bytes(mask)


class ConfigSpace:
    """256 bytes (or 4 KiB for PCI Express) with per-bit write masks."""

    def __init__(self, size: int = CONFIG_SPACE_SIZE) -> None:
        if size not in (CONFIG_SPACE_SIZE, CONFIG_SPACE_EXP_SIZE):
            raise ValueError(f"config space size {size} is neither 256 nor 4096")
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.defaults = bytearray(size)
        # Bytes beyond the header claimed by set() or a capability, so the
        # capability allocator never places a capability over vendor bytes.
        self.claimed = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def raw(self) -> bytearray:
        """The live bytes (no masks applied); for the device's own use."""
        return self.data

    def grow(self, size: int) -> None:
        """Extend to ``size`` bytes (256 -> 4096 when PCI Express is added)."""
        if size < self.size:
            raise ValueError("config space cannot shrink")
        extra = size - self.size
        for buf in (self.data, self.wmask, self.w1cmask, self.defaults, self.claimed):
            buf.extend(bytes(extra))

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(
                errno.EINVAL, f"config access {offset:#x}+{length} outside {self.size} bytes"
            )

    # --- guest side ------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write: only writable bits change, W1C bits clear on 1."""
        self._check(offset, len(data))
        for i, value in enumerate(data):
            pos = offset + i
            old = self.data[pos]
            wmask = self.wmask[pos]
            new = (old & ~wmask) | (value & wmask)
            new &= ~(value & self.w1cmask[pos])
            self.data[pos] = new & 0xFF

    # --- device side -----------------------------------------------------

    def set(
        self,
        offset: int,
        data: bytes,
        writable_mask: bytes | int | None = None,
        *,
        w1c_mask: bytes | int | None = None,
    ) -> None:
        """Define bytes at ``offset``: value, power-on default and write masks.

        ``writable_mask`` (bytes of the same length, or an int read little
        endian) marks guest-writable bits; default read-only.
        """
        self._check(offset, len(data))
        end = offset + len(data)
        self.data[offset:end] = data
        self.defaults[offset:end] = data
        self.wmask[offset:end] = _mask_bytes(writable_mask, len(data))
        self.w1cmask[offset:end] = _mask_bytes(w1c_mask, len(data))
        if end > HEADER_SIZE:
            start = max(offset, HEADER_SIZE)
            self.claimed[start:end] = b"\x01" * (end - start)

    def update(self, offset: int, data: bytes) -> None:
        """Change live bytes regardless of masks (a reset restores the default)."""
        self._check(offset, len(data))
        self.data[offset : offset + len(data)] = data

    def reset(self, keep: tuple[tuple[int, int], ...] = ()) -> None:
        """Back to power-on values, except the (offset, length) ranges in ``keep``."""
        kept = [(off, bytes(self.data[off : off + n])) for off, n in keep]
        self.data[:] = self.defaults
        for off, value in kept:
            self.data[off : off + len(value)] = value

    # --- typed helpers ---------------------------------------------------

    def get_u8(self, offset: int) -> int:
        return self.data[offset]

    def get_u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 2], "little")

    def get_u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 4], "little")

    def update_u16(self, offset: int, value: int) -> None:
        self.update(offset, value.to_bytes(2, "little"))

    def is_free(self, offset: int, length: int) -> bool:
        """True when no set()/capability bytes lie in [offset, offset+length)."""
        if offset < HEADER_SIZE or offset + length > self.size:
            return False
        return not any(self.claimed[offset : offset + length])

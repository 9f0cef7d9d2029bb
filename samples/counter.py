"""A tiny example device: one 32-bit counter register and an interrupt.

BAR0 (4 KiB, memory):
  0x00  VALUE   read: the counter; write: set it and raise an interrupt
  0x04  INCR    write n: add n to the counter and raise an interrupt
  0x08  MAGIC   read-only 0x434e5452 ("CNTR")
The interrupt is MSI vector 0 when the guest enabled MSI, else INTA.

It is migratable (STOP_COPY): the state is a version byte and the counter.

Run it standalone and attach QEMU (>= 10.1)::

    python -m mdevcore.samples.counter --socket /tmp/counter.sock
    qemu-system-x86_64 ... -device vfio-user-pci,socket=/tmp/counter.sock
"""

from __future__ import annotations

import argparse
import errno
import logging
import struct
import sys
from functools import partial

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.pci.migration import MIGRATION_STOP_COPY

REG_VALUE = 0x00
REG_INCR = 0x04
REG_MAGIC = 0x08
MAGIC = 0x434E5452
STATE_VERSION = 1


class Counter(PciDevice):
    migration_flags = MIGRATION_STOP_COPY

    def __init__(self) -> None:
        super().__init__(
            PciIdentity(vendor_id=0x1234, device_id=0x0001, class_code=0xFF0000, revision=1)
        )
        self.add_bar(0, 0x1000, BarKind.MEM32)
        self.add_pm()
        self.add_msi(vectors=1)
        self.value = 0

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        # Registers are 32 bits; narrower reads see their low bytes.
        reg, shift = offset & ~3, offset & 3
        word = {REG_VALUE: self.value, REG_MAGIC: MAGIC}.get(reg, 0)
        return (word >> (8 * shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == REG_VALUE:
            self.value = value & 0xFFFFFFFF
        elif offset == REG_INCR:
            self.value = (self.value + value) & 0xFFFFFFFF
        else:
            return  # unknown registers ignore writes, as hardware does
        self.raise_irq(0)

    def on_reset(self) -> None:
        self.value = 0

    def save_state(self) -> bytes:
        return struct.pack("<BI", STATE_VERSION, self.value)

    def load_state(self, data: bytes) -> None:
        if len(data) != 5 or data[0] != STATE_VERSION:
            raise OSError(errno.EINVAL, "not a counter state")
        (self.value,) = struct.unpack_from("<I", data, 1)


def main(argv: list[str] | None = None) -> int:
    import trio

    from mdevcore.vfio_user.server import serve_forever

    parser = argparse.ArgumentParser(prog="python -m mdevcore.samples.counter", description=__doc__)
    parser.add_argument("--socket", required=True, help="UNIX socket path to listen on")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    trio.run(partial(serve_forever, Counter(), args.socket, name="counter"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

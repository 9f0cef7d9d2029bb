"""What the NVMe workload wrote where: recomputable block patterns and a journal.

Every block the workload writes is a pure function of (seed, generation,
LBA): 32-byte units of ``LBA, generation, seed`` plus a keyed hash of the
three, repeated to fill the block.  The journal therefore only keeps, per
LBA, the generation of the last completed write (0: never written by this
workload, content unknown), and a block read back can say what it holds
(which LBA and generation) when it is not what was expected.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
import zlib

_UNIT_HEAD = struct.Struct("<QII")  # lba, generation, seed (low 32 bits)
UNIT = 32  # bytes: the 16-byte head and a 16-byte hash
MAX_GENERATION = (1 << 32) - 1


def block(seed: int, generation: int, lba: int, lba_size: int) -> bytes:
    """The bytes the workload writes to ``lba`` in write number ``generation``."""
    head = _UNIT_HEAD.pack(lba, generation, seed & 0xFFFFFFFF)
    digest = hashlib.blake2b(head, digest_size=16, key=seed.to_bytes(8, "little")).digest()
    return (head + digest) * (lba_size // UNIT)


def describe(data: bytes | memoryview) -> str:
    """What a block that failed the comparison seems to hold (for the report)."""
    lba, generation, seed = _UNIT_HEAD.unpack_from(data)
    if not any(data):
        return "zeroes"
    return f"LBA {lba} generation {generation} seed {seed:#x} (first unit)"


class Journal:
    """The generation of the last completed write of each LBA in [first, first+count)."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self.generations = array.array("I", bytes(4 * count))

    def __getitem__(self, lba: int) -> int:
        return self.generations[lba - self.first]

    def record(self, slba: int, nlb: int, generation: int) -> None:
        start = slba - self.first
        self.generations[start : start + nlb] = array.array("I", [generation]) * nlb

    def written(self) -> int:
        """How many LBAs hold a known pattern."""
        return self.count - self.generations.count(0)

    def to_bytes(self) -> bytes:
        """Little-endian u32 generations, compressed (sparse journals shrink to little)."""
        generations = self.generations
        if sys.byteorder == "big":
            generations = array.array("I", generations)
            generations.byteswap()
        return zlib.compress(generations.tobytes(), 1)

    @classmethod
    def from_bytes(cls, first: int, count: int, data: bytes) -> Journal:
        journal = cls(first, count)
        # Bounded decompression: a stream cannot make us allocate beyond the journal.
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, 4 * count)
        if len(raw) != 4 * count or inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("journal does not match its LBA range")
        journal.generations = array.array("I", raw)
        if sys.byteorder == "big":
            journal.generations.byteswap()
        return journal

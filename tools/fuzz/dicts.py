"""libFuzzer dictionaries: the tokens of a target's input format.

Byte mutation rarely spells a valid command number, a header with a
matching size or a capability name; a dictionary hands libFuzzer those
tokens to splice in.  They are built from the project's own constants at
run time (``python -m mdevcore.tools.fuzz`` writes ``TARGET.dict`` into its work
directory), so they follow the protocol definitions instead of going stale
in a checked-in file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.constants import FLAG_NO_REPLY, HEADER_SIZE, Command
from mdevcore.vfio_user.wire import HEADER


def _engine() -> list[bytes]:
    tokens: list[bytes] = []
    for command in Command:
        tokens.append(struct.pack("<H", command))
        # A whole header of this command with an empty body, and one asking
        # for no reply: the framer accepts these, so the engine's handlers
        # (not the framer) see what follows.
        tokens.append(HEADER.pack(0, command, HEADER_SIZE, 0, 0))
        tokens.append(HEADER.pack(0, command, HEADER_SIZE, FLAG_NO_REPLY, 0))
    for feature in (
        vfio.DEVICE_FEATURE_MIGRATION,
        vfio.DEVICE_FEATURE_MIG_DEVICE_STATE,
        vfio.DEVICE_FEATURE_DMA_LOGGING_START,
        vfio.DEVICE_FEATURE_DMA_LOGGING_STOP,
        vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT,
    ):
        for op in (vfio.DEVICE_FEATURE_GET, vfio.DEVICE_FEATURE_SET, vfio.DEVICE_FEATURE_PROBE):
            tokens.append(struct.pack("<I", feature | op))
    for flag in (
        vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE,
        vfio.DMA_UNMAP_FLAG_ALL,
        vfio.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    ):
        tokens.append(struct.pack("<I", flag))
    for index in range(vfio.PCI_NUM_IRQS):
        tokens.append(struct.pack("<I", index))
    # Config-space offsets a guest touches: command, BAR0, capability
    # pointer, and the 4 KiB page size the server offers.
    for value in (0x04, 0x10, 0x34, 0x1000):
        tokens.append(struct.pack("<Q", value))
    for word in (
        b'"capabilities"',
        b'"max_msg_fds"',
        b'"max_data_xfer_size"',
        b'"migration"',
        b'"pgsize"',
        b'"max_dma_maps"',
        b'"pgsizes"',
        b'"twin_socket"',
    ):
        tokens.append(word)
    return tokens


BUILDERS: dict[str, Callable[[], list[bytes]]] = {"engine": _engine}


def write(target: str, path: str) -> bool:
    """Write ``target``'s dictionary to ``path``; False when it has none."""
    builder = BUILDERS.get(target)
    if builder is None:
        return False
    lines = []
    for n, token in enumerate(builder()):
        escaped = "".join(f"\\x{b:02x}" for b in token)
        lines.append(f'tok{n}="{escaped}"')
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return True

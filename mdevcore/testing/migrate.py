"""Move a device's state to another instance the way a VMM does (migration v2).

For parent authors' tests of ``save_state``/``load_state``: the source
goes to STOP_COPY and its stream is read to the end, the destination goes
RESUMING, gets the stream, then RUNNING; the source ends in STOP.  The
full live-migration tool (pre-copy, dirty pages, between hosts) is
``mdevcore.migration``.
"""

from __future__ import annotations

import struct

from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_MIG_DEVICE_STATE,
    DEVICE_FEATURE_SET,
)
from mdevcore.vfio_user.client import Client

CHUNK = 64 << 10


def set_state(client: Client, state: MigState) -> None:
    """MIG_DEVICE_STATE SET (the device walks the FSM to ``state``)."""
    flags = DEVICE_FEATURE_SET | DEVICE_FEATURE_MIG_DEVICE_STATE
    client.device_feature(flags, struct.pack("<Ii", state, -1))


def migrate(src: Client, dst: Client) -> bytes:
    """Move the device state from ``src`` to ``dst``; returns the stream moved."""
    set_state(src, MigState.STOP_COPY)
    stream = bytearray()
    while chunk := src.mig_data_read(CHUNK):
        stream += chunk
    set_state(dst, MigState.RESUMING)
    for start in range(0, len(stream), CHUNK):
        dst.mig_data_write(bytes(stream[start : start + CHUNK]))
    set_state(dst, MigState.RUNNING)
    set_state(src, MigState.STOP)
    return bytes(stream)

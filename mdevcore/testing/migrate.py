"""Move a device's state to another instance the way a VMM does (migration v2).

For parent authors' tests of ``save_state``/``load_state``: the source
goes to STOP_COPY and its stream is read to the end, the destination goes
RESUMING, gets the stream, then RUNNING; the source ends in STOP.  The
steps are ``mdevcore.migration.device.MigrationDevice``'s, one arc at a
time; the full live-migration tool (pre-copy, dirty pages, between hosts) is
``mdevcore.migration``.
"""

from __future__ import annotations

from mdevcore.migration.device import MigrationDevice
from mdevcore.pci.mig_session import MAX_MIGRATION_BYTES
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.client import Client


def migrate(src: Client, dst: Client) -> bytes:
    """Move the device state from ``src`` to ``dst``; returns the stream moved."""
    source, dest = MigrationDevice(src, name="source"), MigrationDevice(dst, name="destination")
    source.walk(MigState.STOP_COPY)
    stream = b"".join(source.read_to_end(MAX_MIGRATION_BYTES))
    dest.walk(MigState.RESUMING)
    dest.write(stream)
    dest.walk(MigState.RUNNING)
    source.walk(MigState.STOP)
    return stream

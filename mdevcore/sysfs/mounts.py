"""Finding and clearing mirror mounts via /proc/mounts (no FUSE library needed).

Kept apart from ``fuse`` so light commands (``mdevd mdevctl``) need not
load pyfuse3 and trio.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SUBTYPE = "mdevd"  # /proc/mounts shows the mirror as type fuse.mdevd
MNT_DETACH = 2  # umount2 flag: lazy unmount


def _mount_type(mountpoint: Path | str) -> str | None:
    """The filesystem type /proc/mounts gives for ``mountpoint``, if mounted."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == target:
                found = fields[2]  # the last one listed is the one on top
    return found


def clear_stale_mount(mountpoint: Path) -> bool:
    """Detach a mirror left behind by an mdevd that died (ENOTCONN on stat).

    Only our own filesystem type is touched; returns whether one was removed.
    """
    if _mount_type(mountpoint) != f"fuse.{SUBTYPE}":
        return False
    try:
        os.stat(mountpoint)
        return False  # alive: some mdevd serves it
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(os.path.realpath(mountpoint)), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach the stale mirror at {mountpoint}: {os.strerror(err)}")
    log.warning("detached a stale mirror at %s (left by an mdevd that died)", mountpoint)
    return True


def is_mounted(mountpoint: Path | str) -> bool:
    """Whether /proc/mounts lists ``mountpoint`` (works when stat would hang)."""
    return _mount_type(mountpoint) is not None

"""Force Unit Access: a FUA write is on stable storage before its completion is posted.

fdatasync is observed by wrapping the real one: each call records the file
it synced and whether the command's completion was already in the CQ.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from nvme_host import PAGE, Host, status
from test_nvme_io import rw

from mdevcore.nvme.nvm import MEDIA_WRITE_FAULT, RW_FUA
from mdevcore.nvme.queues import Completion
from mdevcore.nvme.spec import IoOpcode, StatusType


def observe_syncs(monkeypatch: pytest.MonkeyPatch, host: Host) -> list[tuple[int, bool]]:
    """(inode, completion already posted) for every fdatasync from now on."""
    synced: list[tuple[int, bool]] = []
    real = os.fdatasync
    q = host.queues[1]

    def fdatasync(fd: int) -> None:
        slot = Completion.decode(host.mem.read(q.cq + q.cq_head * 16, 16))
        synced.append((os.fstat(fd).st_ino, slot.phase == q.phase))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return synced


def test_fua_write_is_synced_before_it_completes(
    io_host: Host, backing: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = io_host.mem.alloc(PAGE)
    io_host.mem.write(src, b"\x22" * PAGE)
    synced = observe_syncs(monkeypatch, io_host)
    # the volatile write cache is on: a plain write is not synced...
    assert io_host.command(1, rw(IoOpcode.WRITE, 0, 8, src)).status == 0
    assert synced == []
    # ...a FUA write is, before its completion exists
    assert io_host.command(1, rw(IoOpcode.WRITE, 8, 8, src, extra=RW_FUA)).status == 0
    assert synced == [(backing.stat().st_ino, False)]
    # so is a FUA Write Zeroes
    assert io_host.command(1, rw(IoOpcode.WRITE_ZEROES, 16, 8, 0, extra=RW_FUA)).status == 0
    assert synced[1:] == [(backing.stat().st_ino, False)]


def test_fua_write_whose_sync_fails_is_not_reported_done(
    io_host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    src = io_host.mem.alloc(PAGE)
    monkeypatch.setattr(os, "fdatasync", failing)
    assert io_host.command(1, rw(IoOpcode.WRITE, 0, 8, src)).status == 0  # cached: no sync
    cqe = io_host.command(1, rw(IoOpcode.WRITE, 0, 8, src, extra=RW_FUA))
    assert cqe.status & 0x7FF == status(StatusType.MEDIA, MEDIA_WRITE_FAULT, dnr=False)

"""The pds VF's threads: its eventfd wake-up and its mmap doorbell poller.

Served on a connection thread (the default ``io="thread"``) an mmap VF
polls its doorbells from a thread of its own; served by trio it keeps its
trio loop.  Either way the VF may be closed while served (device removal)
and its task must still end when cancelled: a poller blocked on a closed
eventfd would hang the daemon's shutdown.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
import trio

from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.parents.pds.wakeup import Wakeup
from mdevcore.vfio_user.server import DeviceServer


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pdst-")  # short: UNIX socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_wakeup_set_from_another_thread_wakes_a_trio_task() -> None:
    wake = Wakeup()
    try:
        assert await wake.wait(0.01) is False  # nothing set: times out
        thread = threading.Thread(target=wake.set)
        with trio.fail_after(5):
            thread.start()
            assert await wake.wait() is True
        thread.join()
        assert wake.clear() is False  # the wait drained it
    finally:
        wake.close()
    wake.set()  # after close: a no-op, not an error on a stale fd


@pytest.mark.parametrize("io", ["thread", "trio"])
async def test_mmap_vf_closed_while_served_still_stops(workdir: str, io: str) -> None:
    vf = PdsNvmeVf(
        VfConfig(
            backing=os.path.join(workdir, "vf.img"),
            size=1 << 20,
            doorbells=DoorbellMode.MMAP,
            io_queues=2,
        )
    )
    path = os.path.join(workdir, "vf.sock")
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(DeviceServer(vf, path, name="pds-vf", io=io).serve)
                for _ in range(200):
                    if vf._polling:
                        break
                    await trio.sleep(0.01)
                # The poller thread only where every other access holds the lock.
                assert vf._polling is (io == "thread")
                vf.close()  # removal while the task (and its thread) runs
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert vf._polling is False
    finally:
        vf.close()

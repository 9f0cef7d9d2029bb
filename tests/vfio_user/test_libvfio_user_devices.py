"""The project's other devices over both transports, answers compared.

- the pds NVMe VF: the whole driver session of tests/nvme/test_pds_vf.py
  (config space and capabilities, BAR0 with trapped or mmapped doorbells,
  guest memory mapped by fd, MSI-X eventfds, admin and I/O queues, data
  written through to the backing file, reset) served natively and through
  libvfio-user must give the same result;
- the counter sample: registers, its interrupt (INTx) and its STOP_COPY
  state carried from a libvfio-user-served counter to a native one.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from libvfio_user_pair import Served, in_thread, needs_libvfio_user, serve_pair

from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.samples.counter import MAGIC, REG_INCR, REG_MAGIC, REG_VALUE, Counter
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nvme"))
from test_pds_vf import NS_BYTES, guest_session  # noqa: E402

pytestmark = needs_libvfio_user


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="lvu-")  # short: UNIX socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("mode", [DoorbellMode.TRAPPED, DoorbellMode.MMAP])
async def test_pds_nvme_vf_session_is_the_same_on_both(workdir: str, mode: DoorbellMode) -> None:
    made: list[str] = []

    def make() -> PdsNvmeVf:
        backing = os.path.join(workdir, f"vf{len(made)}.img")
        made.append(backing)
        return PdsNvmeVf(VfConfig(backing=backing, size=NS_BYTES, doorbells=mode, io_queues=4))

    results: list[dict[str, object]] = []
    async with serve_pair(make, workdir) as pair:
        for served, backing in zip(pair, made, strict=True):
            session = await trio.to_thread.run_sync(guest_session, served.path, Path(backing), mode)
            results.append(session)
            assert not served.device.controller.sqs  # the reset dropped the queues
    native, lvu = results
    assert native["statuses"] == [0] * 7 and native["readback_ok"] and native["file_ok"]
    interrupts = (native.pop("interrupts"), lvu.pop("interrupts"))
    assert all(isinstance(n, int) and n > 0 for n in interrupts), interrupts
    assert lvu == native


def counter_session(c: Client, efd: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c.negotiate()
    c.set_irqs(
        vfio.PCI_INTX_IRQ_INDEX,
        vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        fds=[efd],
    )
    out["magic"] = struct.unpack("<I", c.region_read(0, REG_MAGIC, 4))[0]
    c.region_write(0, REG_VALUE, struct.pack("<I", 40))
    c.region_write(0, REG_INCR, struct.pack("<I", 2))
    out["value"] = struct.unpack("<I", c.region_read(0, REG_VALUE, 4))[0]
    out["narrow"] = c.region_read(0, REG_VALUE + 1, 2).hex()
    out["interrupt"] = os.eventfd_read(efd)
    return out


async def test_counter_on_both_and_its_state_across(workdir: str) -> None:
    set_state = vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE

    def go(native: Served, lvu: Served) -> None:
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        try:
            with Client(native.path) as n, Client(lvu.path) as v:
                a, b = counter_session(n, efds[0]), counter_session(v, efds[1])
                assert a == b == {"magic": MAGIC, "value": 42, "narrow": "0000", "interrupt": 1}
                v.region_write(0, REG_VALUE, struct.pack("<I", 0x1234))
                v.device_feature(set_state, struct.pack("<II", 3, 0))  # STOP_COPY
                stream = v.mig_data_read(64)
                assert v.mig_data_read(64) == b""
                n.device_feature(set_state, struct.pack("<II", 4, 0))  # RESUMING
                n.mig_data_write(stream)
                n.device_feature(set_state, struct.pack("<II", 2, 0))  # RUNNING
                assert struct.unpack("<I", n.region_read(0, REG_VALUE, 4))[0] == 0x1234
        finally:
            for fd in efds:
                os.close(fd)

    async with serve_pair(Counter, workdir) as (native, lvu):
        await in_thread(lambda: go(native, lvu))

"""A client flooding its device with bad requests: counted, logged briefly, shown to operators."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from mdevd_proc import MDEVD, Mdevd, sh

from mdevcore.vfio_user.client import Client, VfioUserError
from mdevcore.vfio_user.constants import FLAG_NO_REPLY, Command
from mdevcore.vfio_user.stats import LOG_BURST
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

T2 = "devices/virtual/pool/pool/mdev_supported_types/pool-2"
FLOOD = 5000  # of each of two kinds

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


def mdevd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MDEVD, *args], capture_output=True, text=True, check=False, timeout=60)


def flood() -> bytes:
    bad_write = REGION_ACCESS.pack(0, 99, 4) + b"abcd"  # no region 99: EINVAL
    one = HEADER.pack(1, Command.REGION_WRITE, 16 + len(bad_write), FLAG_NO_REPLY, 0) + bad_write
    one += HEADER.pack(2, 99, 16, FLAG_NO_REPLY, 0)  # no command 99: EINVAL
    return one * FLOOD


def status_json(d: Mdevd) -> dict[str, dict[str, object]]:
    r = mdevd("status", "--run-dir", str(d.run_dir), "--json")
    assert r.returncode == 0, r.stderr
    return {str(dev["name"]): dev for dev in json.loads(r.stdout)}


@pytest.mark.parametrize("io", ["thread", "trio"])
def test_flood_is_counted_logged_briefly_and_shown(tmp_path: Path, io: str) -> None:
    d = Mdevd(tmp_path, "--io", io)
    try:
        flooded, quiet = str(uuid.uuid4()), str(uuid.uuid4())
        r = sh(f"echo {flooded} > {T2}/create && echo {quiet} > {T2}/create", d.sysfs)
        assert r.returncode == 0, r.stderr
        errors_attr = d.sysfs / "bus/mdev/devices" / flooded / "vfio_user/errors"
        assert errors_attr.read_text() == "total 0\n"
        with Client(d.run_dir / f"{flooded}.sock") as client:
            client.negotiate()
            client.sock.sendall(flood())
            with pytest.raises(VfioUserError) as info:
                client.region_read(98, 0, 4)  # answered after the whole flood
            assert info.value.errno == 22
            assert errors_attr.read_text() == (
                f"EINVAL REGION_READ 1\nEINVAL REGION_WRITE {FLOOD}\n"
                f"EINVAL UNKNOWN {FLOOD}\ntotal {2 * FLOOD + 1}\n"
            )
            r = mdevd("status", "--run-dir", str(d.run_dir))
            assert r.returncode == 0, r.stderr
            text = r.stdout
            assert f"mdev {flooded} (pool-2)\n  socket    {d.run_dir}/{flooded}.sock\n" in text
            assert f"  state     serving, client connected (mdev {flooded} (pool-2)#1)\n" in text
            assert f"  requests  {2 * FLOOD + 2} from 1 clients\n" in text  # + VERSION
            assert f"  errors    {2 * FLOOD + 1}\n    EINVAL REGION_READ 1\n" in text
            assert f"mdev {quiet} (pool-2)\n" in text
            assert "  state     serving, no client\n  requests  0 from 0 clients\n" in text
        # the client is gone; its counters stay
        deadline = time.monotonic() + 10
        while status_json(d)[flooded]["connected"] and time.monotonic() < deadline:
            time.sleep(0.05)
        devices = status_json(d)
        assert devices[flooded]["connected"] is False
        assert devices[flooded]["io"] == io  # the pool device allows a thread
        assert devices[flooded]["errors"] == {
            "EINVAL REGION_READ": 1,
            "EINVAL REGION_WRITE": FLOOD,
            "EINVAL UNKNOWN": FLOOD,
        }
        assert devices[quiet]["errors"] == {}
    finally:
        assert d.stop() == 0
    log = d.stderr
    # 10001 failures, a few lines: the first of each kind, then one summary each
    failed_lines = [line for line in log.splitlines() if "failed: EINVAL" in line]
    assert len(failed_lines) == 2 * LOG_BURST + 1, log[-2000:]
    assert f"EINVAL REGION_WRITE: {FLOOD - LOG_BURST} more suppressed" in log
    assert f"EINVAL UNKNOWN: {FLOOD - LOG_BURST} more suppressed" in log


def test_status_without_a_daemon(tmp_path: Path) -> None:
    r = mdevd("status", "--run-dir", str(tmp_path))
    assert r.returncode == 1
    assert f"mdevd status: cannot reach mdevd at {tmp_path}/mdevd.ctl" in r.stderr

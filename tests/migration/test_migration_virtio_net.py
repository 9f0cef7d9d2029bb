"""virtio-net live migration between two real ``mdevd serve`` processes, under traffic.

Each daemon hosts an IFCVF card whose VF 0 (same MAC on both) has a TAP
in one network namespace; a bridge there holds both TAPs and answers
pings at 10.79.0.1, the switch a migrated guest stays behind.  The
virtio_net workload drives the VF as a guest's virtio_net would (rings
in the tool's guest memory), pings with numbered payloads and moves
back and forth between the daemons; afterwards every request is
answered or was in flight at a switch-over, no reply is corrupted,
duplicated or unknown, no TX chain is stuck, every RX buffer is
reposted and the rings' indices in guest memory are the driver's.
The same runs once through ``mdevd migrate`` (the CLI), whose report
gives the downtime.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mdevd_proc import MDEVD, Mdevd, sh
from mig_served import short_dir

from mdevcore.migration.arcs import State
from mdevcore.migration.sender import Options
from mdevcore.migration.session import Endpoint, continue_on, migrate_local
from mdevcore.migration.workload import create
from mdevcore.migration.workloads import virtio_net_frames as frames
from mdevcore.migration.workloads.virtio_net import PEER, VirtioNetWorkload
from mdevcore.testing.netns import needs_netns, netns, run_in

pytestmark = [
    needs_netns,
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse"),
]

PF, VF0 = "0000:61:00.0", "0000:61:00.1"
MAC = "02:1f:c0:79:00:02"
MEM = 4 << 20
FAST = Options(max_rounds=3, round_seconds=0.02, dirty_target=0)


class IfcvfDaemon:
    """``mdevd serve`` with one TAP VF bound to ifcvf_vfio; ``path`` is its socket."""

    def __init__(self, base: Path, ns: str, tap: str) -> None:
        opts = ["total_vfs=1", "backend=tap", f"tap={tap}", f"netns={ns}", f"macs={MAC}"]
        args = [a for o in opts for a in ("--parent-opt", f"ifcvf.{o}")]
        base.mkdir()
        self.proc = Mdevd(base, "--no-parent", "pds", "--no-parent", "mtty", *args, builtins=True)
        pf = f"bus/pci/devices/{PF}"
        r = sh(
            f"echo 0 > {pf}/sriov_drivers_autoprobe && echo 1 > {pf}/sriov_numvfs && "
            f"echo ifcvf_vfio > bus/pci/devices/{VF0}/driver_override && "
            f"echo {VF0} > bus/pci/drivers/ifcvf_vfio/bind",
            self.proc.sysfs,
        )
        if r.returncode:
            self.proc.stop()
            raise RuntimeError(r.stderr + self.proc.stderr)
        self.path = self.proc.run_dir / f"{VF0}.sock"

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def daemons() -> Iterator[tuple[IfcvfDaemon, IfcvfDaemon]]:
    with netns("mgvn") as ns, short_dir("mvn-") as base:
        a = IfcvfDaemon(base / "a", ns, "mva%d")
        try:
            b = IfcvfDaemon(base / "b", ns, "mvb%d")
            try:
                run_in(ns, "ip", "link", "add", "br0", "type", "bridge")
                for dev in ("mva0", "mvb0"):
                    run_in(ns, "ip", "link", "set", dev, "master", "br0")
                    run_in(ns, "ip", "link", "set", dev, "up")
                run_in(ns, "ip", "addr", "add", f"{PEER}/24", "dev", "br0")
                run_in(ns, "ip", "link", "set", "br0", "up")
                yield a, b
            finally:
                b.stop()
        finally:
            a.stop()


def test_pings_survive_migrations_back_and_forth(
    daemons: tuple[IfcvfDaemon, IfcvfDaemon],
) -> None:
    paths = [d.path for d in daemons]
    here = Endpoint(paths[0], MEM, name="A")
    wl = create("virtio_net")
    assert isinstance(wl, VirtioNetWorkload)
    downtimes: list[float] = []
    try:
        wl.start(here.client, here.mem)
        wl.run_for(0.3)
        for i in range(6):
            there = Endpoint(paths[(i + 1) % 2], MEM, name="AB"[(i + 1) % 2])
            report, receiver = migrate_local(here, there, wl, options=FAST)
            assert report.ok, report.error
            assert report.device_bytes > 0
            assert here.dev.state() == State.STOP
            downtimes.append(report.downtime_seconds)
            wl.close()
            here.close()
            restored = continue_on(receiver, there)
            assert isinstance(restored, VirtioNetWorkload)
            wl, here = restored, there
            wl.run_for(0.3)
        wl.verify()
        stats = wl.stats()
        print("virtio_net workload:", stats, "downtimes (s):", [round(d, 4) for d in downtimes])
        assert stats["restores"] == 6 and stats["mismatches"] == 0
        assert stats["answered"] > 200 and stats["in_flight_at_quiesce"] > 0
        assert stats["corrupted"] == stats["duplicates"] == stats["unknown"] == 0
        assert stats["lost_at_migration"] <= stats["in_flight_at_quiesce"]
    finally:
        wl.close()
        here.close()


@contextmanager
def started(daemon: IfcvfDaemon, seconds: float) -> Iterator[VirtioNetWorkload]:
    """The virtio_net workload on ``daemon``'s VF, run for ``seconds``; closed after."""
    ep = Endpoint(daemon.path, MEM, name="A")
    wl = create("virtio_net")
    assert isinstance(wl, VirtioNetWorkload)
    try:
        wl.start(ep.client, ep.mem)
        wl.run_for(seconds)
        yield wl
    finally:
        wl.close()
        ep.close()


def test_a_stuck_ring_is_caught(daemons: tuple[IfcvfDaemon, IfcvfDaemon]) -> None:
    """The check has teeth: a used entry the driver never posted is a mismatch."""
    with started(daemons[0], 0.1) as wl:
        wl.rx_outstanding.discard(next(iter(wl.rx_outstanding)))  # "forget" one RX buffer
        wl.run_for(0.3)
        with pytest.raises(AssertionError, match="RX"):
            wl.verify()


def test_verify_waits_for_what_its_last_poll_sent(
    daemons: tuple[IfcvfDaemon, IfcvfDaemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ARP reply sent by verify's last poll (the peer asked) is used before the rings
    are compared: that race failed a migration's check now and then."""
    with started(daemons[0], 0.2) as wl:
        poll, replies = wl._poll, list[int]()

        def poll_then_answer(timeout: float) -> None:
            idle = not wl.in_flight and not wl.tx_outstanding  # verify's last look
            poll(timeout)
            if idle and not replies:
                # What _frame does for the peer's ARP request, at the worst moment.
                a = wl.addr
                assert a.peer_mac is not None
                wl._send_arp(frames.ARP_REPLY, a.peer_mac, a.peer_mac, a.peer_ip)
                replies.append(1)

        monkeypatch.setattr(wl, "_poll", poll_then_answer)
        wl.verify()
        assert replies and not wl.tx_outstanding


def test_mdevd_migrate_reports_downtime(daemons: tuple[IfcvfDaemon, IfcvfDaemon]) -> None:
    a, b = daemons
    cmd = [*MDEVD, "migrate", "local", "--src", str(a.path), "--dst", str(b.path)]
    cmd += ["--workload", "virtio_net", "--memory", "4M", "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    print("mdevd migrate --workload virtio_net:", json.dumps(report, sort_keys=True))
    assert report["verified"] is True
    assert 0 < report["downtime_seconds"] < report["total_seconds"]
    assert report["after"]["answered"] > 0 and report["after"]["mismatches"] == 0

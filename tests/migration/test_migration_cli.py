"""``mdevd migrate`` as a user runs it: one process, and send/receive across netns.

The two-process test puts each daemon and each half of the tool in its own
network namespace (``ip netns exec``), joined by a veth pair whose
addresses exist only inside them, so the stream really crosses TCP between
"hosts"; the namespaces are removed even when the test fails.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mdevd_proc import MDEVD, Mdevd, sh
from mig_served import REPO, MttyDaemon, new_uuid, short_dir

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _migrate(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *MDEVD, "migrate", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )


def _check_success(report: dict[str, Any], memory: int) -> None:
    assert report["ok"] and not report["error"]
    assert report["rounds"] >= 1
    assert 0 < report["downtime_seconds"] < report["total_seconds"]
    assert report["memory_bytes"] >= memory and report["pages_sent"] >= memory // 4096
    assert report["device_bytes"] > 0 and report["device_flags"] == 7
    assert report["workload"]["writes"] > 0
    assert report["workload"]["in_flight_at_quiesce"] > 0


def test_local_migrate_json(pair: tuple[MttyDaemon, MttyDaemon]) -> None:
    a, b = pair
    u = new_uuid()
    src, dst = a.create(u), b.create(u)
    try:
        r = _migrate(
            "--src", str(src), "--dst", str(dst), "--memory", "4M", "--fdless", "64K", "--json"
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        _check_success(report, 4 << 20)
        assert report["verified"] is True
        after = report["after"]
        assert after["mismatches"] == 0 and after["restores"] == 1
        assert after["verified_bytes"] == after["writes"] > report["workload"]["writes"]
        assert "precopy round 1" in r.stderr  # progress went to stderr
        # and back, with the text report
        r = _migrate("--src", str(dst), "--dst", str(src), "--memory", "4M", "--workload", "none")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("migration succeeded") and "downtime" in r.stdout
    finally:
        a.remove(u)
        b.remove(u)


def test_unknown_workload_is_a_clear_error(pair: tuple[MttyDaemon, MttyDaemon]) -> None:
    a, b = pair
    names = ["nosuch"]
    if importlib.util.find_spec("mdevcore.migration.workloads.nvme") is None:
        names.append("nvme")  # written elsewhere; until then it must say so
    for name in names:
        r = _migrate("--src", "/nonexistent", "--dst", "/nonexistent", "--workload", name)
        assert r.returncode == 1
        assert f"no workload {name!r}" in r.stderr and "missing" in r.stderr, r.stderr


def test_send_to_a_refusing_receiver_rolls_the_source_back(
    pair: tuple[MttyDaemon, MttyDaemon],
) -> None:
    """Two processes over a UNIX stream; the destination is an mtty-1 (state refused)."""
    a, b = pair
    u = new_uuid()
    src, dst = a.create(u, "mtty-2"), b.create(u, "mtty-1")
    where = f"unix:{b.base}/mig.sock"
    receiver = subprocess.Popen(
        [*MDEVD, "migrate", "receive", "--dst", str(dst), "--listen", where]
        + ["--memory", "4M", "--json", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        _wait_for_line(receiver, "listening on")
        sent = _migrate("send", "--src", str(src), "--to", where, "--memory", "4M", "--json")
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
        a.remove(u)
        b.remove(u)
    assert sent.returncode == 1, sent.stderr
    report = json.loads(sent.stdout)
    assert not report["ok"] and report["rolled_back"] and report["errno"] == errno.EINVAL
    assert report["verified"] is True and report["after"]["mismatches"] == 0  # on the source
    assert report["after"]["verified_bytes"] == report["after"]["writes"]
    assert receiver.returncode == 1, err
    received = json.loads(out)
    assert not received["ok"] and received["errno"] == errno.EINVAL


def test_send_with_no_receiver_leaves_the_source_running(
    pair: tuple[MttyDaemon, MttyDaemon],
) -> None:
    a, _ = pair
    u = new_uuid()
    src = a.create(u)
    try:
        where = f"unix:{a.base}/nobody.sock"
        sent = _migrate("send", "--src", str(src), "--to", where, "--memory", "1M", "--json")
    finally:
        a.remove(u)
    assert sent.returncode == 1, sent.stderr
    report = json.loads(sent.stdout)
    assert not report["ok"] and not report["rolled_back"] and report["errno"] == errno.ENOENT
    assert report["verified"] is True and report["after"]["mismatches"] == 0


# --- two processes, two network namespaces ---------------------------------------


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace A, namespace B, B's address) joined by a veth pair."""
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"migA{tag}", f"migB{tag}"
    addr_a, addr_b = "10.231.77.1", "10.231.77.2"
    script = f"""
        set -e
        ip netns add {ns_a}; ip netns add {ns_b}
        ip link add mva{tag} type veth peer name mvb{tag}
        ip link set mva{tag} netns {ns_a}; ip link set mvb{tag} netns {ns_b}
        ip -n {ns_a} addr add {addr_a}/24 dev mva{tag}
        ip -n {ns_b} addr add {addr_b}/24 dev mvb{tag}
        ip -n {ns_a} link set mva{tag} up; ip -n {ns_b} link set mvb{tag} up
        ip -n {ns_a} link set lo up; ip -n {ns_b} link set lo up
    """
    try:
        subprocess.run(["bash", "-c", script], check=True, capture_output=True, timeout=30)
        yield ns_a, ns_b, addr_b
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its veth end too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> str:
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"never printed {text!r}: {seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)
def test_send_receive_over_tcp_between_network_namespaces(
    netns: tuple[str, str, str],
) -> None:
    ns_a, ns_b, addr_b = netns
    host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert addr_b not in host  # the address exists only inside namespace B
    u = new_uuid()
    port = 40000 + os.getpid() % 20000
    with short_dir() as base:
        a = MttyDaemon(base / "a", netns=ns_a, persist={u: "mtty-2"})
        try:
            b = MttyDaemon(base / "b", netns=ns_b, persist={u: "mtty-2"})
            try:
                _across(ns_a, ns_b, f"tcp:{addr_b}:{port}", a.socket(u), b.socket(u))
            finally:
                b.stop()
        finally:
            a.stop()


def _across(ns_a: str, ns_b: str, where: str, src: Path, dst: Path) -> None:
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, *MDEVD, "migrate", "receive", "--dst", str(dst)]
        + ["--listen", where, "--memory", "4M", "--json", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        _wait_for_line(receiver, "listening on")
        sent = _migrate(
            "send", "--src", str(src), "--to", where, "--memory", "4M", "--json",
            prefix=("ip", "netns", "exec", ns_a),
        )  # fmt: skip
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert sent.returncode == 0, sent.stderr
    assert receiver.returncode == 0, err
    report = json.loads(sent.stdout)
    _check_success(report, 4 << 20)
    received = json.loads(out)
    assert received["ok"] and received["verified"] is True
    assert received["device_bytes"] == report["device_bytes"]
    assert received["pages"] == report["pages_sent"]
    after = received["after"]
    assert after["restores"] == 1 and after["mismatches"] == 0
    assert after["verified_bytes"] == after["writes"] > report["workload"]["writes"]


# --- the NVMe workload (mdevcore/migration/workloads/nvme.py) on a pds VF ---------

SETUP = REPO / "tests" / "pds" / "pds_setup.sh"
VF1 = "0000:60:00.1"  # the VF pds_setup.sh binds to pds_vfio


def test_local_migrate_nvme_vf_json() -> None:
    """`--workload nvme` found through the registry; commands in flight across it."""
    mdevd = str(Path(sys.executable).with_name("mdevd"))
    with short_dir() as base:
        daemons: list[Mdevd] = []
        try:
            for name in ("a", "b"):  # one shared backing dir: the namespace data is shared
                (base / name).mkdir()
                d = Mdevd(base / name, "--pds-ns-size", "16M", "--pds-total-vfs", "1",
                          "--pds-backing-dir", str(base / "shared"), builtins=True)  # fmt: skip
                daemons.append(d)
                r = sh(f"SYS={d.sysfs} RUN={d.run_dir} MDEVD={mdevd} bash {SETUP}")
                assert r.returncode == 0, r.stderr
            src, dst = (str(d.run_dir / f"{VF1}.sock") for d in daemons)
            r = _migrate("--src", src, "--dst", dst, "--workload", "nvme", "--memory", "32M",
                         "--max-rounds", "3", "--json")  # fmt: skip
        finally:
            for d in daemons:
                d.stop()
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["device_flags"] == 3  # STOP_COPY | P2P, no PRE_COPY
    assert report["dirty_logging"] and report["rounds"] == 3
    assert report["workload"]["in_flight_at_quiesce"] > 0
    after = report["after"]
    assert report["verified"] and after["mismatches"] == 0 and after["in_flight"] == 0
    assert after["restores"] == 1 and after["verified_bytes"] > 0

"""mdevd as systemd runs it, tested piece by piece (CI has no running systemd).

- the unit (contrib/mdevd.service): its command line is one mdevd accepts,
  and ``systemd-analyze verify`` finds nothing wrong with it;
- Type=notify: with $NOTIFY_SOCKET set, ``mdevd serve`` sends READY=1 once
  it serves, and STOPPING=1 on SIGTERM;
- Restart=on-failure after a crash: kill -9, start again with the same
  --persist directory; the dead mirror and the stale sockets are dealt with,
  the mdevs, the SR-IOV VFs and their bindings come back, the devices
  mdevctl defined with --auto start, and a vfio-user client attaches to
  the same socket paths and reads the devices.
"""

from __future__ import annotations

import configparser
import errno
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mdevd_proc import Mdevd, mounted, sh

from mdevcore.daemon.cli import _parser
from mdevcore.vfio_user.client import Client

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "mdevd.service"
MDEVD_BIN = str(Path(sys.executable).with_name("mdevd"))
SETUP = Path(__file__).resolve().parents[1] / "pds" / "pds_setup.sh"
T2 = "devices/virtual/pool/pool/mdev_supported_types/pool-2"
VF1 = "0000:60:00.1"
HANG_GUARD = 30.0

needs_fuse = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_runs_mdevd_as_a_notify_service_restarted_on_failure() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    # the mirror is unmounted after any stop, a crash included
    assert service["ExecStopPost"].lstrip("-").split()[:2] == ["/bin/umount", "--lazy"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "mdevd"
    args = _parser().parse_args(argv[1:])  # a command line mdevd accepts
    assert args.command == "serve" and args.persist and args.mdevctl_config
    assert service["ExecStopPost"].split()[-1] == str(args.run_dir / "sys")
    # state in the StateDirectory, sockets in the RuntimeDirectory
    assert str(args.persist).startswith(f"/var/lib/{service['StateDirectory']}/")
    assert args.run_dir == Path("/run") / service["RuntimeDirectory"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # As installed: ExecStart names the mdevd that exists on this machine.
    text = UNIT.read_text().replace("/usr/local/bin/mdevd", MDEVD_BIN)
    (tmp_path / "mdevd.service").write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "mdevd.service")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 on some mistakes (an unknown Type=): its messages count too
    complaints = [line for line in r.stderr.splitlines() if "mdevd.service" in line]
    assert (r.returncode, complaints) == (0, []), r.stderr


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(HANG_GUARD)

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


def attach(sock: Path) -> Client:
    c = Client(sock)
    c.negotiate()
    return c


def refused(sock: Path) -> bool:
    try:
        Client(sock).close()
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    return False


def mdevctl(d: Mdevd, config: Path, args: str) -> subprocess.CompletedProcess[str]:
    return sh(f"{MDEVD_BIN} mdevctl --sysfs {d.sysfs} --config {config} {args}")


@needs_fuse
def test_crash_and_restart_bring_everything_back(tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    config = tmp_path / "mdevctl.d"
    notify = NotifySocket(tmp_path / "notify")
    args = ["--persist", str(persist), "--mdevctl-config", str(config)]
    args += ["--pds-ns-size", "16M", "--pds-total-vfs", "4"]
    env = {"NOTIFY_SOCKET": str(notify.path)}
    kept, auto = uuid.uuid4(), uuid.uuid4()
    first: Mdevd | None = Mdevd(tmp_path, *args, builtins=True, env=env)
    second: Mdevd | None = None
    try:
        assert first is not None
        d = first
        assert notify.receive()["READY"] == "1"  # sent after the banner
        assert sh(f"echo {kept} > {T2}/create", d.sysfs).returncode == 0
        r = sh(f"SYS={d.sysfs} RUN={d.run_dir} MDEVD={MDEVD_BIN} bash {SETUP}")
        assert r.returncode == 0, r.stderr + d.stderr
        if shutil.which("mdevctl") is not None:
            r = mdevctl(d, config, f"define -u {auto} -p pool -t pool-2 --auto")
            assert r.returncode == 0, r.stderr
        else:  # what mdevctl define --auto writes
            (config / "pool").mkdir(parents=True)
            (config / "pool" / str(auto)).write_text('{"mdev_type": "pool-2", "start": "auto"}')
        assert not (d.sysfs / "bus/mdev/devices" / str(auto)).exists()  # defined, not started
        socks = [d.run_dir / f"{kept}.sock", d.run_dir / f"{VF1}.sock"]
        with attach(socks[1]) as c:  # the guest's VF, in use when the daemon dies
            assert c.region_read(7, 0, 2) == b"\xd8\x1d"
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
        first = None
        # what the crash leaves: a dead mirror, socket files nobody listens on
        assert mounted(d.sysfs) and all(refused(s) for s in socks)
        # The kernel ends the FUSE connection once the dead daemon's files are
        # released, which a loaded machine may do a little after wait() (as
        # systemd's RestartSec leaves time for): wait for ENOTCONN.
        for _ in range(100):
            try:
                os.stat(d.sysfs)
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    break
            time.sleep(0.1)

        second = Mdevd(tmp_path, *args, builtins=True, env=env)  # Restart=on-failure
        d = second
        assert notify.receive()["READY"] == "1"
        assert "detached a stale mirror" in d.stderr
        assert "persist: ignoring" not in d.stderr  # pci.json is not taken for an mdev record
        devices = sorted(p.name for p in (d.sysfs / "bus/mdev/devices").iterdir())
        assert devices == sorted([str(kept), str(auto)])
        pf = d.sysfs / "bus/pci/devices/0000:60:00.0"
        assert (pf / "sriov_numvfs").read_text() == "1\n"
        assert (pf / "sriov_drivers_autoprobe").read_text() == "0\n"
        vf = d.sysfs / "bus/pci/devices" / VF1
        assert (vf / "driver_override").read_text() == "pds_vfio\n"
        assert (vf / "driver").readlink().name == "pds_vfio"
        assert (vf / "vfio_user/socket").read_text() == f"{socks[1]}\n"
        assert [p.name for p in (d.sysfs / "bus/auxiliary/devices").iterdir()] == ["pds_core.LM.1"]
        show = sh(f"{MDEVD_BIN} devlink --run-dir {d.run_dir} dev param show pci/0000:60:00.0")
        assert show.stdout.splitlines()[-1] == "      cmode runtime value true"
        # the same socket paths serve again: a vfio-user client attaches and reads
        with attach(socks[1]) as c:
            assert c.region_read(7, 0, 12)[9:12] == bytes([0x02, 0x08, 0x01])  # NVMe
            cap = struct.unpack("<Q", c.region_read(0, 0, 8))[0]
            assert cap & 0xFFFF and cap >> 37 & 1  # MQES, NVM command set
        for dev in (kept, auto):
            with attach(d.run_dir / f"{dev}.sock") as c:
                assert c.device_info().num_regions > 0
        assert d.stop() == 0
        second = None
        assert notify.receive()["STOPPING"] == "1"
        assert not mounted(d.sysfs)
        assert not list(d.run_dir.glob("*.sock"))
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
        notify.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_a_path_or_an_abstract_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    from mdevcore.daemon import sdnotify

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if abstract:  # systemd may hand out "@name": the abstract namespace
            name = f"mdevd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            sock.bind(f"\0{name}")
            monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        else:
            sock.bind(str(tmp_path / "n"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
        sock.settimeout(HANG_GUARD)
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()
    # nobody listening any more, or no service manager: serving goes on, nothing is sent
    assert sdnotify.notify("READY=1") is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False

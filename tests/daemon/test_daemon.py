"""mdevd serve as a real process: start, serve, signals, errors, persistence."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from mdevd_proc import BIG_POOL, MDEVD, Mdevd, mounted, sh

T2 = "devices/virtual/pool/pool/mdev_supported_types/pool-2"

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_start_create_stop_leaves_nothing_behind(tmp_path: Path, sig: int) -> None:
    d = Mdevd(tmp_path)
    try:
        assert mounted(d.sysfs)
        assert f"echo $(cat /proc/sys/kernel/random/uuid) > {d.sysfs}/{T2}/create" in d.banner
        assert '-device \'{"driver":"vfio-user-pci","socket":{"path":' in d.banner
        u = str(uuid.uuid4())
        r = sh(f"echo {u} > {T2}/create && cat bus/mdev/devices/{u}/vfio_user/socket", d.sysfs)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{d.run_dir}/{u}.sock\n"
    finally:
        rc = d.stop(sig)
    assert rc == 0
    assert not mounted(d.sysfs)
    assert list(d.sysfs.iterdir()) == []
    assert [p for p in d.run_dir.iterdir() if p.is_socket()] == []
    log = d.stderr
    assert f"mdev {u} created: parent pool type pool-2" in log
    assert "shutting down" in log


def test_persist_recreates_devices(tmp_path: Path) -> None:
    persist = tmp_path / "persist"
    keep, drop = str(uuid.uuid4()), str(uuid.uuid4())
    d = Mdevd(tmp_path, "--persist", str(persist))
    try:
        r = sh(
            f"echo {keep} > {T2}/create && echo {drop} > {T2}/create && "
            f"echo 1 > bus/mdev/devices/{drop}/remove",
            d.sysfs,
        )
        assert r.returncode == 0, r.stderr
    finally:
        assert d.stop() == 0
    assert sorted(p.name for p in persist.iterdir()) == [keep]
    d = Mdevd(tmp_path, "--persist", str(persist))
    try:
        r = sh("ls bus/mdev/devices; readlink -f bus/mdev/devices/*/mdev_type", d.sysfs)
        assert r.stdout == f"{keep}\n{d.sysfs}/{T2}\n"
        assert sh(f"cat {T2}/available_instances", d.sysfs).stdout == "11\n"
    finally:
        assert d.stop() == 0


def test_clear_errors_not_tracebacks(tmp_path: Path) -> None:
    import subprocess

    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    r = subprocess.run(
        [*MDEVD, "serve", "--no-builtins", "--sysfs", str(not_dir), "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"mdevd: error: cannot mount the sysfs mirror at {not_dir}: not a directory"
    )

    d = Mdevd(tmp_path)
    try:
        r = subprocess.run(
            [*MDEVD, "serve", "--no-builtins", "--sysfs", str(d.sysfs), "--run-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"mdevd: error: cannot mount the sysfs mirror at {d.sysfs}: "
            "busy (already a mount point)"
        )
        r = subprocess.run(
            [
                *MDEVD,
                "serve",
                "--no-builtins",
                "--parent",
                "nope",
                "--run-dir",
                str(tmp_path / "x"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "is not module:factory@location" in r.stderr
    finally:
        assert d.stop() == 0


def test_devices_are_served_over_vfio_user(tmp_path: Path) -> None:
    from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CFG
    from mdevcore.vfio_user.client import Client

    d = Mdevd(tmp_path)
    try:
        u = str(uuid.uuid4())
        sock = d.run_dir / f"{u}.sock"
        # the socket exists as soon as the write to create has returned
        r = sh(f"echo {u} > {T2}/create && test -S {sock} && echo served", d.sysfs)
        assert r.stdout == "served\n", r.stderr
        with Client(sock) as client:
            client.negotiate()
            client.region_write(CFG, 0x40, b"\x12\x34")
            assert client.region_read(CFG, 0x40, 2) == b"\x12\x34"
            # removing the device drops the client and the socket
            r = sh(
                f"echo 1 > bus/mdev/devices/{u}/remove && test ! -e {sock} && echo gone", d.sysfs
            )
            assert r.stdout == "gone\n", r.stderr
            with pytest.raises(OSError):
                client.region_read(CFG, 0x40, 2)
        # the same UUID can come back at once, with a fresh device
        r = sh(f"echo {u} > {T2}/create && test -S {sock} && echo again", d.sysfs)
        assert r.stdout == "again\n", r.stderr
        with Client(sock) as client:
            client.negotiate()
            assert client.region_read(CFG, 0x40, 2) == b"\x00\x00"
    finally:
        assert d.stop() == 0
    assert not sock.exists()
    log = d.stderr
    assert "client connected" in log and "disconnecting the client" in log


def test_builtin_mtty_is_served(tmp_path: Path) -> None:
    from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CFG
    from mdevcore.vfio_user.client import Client

    d = Mdevd(tmp_path, builtins=True)
    try:
        mtty2 = "devices/virtual/mtty/mtty/mdev_supported_types/mtty-2"
        assert f"{d.sysfs}/{mtty2}/create" in d.banner
        u = str(uuid.uuid4())
        r = sh(f"echo {u} > {mtty2}/create && cat {mtty2}/available_instances", d.sysfs)
        assert r.stdout == "11\n", r.stderr
        with Client(d.run_dir / f"{u}.sock") as client:
            client.negotiate()
            # WCH CH352 (4348:3253), the id the guest's 8250_pci binds
            assert client.region_read(CFG, 0, 4) == bytes.fromhex("48435332")
    finally:
        assert d.stop() == 0


def test_sigterm_with_a_client_connected(tmp_path: Path) -> None:
    from mdevcore.vfio_user.client import Client

    d = Mdevd(tmp_path)
    u = str(uuid.uuid4())
    sock = d.run_dir / f"{u}.sock"
    try:
        assert sh(f"echo {u} > {T2}/create", d.sysfs).returncode == 0
        client = Client(sock)
        client.negotiate()
    finally:
        rc = d.stop()
    assert rc == 0
    with pytest.raises(OSError):
        client.device_info()  # the daemon dropped the client on its way out
    client.close()
    assert not sock.exists() and not mounted(d.sysfs)


def test_lab_subcommand_dispatches_to_the_lab_tool() -> None:
    import subprocess

    r = subprocess.run([*MDEVD, "lab", "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: lab")


def test_parallel_creates_each_see_their_socket(tmp_path: Path) -> None:
    d = Mdevd(tmp_path, parent=BIG_POOL)
    ids = [str(uuid.uuid4()) for _ in range(200)]
    run = d.run_dir
    try:
        # each writer checks its own socket the moment its write returned
        script = (
            f"printf '%s\\n' {' '.join(ids)} | xargs -P 16 -I @ sh -c "
            f"'echo @ > {T2}/create && test -S {run}/@.sock || echo LATE @'"
        )
        r = sh(script, d.sysfs)
        assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
        created = sorted(p.name for p in (d.sysfs / "bus/mdev/devices").iterdir())
        assert created == sorted(ids)
        assert sorted(p.name[: -len(".sock")] for p in run.glob("*.sock")) == created
        assert (d.sysfs / T2 / "available_instances").read_text() == f"{32768 - 200}\n"
        script = (
            "ls bus/mdev/devices | xargs -P 16 -I @ sh -c "
            f"'echo 1 > bus/mdev/devices/@/remove && test ! -e {run}/@.sock || echo LATE @'"
        )
        r = sh(script, d.sysfs)
        assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
        assert list(run.glob("*.sock")) == []
        assert list((d.sysfs / "bus/mdev/devices").iterdir()) == []
        assert (d.sysfs / T2 / "available_instances").read_text() == "32768\n"
    finally:
        assert d.stop() == 0


def test_restart_after_a_crash_detaches_the_dead_mirror(tmp_path: Path) -> None:
    d = Mdevd(tmp_path)
    d.proc.kill()  # no cleanup at all: the mount stays, dead (ENOTCONN)
    d.proc.wait()
    assert mounted(d.sysfs)
    try:
        with pytest.raises(OSError):
            d.sysfs.stat()
        d2 = Mdevd(tmp_path)
    except BaseException:
        d.kill()  # detaches the dead mirror
        raise
    try:
        assert "detached a stale mirror" in d2.stderr
        assert (d2.sysfs / T2 / "available_instances").read_text() == "12\n"
    finally:
        assert d2.stop() == 0
    assert not mounted(d.sysfs)


@pytest.mark.parametrize(
    ("hide", "message"),
    [
        ("mount -t tmpfs none /dev", "mdevd: error: /dev/fuse is missing (try: modprobe fuse)"),
        ("mount --bind /dev/null /dev/fuse", "mdevd: error: cannot mount FUSE at"),
    ],
)
def test_without_a_usable_dev_fuse(tmp_path: Path, hide: str, message: str) -> None:
    import shlex
    import subprocess

    cmd = [*MDEVD, "serve", "--no-builtins", "--sysfs", str(tmp_path / "sys")]
    cmd += ["--run-dir", str(tmp_path)]
    # a private mount namespace hides /dev/fuse from this daemon only
    script = f"{hide} && exec {shlex.join(cmd)}"
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(message)
    assert "Traceback" not in r.stderr


def test_create_fails_when_the_socket_path_cannot_work(tmp_path: Path) -> None:
    d = Mdevd(tmp_path, "--run-dir", str(tmp_path / ("r" * 90)))
    try:
        u = str(uuid.uuid4())
        r = sh(f"echo {u} > {T2}/create", d.sysfs)
        assert r.returncode != 0
        assert "write error: File name too long" in r.stderr
        assert list((d.sysfs / "bus/mdev/devices").iterdir()) == []
        assert (d.sysfs / T2 / "available_instances").read_text() == "12\n"
    finally:
        assert d.stop() == 0

"""Real guests through the lab: the behaviour other tests will build on."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from mdevcore.tools.lab import Lab, LabError

pytestmark = pytest.mark.qemu


def lab_mounts(*paths: Path) -> list[str]:
    """Host mounts at or below any of ``paths`` (other tests may mount
    elsewhere meanwhile, so only these are compared)."""
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    prefixes = [str(p) for p in paths]
    return [m for m in points if any(m == p or m.startswith(p + "/") for p in prefixes)]


def qemu_processes_with(marker: str) -> list[int]:
    """Live QEMU processes whose command line contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
                if marker.encode() in cmdline and b"qemu-system" in cmdline:
                    found.append(int(pid))
        except OSError:
            continue  # exited meanwhile
    return found


def test_setup_is_idempotent(lab: Lab) -> None:
    again = Lab.ensure(lab.paths.cache)
    assert again.stamp == lab.stamp  # nothing rebuilt
    assert again.paths.base_initramfs.stat().st_ino == lab.paths.base_initramfs.stat().st_ino


def test_info_reports_qemu_with_vfio_user(lab: Lab) -> None:
    info = lab.info()
    major, minor = (int(n) for n in info["qemu"].split(".")[:2])
    assert (major, minor) >= (10, 1)
    assert info["kernel"] == lab.kernel_version
    assert info["accel"] in ("tcg", "kvm")


def test_guest_runs_script_and_reports(lab: Lab) -> None:
    result = lab.boot("uname -r; lspci -nn; cat /proc/cpuinfo | head; echo done", timeout=120)
    assert result.rc == 0
    lines = result.output.splitlines()
    assert lines[0] == lab.kernel_version
    assert "[8086:29c0]" in result.output  # q35 host bridge, named from pci.ids
    assert "Host bridge" in result.output
    assert any(line.startswith("processor") for line in lines)
    assert lines[-1] == "done"
    assert "LAB-RESULT" not in result.output and "LAB-BEGIN" not in result.output
    assert result.kernel_log == ""  # only dumped on request or failure
    assert lab_mounts(lab.paths.cache) == []


def test_failing_script_rc_and_output_propagate(lab: Lab) -> None:
    result = lab.boot("echo partial; echo oops >&2; printf no-newline; exit 42")
    assert result.rc == 42
    assert result.output == "partial\noops\nno-newline"
    # A failure brings the guest's kernel log along, kept out of the output.
    assert "Linux version" in result.kernel_log
    assert "Linux version" not in result.output


def test_kernel_log_on_request_and_extra_files(lab: Lab) -> None:
    result = lab.boot(
        "/opt/t/hello.sh; echo fine",
        kernel_log=True,
        files={"/opt/t/hello.sh": "#!/bin/sh\necho hello from a file\n"},
    )
    assert result.rc == 0 and result.output == "hello from a file\nfine\n"
    assert "Linux version" in result.kernel_log
    assert "LAB-DMESG" not in result.kernel_log


def test_timeout_is_reported_and_leaves_nothing_behind(lab: Lab, tmp_path: Path) -> None:
    marker = f"labtest={uuid.uuid4()}"
    bind_dir = tmp_path / "bound"
    bind_dir.mkdir()
    mount_point = lab.root / str(bind_dir).lstrip("/")
    with pytest.raises(LabError) as caught:
        lab.boot(
            f"echo guest-started {marker}; sleep 600",
            timeout=40,
            kernel_args=[marker],
            binds=[bind_dir],
        )
    assert caught.value.errno == errno.ETIMEDOUT
    assert "did not finish" in str(caught.value)
    assert "guest-started" in caught.value.console
    assert qemu_processes_with(marker) == []
    assert lab_mounts(lab.paths.cache, tmp_path) == []
    assert not mount_point.exists()
    # Other runs may be booting meanwhile: none of the boot dirs left is ours
    # (our script, with the marker, is inside our initrd).
    for initrd in lab.paths.boots_dir.glob("boot-*/initrd.cpio"):
        assert marker.encode() not in initrd.read_bytes()


def test_qemu_nvme_with_host_backing_file(lab: Lab, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    size = 64 << 20
    with open(disk, "wb") as f:
        f.truncate(size)
        f.write(b"HOST-WROTE-THIS\n")
    script = r"""
modprobe nvme
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 0.5; done
echo "sectors $(cat /sys/block/nvme0n1/size)"
head -c 16 /dev/nvme0n1
printf 'GUEST-WROTE-THIS' | dd of=/dev/nvme0n1 bs=512 seek=8 conv=sync 2>/dev/null
sync
nvme list | grep -o 'lab-serial-1'
"""
    result = lab.boot(
        script,
        qemu_args=[
            "-drive",
            f"file={disk},if=none,id=d0,format=raw,cache=none,aio=threads",
            "-device",
            "nvme,drive=d0,serial=lab-serial-1",
        ],
        extra_binaries=["nvme"],
    )
    assert result.rc == 0, result.console
    assert f"sectors {size // 512}" in result.output
    assert "HOST-WROTE-THIS" in result.output
    assert "lab-serial-1" in result.output
    with open(disk, "rb") as f:
        f.seek(8 * 512)
        assert f.read(16) == b"GUEST-WROTE-THIS"


async def test_vfio_user_device_line_reaches_host_socket(lab: Lab, tmp_path: Path) -> None:
    """The daemon's -device JSON works verbatim: QEMU in the chroot connects
    to the host socket at the same path and sends vfio-user VERSION first.
    The server runs in this trio loop while ``aboot`` waits for the guest."""
    sock_path = tmp_path / "dev.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(sock_path))
    listener.listen(1)
    header = bytearray()

    async def serve_one() -> None:
        conn, _ = await listener.accept()
        with conn:
            while len(header) < 16:
                chunk = await conn.recv(16 - len(header))
                if not chunk:
                    break
                header.extend(chunk)
        # Closing without a reply makes QEMU give up on the device and exit.

    line = f'{{"driver":"vfio-user-pci","socket":{{"path":"{sock_path}","type":"unix"}}}}'
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            with pytest.raises(LabError) as caught:
                await lab.aboot("echo unreachable", devices=[line], timeout=90)
            nursery.cancel_scope.cancel()
    assert caught.value.errno == errno.EIO  # QEMU quit before the guest ran
    assert len(header) == 16, "QEMU never connected to the socket"
    msg_id, command, size, flags, error = struct.unpack("<HHIII", header)
    assert command == 1  # VFIO_USER_VERSION
    assert size > 16 and flags == 0 and error == 0


def test_qemu_refusing_its_arguments_is_an_error_with_its_reason(lab: Lab) -> None:
    with pytest.raises(LabError) as caught:
        lab.boot("true", devices=["no-such-device-model"])
    assert caught.value.errno == errno.EIO
    assert "no-such-device-model" in str(caught.value)


async def test_cancelling_aboot_stops_qemu_before_returning(lab: Lab) -> None:
    marker = f"labtest={uuid.uuid4()}"
    with trio.move_on_after(10) as scope:  # mid-boot or mid-script: both must stop
        await lab.aboot(f"sleep 600 # {marker}", kernel_args=[marker], timeout=600)
    assert scope.cancelled_caught
    assert qemu_processes_with(marker) == []
    assert lab_mounts(lab.paths.cache) == []
    for initrd in lab.paths.boots_dir.glob(f"boot-{os.getpid()}-*/initrd.cpio"):
        assert marker.encode() not in initrd.read_bytes()


@pytest.mark.skipif(
    not os.path.isdir("/sys/module/kvm_pvm"), reason="provoking a KVM failure needs a PVM host"
)
def test_kvm_internal_error_is_reported_not_waited_out(lab: Lab) -> None:
    """On PVM the guest kernel dies in KVM; QEMU pauses instead of exiting,
    so only watching its output ends the run before the timeout."""
    with pytest.raises(LabError) as caught:
        lab.boot("echo never", accel="kvm", timeout=600)
    assert caught.value.errno == errno.EIO
    assert "KVM internal error" in str(caught.value)


def test_cli_boot_prints_output_and_exits_with_rc(lab: Lab) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mdevcore.tools.lab",
            "boot",
            "--cache",
            str(lab.paths.cache),
            "--cmd",
            "echo from-cli; exit 5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "from-cli\n"


def test_cli_sigterm_mid_boot_kills_qemu_and_cleans_up(lab: Lab) -> None:
    marker = f"labtest={uuid.uuid4()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mdevcore.tools.lab",
            "boot",
            "--cache",
            str(lab.paths.cache),
            "--console",
            "--kernel-arg",
            marker,
            "--cmd",
            f"echo started-{marker}; sleep 600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while f"started-{marker}".encode() not in seen:
            assert sel.select(timeout=120), "guest never started"
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
    assert qemu_processes_with(marker)  # QEMU is running the guest now
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert qemu_processes_with(marker) == []
    assert list(lab.paths.boots_dir.glob(f"boot-{proc.pid}-*")) == []
    assert lab_mounts(lab.paths.cache) == []


def test_cpio_readable_by_gnu_cpio(lab: Lab) -> None:
    """The base archive is valid newc for the chroot's GNU cpio, too."""
    with open(lab.paths.base_initramfs, "rb") as f:
        proc = subprocess.run(
            ["chroot", str(lab.root), "cpio", "-t", "--quiet"], stdin=f, capture_output=True
        )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.decode().split()
    for needed in (
        "init",
        "dev/console",
        "usr/bin/busybox",
        "usr/bin/lspci",
        "usr/share/misc/pci.ids",
    ):
        assert needed in names

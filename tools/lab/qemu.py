"""Build QEMU's command line and run one guest to completion.

QEMU runs in the chroot through :mod:`mdevcore.tools.lab.namespace`.  Its serial
console (stdout) and its own messages (stderr) are read until the guest's
result line shows up; the run ends with an error on timeout, on a KVM
internal error (QEMU pauses there instead of exiting), or when QEMU quits
before the guest reported.  In every case the process is gone on return.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mdevcore.tools.lab.errors import LabError

log = logging.getLogger(__name__)

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
ACCELS = ("tcg", "kvm")

# QEMU's words when KVM gives up; it then pauses the VM rather than exiting.
_KVM_FAILURE = re.compile(r"KVM internal error|KVM: entry failed|emulation failure")
# How long QEMU may take to exit once the guest has reported and powered off.
_EXIT_GRACE = 10.0


def choose_accel(requested: str | None = None) -> tuple[str, str]:
    """(accelerator, why).  TCG unless /dev/kvm is real, usable KVM.

    The /dev/kvm of these cloud machines is often PVM (module kvm_pvm), a
    nested software hypervisor under which the Debian kernel dies with an
    emulation failure, and which is slower than TCG before that.
    """
    if requested:
        if requested not in ACCELS:
            raise LabError(errno.EINVAL, f"unknown accelerator {requested!r}; use tcg or kvm")
        return requested, "requested"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "tcg", "/dev/kvm is PVM (kvm_pvm), which crashes the guest kernel"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm not accessible"
    return "kvm", "/dev/kvm available"


def socket_paths(device: str) -> list[str]:
    """Host UNIX socket paths a -device argument names (JSON or key=value)."""
    text = device.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as err:
            raise LabError(errno.EINVAL, f"bad -device JSON {device!r}: {err}") from err
        sock = spec.get("socket") if isinstance(spec, dict) else None
        if isinstance(sock, dict) and isinstance(sock.get("path"), str):
            return [sock["path"]]
        return []
    return [m.group(1) for m in re.finditer(r"(?:^|,)socket\.path=([^,]+)", text)]


def file_paths(qemu_args: Sequence[str]) -> list[str]:
    """Absolute host paths in option values such as -drive file=/x/disk.img."""
    found = []
    for arg in qemu_args:
        for match in re.finditer(r"(?:^|,)(?:file|filename|path)=(/[^,]+)", arg):
            found.append(match.group(1))
    return found


@dataclass
class QemuConfig:
    """One guest's machine; paths are as seen inside the chroot."""

    kernel: str
    initrd: str
    accel: str
    memory_mb: int = 512
    cpus: int = 1
    kernel_args: Sequence[str] = ()
    devices: Sequence[str] = ()
    qemu_args: Sequence[str] = ()

    def argv(self) -> list[str]:
        if self.memory_mb < 64 or self.cpus < 1:
            raise LabError(errno.EINVAL, "memory_mb must be >= 64 and cpus >= 1")
        mem = f"{self.memory_mb}M"
        append = " ".join(["console=ttyS0", "panic=-1", "loglevel=4", *self.kernel_args])
        argv = [
            QEMU_BINARY,
            "-name",
            "mdevcore-lab",
            "-machine",
            f"q35,accel={self.accel},memory-backend=mem",
            "-cpu",
            "host" if self.accel == "kvm" else "max",
            "-smp",
            str(self.cpus),
            "-m",
            mem,
            # Guest RAM in a shared memfd: without it QEMU sends vfio-user
            # servers no DMA fds at all (and does not say so).
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-kernel",
            self.kernel,
            "-initrd",
            self.initrd,
            "-append",
            append,
        ]
        for device in self.devices:
            argv += ["-device", device]
        argv += list(self.qemu_args)
        return argv


@dataclass
class RunOutcome:
    """What one QEMU process produced."""

    console: str
    stderr: str
    exit_status: int | None
    elapsed: float
    notes: list[str] = field(default_factory=list)


def _normalise(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            # start_new_session made the child a group leader: its id is ours.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    timeout: float,
    done: re.Pattern[str],
    echo: bool = False,
    cancel: threading.Event | None = None,
) -> RunOutcome:
    """Run ``argv`` (the namespace-wrapped QEMU) until ``done`` matches the console.

    Raises LabError on timeout, KVM failure or ``cancel`` being set (checked
    twice a second, from any thread); the process is dead on return.
    """
    log.debug("lab: %s", shlex.join(argv))
    started = time.monotonic()
    deadline = started + timeout
    console = bytearray()
    errors = bytearray()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # Ctrl-C in a terminal reaches us, not QEMU
    )
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, console)
    sel.register(proc.stderr, selectors.EVENT_READ, errors)
    finished_at: float | None = None
    try:
        while sel.get_map():
            if cancel is not None and cancel.is_set():
                raise LabError(errno.ECANCELED, "boot cancelled; QEMU killed")
            now = time.monotonic()
            limit = deadline if finished_at is None else finished_at + _EXIT_GRACE
            if now >= limit:
                break
            for key, _ in sel.select(timeout=min(limit - now, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if echo and key.data is console:
                    os.write(2, chunk)
            if finished_at is None and done.search(_normalise(bytes(console))):
                finished_at = time.monotonic()
            # QEMU reports on stderr; the console is the guest's to print on.
            if _KVM_FAILURE.search(_normalise(bytes(errors))):
                raise LabError(
                    errno.EIO,
                    "KVM internal error: QEMU paused the guest (try --accel tcg)\n"
                    + "\n".join(_normalise(bytes(errors)).splitlines()[:12]),
                    console=_normalise(bytes(console)),
                )
        if finished_at is None and proc.poll() is None and sel.get_map():
            raise LabError(
                errno.ETIMEDOUT,
                f"guest did not finish within {timeout:g} s; QEMU killed",
                console=_normalise(bytes(console)),
            )
        notes = []
        try:
            proc.wait(
                timeout=max(0.1, (finished_at or time.monotonic()) + _EXIT_GRACE - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            notes.append("QEMU did not exit after the guest powered off; killed")
            log.warning("lab: %s", notes[-1])
        return RunOutcome(
            console=_normalise(bytes(console)),
            stderr=_normalise(bytes(errors)),
            exit_status=proc.returncode,
            elapsed=time.monotonic() - started,
            notes=notes,
        )
    finally:
        sel.close()
        _kill(proc)
        proc.stdout.close()
        proc.stderr.close()


def qemu_version(root: Path) -> str:
    """The chroot QEMU's version line (runs it; no namespace needed)."""
    proc = subprocess.run(
        ["chroot", str(root), QEMU_BINARY, "--version"], capture_output=True, text=True
    )
    first = proc.stdout.splitlines()[0] if proc.stdout else proc.stderr.strip()
    return first.removeprefix("QEMU emulator version ").strip()

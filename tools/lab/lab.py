"""The lab as a Python object: set up once, then boot guests that run scripts."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mdevcore.tools.lab import config, initramfs, qemu, setup
from mdevcore.tools.lab.cpio import CpioArchive
from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.namespace import Binds, chroot_env, namespace_argv, require_root_tools

log = logging.getLogger(__name__)

# Where a boot's own files (its initrd) appear inside the chroot.
BOOT_MOUNT = PurePosixPath("/.lab-boot")


@dataclass(frozen=True)
class GuestResult:
    """One finished guest run.

    ``output`` is exactly what the script printed (stdout and stderr, in
    order, ``\\r\\n`` turned into ``\\n``); ``console`` is the whole serial
    log.  ``rc`` is the script's exit status.  ``kernel_log`` is the guest's
    dmesg after the script, when it was dumped (``kernel_log=True``, or
    whenever the script failed); the console otherwise shows only kernel
    warnings and errors, so that they do not mix with the script's output.
    """

    rc: int
    console: str
    output: str
    elapsed: float
    accel: str
    kernel_log: str = ""
    qemu_stderr: str = ""


@contextmanager
def _locked(paths: config.LabPaths) -> Iterator[None]:
    paths.cache.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one setup at a time, across processes
        yield


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


class Lab:
    """A set-up lab cache.  Get one with :meth:`ensure` (or :meth:`open`)."""

    def __init__(self, paths: config.LabPaths, stamp: dict[str, Any]) -> None:
        self.paths = paths
        self.stamp = stamp
        self.root = paths.rootfs
        self.kernel_version = initramfs.kernel_version(self.root)

    # -- construction -----------------------------------------------------

    @classmethod
    def ensure(cls, cache_dir: str | os.PathLike[str] | None = None) -> Lab:
        """The lab at ``cache_dir``, set up first if needed (~60 s, once)."""
        require_root_tools()
        paths = config.LabPaths.choose(cache_dir)
        with _locked(paths):
            stamp = setup.read_stamp(paths)
            if stamp is None:
                log.info("lab: setting up %s (about a minute, once)", paths.cache)
                setup.remove_tree(paths.initramfs_dir)
                stamp = setup.build_rootfs(paths)
                setup.write_stamp(paths, stamp)
            lab = cls(paths, stamp)
            lab._ensure_base_initramfs()
        return lab

    @classmethod
    def open(cls, cache_dir: str | os.PathLike[str] | None = None) -> Lab:
        """The lab at ``cache_dir`` if it is set up; ENOENT otherwise."""
        paths = config.LabPaths.choose(cache_dir)
        stamp = setup.read_stamp(paths)
        if stamp is None or not paths.base_initramfs.exists():
            raise LabError(errno.ENOENT, f"no lab set up in {paths.cache}; run `lab setup`")
        return cls(paths, stamp)

    def _ensure_base_initramfs(self) -> None:
        if self.paths.base_initramfs.exists():
            return
        archive = initramfs.build_base(
            self.root,
            modules=config.GUEST_MODULES,
            binaries=config.BASE_BINARIES,
            data_files=config.GUEST_DATA_FILES,
        )
        self.paths.initramfs_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.paths.initramfs_dir.glob("*.cpio"):
            stale.unlink()  # built by an older lab version
        _write_atomic(self.paths.base_initramfs, archive.to_bytes())

    def _extras_initramfs(self, binaries: Sequence[str]) -> Path | None:
        """A cached archive of extra chroot programs, built on first use."""
        if not binaries:
            return None
        names = sorted(set(binaries))
        key = hashlib.sha256(
            "\0".join([str(config.INITRAMFS_FORMAT), self.kernel_version, *names]).encode()
        ).hexdigest()[:16]
        path = self.paths.extras_initramfs(key)
        if not path.exists():
            with _locked(self.paths):
                if not path.exists():
                    data = initramfs.build_extras(self.root, names).to_bytes()
                    _write_atomic(path, data)
        return path

    # -- facts ------------------------------------------------------------

    @property
    def kernel(self) -> PurePosixPath:
        """The guest kernel, as a chroot path."""
        return PurePosixPath("/boot", f"vmlinuz-{self.kernel_version}")

    def info(self) -> dict[str, Any]:
        accel, why = qemu.choose_accel()
        return {
            "cache": str(self.paths.cache),
            "rootfs": str(self.root),
            "base_initramfs": str(self.paths.base_initramfs),
            "base_initramfs_bytes": self.paths.base_initramfs.stat().st_size,
            "qemu": qemu.qemu_version(self.root),
            "kernel": self.kernel_version,
            "accel": accel,
            "accel_reason": why,
            "optional_packages": self.stamp.get("optional_packages", {}),
            "setup_seconds": self.stamp.get("setup_seconds"),
            "built_at": self.stamp.get("built_at"),
        }

    # -- booting ----------------------------------------------------------

    def boot(
        self,
        script: str,
        *,
        devices: Sequence[str] = (),
        qemu_args: Sequence[str] = (),
        binds: Sequence[str | os.PathLike[str]] = (),
        memory_mb: int = 512,
        cpus: int = 1,
        timeout: float = 120.0,
        extra_binaries: Sequence[str] = (),
        kernel_args: Sequence[str] = (),
        accel: str | None = None,
        kernel_log: bool | None = None,
        console_loglevel: int | None = 1,
        files: Mapping[str, bytes | str] | None = None,
        echo: bool = False,
        cancel: threading.Event | None = None,
    ) -> GuestResult:
        """Boot a guest that runs ``script`` (busybox sh) and powers off.

        ``devices`` are QEMU -device values, e.g. the JSON line the daemon
        prints for a vfio-user device; socket directories are bound into the
        chroot at the same path.  ``qemu_args`` are passed verbatim; host
        files they name (``file=/x/disk.img``) are bound the same way, as
        are ``binds`` (directories, or files whose directory is bound).
        ``extra_binaries`` are chroot programs (``fio``, ``nvme``, ``dd``)
        added to the guest with their libraries.  ``kernel_log``: dump the
        guest's dmesg after the script (None: only if it failed).
        ``console_loglevel``: kernel messages shown on the console while the
        script runs (default 1, emergencies only, so that they cannot split
        the script's output; 8 shows all, for watching a hang with echo).
        ``files`` maps absolute guest paths to contents (test data, helper
        scripts).  Setting ``cancel`` (from another thread) stops the guest
        within half a second (LabError ECANCELED).
        Raises LabError on
        timeout (ETIMEDOUT), KVM failure or a guest that never reported (EIO).
        """
        require_root_tools()
        chosen, why = qemu.choose_accel(accel)
        log.info("lab: booting %s guest (%s)", chosen, why)
        token = secrets.token_hex(8)
        # Per-boot files live outside the chroot and are bound at a fixed
        # chroot path in this boot's namespace only: concurrent boots each
        # see their own.
        self.paths.boots_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_dead_boots()
        workdir = Path(tempfile.mkdtemp(prefix=f"boot-{os.getpid()}-", dir=self.paths.boots_dir))
        try:
            initrd = workdir / "initrd.cpio"
            dmesg = {True: "always", False: "never", None: "on-failure"}[kernel_log]
            try:
                boot_archive = initramfs.build_boot(
                    script, token, dmesg=dmesg, console_loglevel=console_loglevel, files=files
                )
            except ValueError as err:
                raise LabError(errno.EINVAL, str(err)) from err
            self._write_initrd(initrd, boot_archive, extra_binaries)
            bound = Binds.plan(self.root, self._bind_dirs(devices, qemu_args, binds))
            (self.root / BOOT_MOUNT.relative_to("/")).mkdir(exist_ok=True)
            bound.add(workdir, at=BOOT_MOUNT)
            machine = qemu.QemuConfig(
                kernel=str(self.kernel),
                initrd=str(BOOT_MOUNT / initrd.name),
                accel=chosen,
                memory_mb=memory_mb,
                cpus=cpus,
                kernel_args=kernel_args,
                devices=devices,
                qemu_args=qemu_args,
            )
            done = re.compile(rf"\nLAB-RESULT {token} rc=(\d+)\n")
            outcome = qemu.run(
                namespace_argv(self.root, machine.argv(), bound),
                env=chroot_env(),
                timeout=timeout,
                done=done,
                echo=echo,
                cancel=cancel,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._result(outcome, token, chosen)

    def _sweep_dead_boots(self) -> None:
        """Remove boot dirs of processes that died without cleaning up
        (SIGTERM/SIGKILL run no ``finally``); their QEMU died with them."""
        for path in self.paths.boots_dir.glob("boot-*-*"):
            try:
                os.kill(int(path.name.split("-")[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except (ValueError, PermissionError):
                continue

    async def aboot(self, script: str, **kwargs: Any) -> GuestResult:
        """:meth:`boot` from trio code, in a worker thread so the caller's
        event loop (e.g. the vfio-user server the guest talks to) keeps
        running.  Cancelling the caller stops QEMU at once; the call returns
        (raising Cancelled) only after QEMU is dead and scratch files gone."""
        import trio

        cancel = threading.Event()
        finished = threading.Event()

        def work() -> GuestResult:
            try:
                return self.boot(script, cancel=cancel, **kwargs)
            finally:
                finished.set()

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            cancel.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(finished.wait)
            raise

    def _write_initrd(
        self, path: Path, boot_archive: CpioArchive, extra_binaries: Sequence[str]
    ) -> None:
        extras = self._extras_initramfs(extra_binaries)
        with open(path, "wb") as out:
            for part in (self.paths.base_initramfs, extras):
                if part is not None:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            boot_archive.write(out)

    @staticmethod
    def _bind_dirs(
        devices: Sequence[str],
        qemu_args: Sequence[str],
        binds: Sequence[str | os.PathLike[str]],
    ) -> list[str]:
        dirs: list[str] = []
        for device in devices:
            for sock in qemu.socket_paths(device):
                parent = os.path.dirname(sock)
                if not os.path.isabs(sock) or not os.path.isdir(parent):
                    raise LabError(errno.ENOENT, f"socket directory of {sock} does not exist")
                dirs.append(parent)
        for path in qemu.file_paths(qemu_args):
            if os.path.exists(path):
                dirs.append(path if os.path.isdir(path) else os.path.dirname(path))
        for entry in binds:
            path = os.fspath(entry)
            if not os.path.exists(path):
                raise LabError(errno.ENOENT, f"bind path does not exist: {path}")
            dirs.append(path if os.path.isdir(path) else os.path.dirname(path))
        return dirs

    @staticmethod
    def _result(outcome: qemu.RunOutcome, token: str, accel: str) -> GuestResult:
        console = outcome.console
        end = re.search(rf"\nLAB-RESULT {token} rc=(\d+)\n", console)
        if end is None:
            raise LabError(
                errno.EIO,
                f"QEMU exited (status {outcome.exit_status}) before the guest reported a "
                f"result\n{outcome.stderr.strip()}",
                console=console,
            )
        begin = console.find(f"LAB-BEGIN {token}\n")
        start = begin + len(f"LAB-BEGIN {token}\n") if begin >= 0 else 0
        log_begin = f"LAB-DMESG-BEGIN {token}\n"
        kernel_log = ""
        at = console.find(log_begin, end.end())
        if at >= 0:
            stop = console.find(f"LAB-DMESG-END {token}", at)
            kernel_log = console[at + len(log_begin) : stop if stop >= 0 else len(console)]
        return GuestResult(
            rc=int(end.group(1)),
            kernel_log=kernel_log,
            console=console,
            output=console[start : end.start()],
            elapsed=outcome.elapsed,
            accel=accel,
            qemu_stderr=outcome.stderr,
        )


def clean(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove what the lab put in its cache directory; returns what went."""
    paths = config.LabPaths.choose(cache_dir)
    removed = []
    with _locked(paths):
        for path in (paths.rootfs, paths.rootfs_partial, paths.initramfs_dir, paths.boots_dir):
            if path.exists():
                setup.remove_tree(path)
                removed.append(path)
        if paths.stamp.exists():
            paths.stamp.unlink()
            removed.append(paths.stamp)
    paths.lock.unlink(missing_ok=True)
    try:
        paths.cache.rmdir()  # only if nothing else lives there
    except OSError:
        pass
    return removed

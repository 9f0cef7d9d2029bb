"""Build the lab's Debian trixie chroot (QEMU from backports, the guest kernel).

Debian 12 cannot run QEMU >= 10.1 (the backport needs glibc >= 2.38), so the
lab debootstraps trixie into its cache and runs QEMU there.  The build goes
into ``rootfs.partial`` and is renamed into place, and the stamp is written
last, so an interrupted setup is simply redone.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from mdevcore.tools.lab import config
from mdevcore.tools.lab.aptsources import find_mirror
from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.namespace import chroot_env, mounts_under, namespace_argv

log = logging.getLogger(__name__)

_DPKG_EXCLUDES = """\
# The lab never reads documentation or translations: keep the chroot small.
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
"""

_POLICY_RC = "#!/bin/sh\n# No services start inside the lab chroot.\nexit 101\n"


def _sources(mirror: str) -> str:
    return (
        "Types: deb\n"
        f"URIs: {mirror}\n"
        f"Suites: {config.SUITE} {config.BACKPORTS}\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> None:
    log.info("lab setup: %s", what)
    started = time.monotonic()
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise LabError(errno.EIO, f"{what} failed (exit {proc.returncode}):\n{tail}")
    log.info("lab setup: %s done in %.1f s", what, time.monotonic() - started)


def _apt(root: Path, args: Sequence[str], what: str) -> None:
    # INITRD=No: the guest boots our own initramfs, so skip building Debian's.
    env = chroot_env({"DEBIAN_FRONTEND": "noninteractive", "INITRD": "No"})
    argv = ["apt-get", "-q", "-y", "-o", "Acquire::Languages=none", *args]
    _run(namespace_argv(root, argv), what, env)


def _install(root: Path, packages: Sequence[str], what: str, *, release: str = "") -> None:
    target = ["-t", release] if release else []
    _apt(root, ["install", "--no-install-recommends", *target, *packages], what)


def remove_tree(path: Path) -> None:
    """Delete a lab tree, refusing if anything is mounted inside it."""
    if not path.exists():
        return
    busy = mounts_under(path)
    if busy:
        raise LabError(errno.EBUSY, f"{path} has mounts inside ({busy[0]}); not removing")
    shutil.rmtree(path)


def build_rootfs(paths: config.LabPaths) -> dict[str, object]:
    """Create the chroot from scratch; returns what goes into the stamp."""
    if shutil.which("debootstrap") is None:
        raise LabError(errno.ENOENT, "debootstrap not found: apt-get install debootstrap")
    mirror = find_mirror()
    started = time.monotonic()
    part = paths.rootfs_partial
    remove_tree(part)
    remove_tree(paths.rootfs)
    part.parent.mkdir(parents=True, exist_ok=True)
    # debootstrap mounts /proc and /sys in the target itself: keep those
    # mounts in a private namespace too, so a crash cannot leave them behind.
    _run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "debootstrap",
            "--variant=minbase",
            config.SUITE,
            str(part),
            mirror,
        ],
        f"debootstrap {config.SUITE}",
        chroot_env(),
    )
    (part / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (part / "etc/apt/sources.list").unlink(missing_ok=True)
    (part / "etc/apt/sources.list.d/debian.sources").write_text(_sources(mirror))
    (part / "etc/dpkg/dpkg.cfg.d/mdevcore-lab-excludes").write_text(_DPKG_EXCLUDES)
    policy = part / "usr/sbin/policy-rc.d"
    policy.write_text(_POLICY_RC)
    policy.chmod(0o755)
    _apt(part, ["update"], "apt-get update")
    _install(part, config.BASE_PACKAGES, "install kernel, busybox, pciutils")
    _install(part, config.BACKPORT_PACKAGES, "install QEMU", release=config.BACKPORTS)
    optional: dict[str, bool] = {}
    for package in config.OPTIONAL_PACKAGES:
        try:
            _install(part, [package], f"install {package} (optional)")
            optional[package] = True
        except LabError as err:
            log.warning("lab setup: optional package %s not installed: %s", package, err)
            optional[package] = False
    _apt(part, ["clean"], "apt-get clean")
    part.rename(paths.rootfs)
    return {
        "format": config.ROOTFS_FORMAT,
        "suite": config.SUITE,
        "optional_packages": optional,
        "setup_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_stamp(paths: config.LabPaths) -> dict[str, object] | None:
    """The stamp of a complete chroot of the current format, else None."""
    try:
        stamp = json.loads(paths.stamp.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != config.ROOTFS_FORMAT:
        return None
    if not (paths.rootfs / "usr/bin/qemu-system-x86_64").exists():
        return None
    return stamp


def write_stamp(paths: config.LabPaths, stamp: dict[str, object]) -> None:
    tmp = paths.stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.rename(paths.stamp)

"""Where the lab keeps its files, and what it installs.

Everything lives under one cache directory (``/var/cache/mdevcore-lab``
unless ``$MDEVCORE_LAB_DIR`` or an explicit argument says otherwise), so
``lab clean`` is one ``rm -r`` and CI can cache it as a unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path("/var/cache/mdevcore-lab")
CACHE_ENV = "MDEVCORE_LAB_DIR"

SUITE = "trixie"
BACKPORTS = f"{SUITE}-backports"

# Bump when the chroot's content changes: an older cache is then rebuilt.
ROOTFS_FORMAT = 1
# Bump when the base initramfs (its /init or contents) changes; this only
# rebuilds the initramfs, not the chroot.
INITRAMFS_FORMAT = 4

BASE_PACKAGES = (
    "linux-image-amd64",
    "busybox-static",
    "pciutils",
    "pci.ids",
    "kmod",
    "xz-utils",
    "zstd",
    "cpio",
    "ca-certificates",
)
# vfio-user-pci appeared in QEMU 10.1; trixie itself has 10.0.
BACKPORT_PACKAGES = ("qemu-system-x86", "qemu-system-data", "qemu-system-common", "qemu-utils")
# Wanted by storage tests, but a lab without them is still useful.
OPTIONAL_PACKAGES = ("fio", "nvme-cli")

# Guest kernel modules put in the base initramfs (with their dependencies:
# virtio_net brings net_failover and failover).
GUEST_MODULES = ("nvme", "virtio_net")
# Binaries (chroot paths or names on the chroot's PATH) in the base initramfs.
BASE_BINARIES = ("lspci", "setpci")
GUEST_DATA_FILES = ("/usr/share/misc/pci.ids",)


@dataclass(frozen=True)
class LabPaths:
    """The files of one lab cache."""

    cache: Path

    @classmethod
    def choose(cls, cache_dir: str | os.PathLike[str] | None = None) -> LabPaths:
        if cache_dir is None:
            cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
        return cls(Path(cache_dir).absolute())

    @property
    def rootfs(self) -> Path:
        return self.cache / "rootfs"

    @property
    def rootfs_partial(self) -> Path:
        return self.cache / "rootfs.partial"

    @property
    def stamp(self) -> Path:
        """Written last by setup; its presence means the chroot is complete."""
        return self.cache / "rootfs.json"

    @property
    def lock(self) -> Path:
        return self.cache / "lock"

    @property
    def initramfs_dir(self) -> Path:
        return self.cache / "initramfs"

    @property
    def boots_dir(self) -> Path:
        """Per-boot scratch directories (removed after each boot)."""
        return self.cache / "boots"

    @property
    def base_initramfs(self) -> Path:
        return self.initramfs_dir / f"base-v{INITRAMFS_FORMAT}.cpio"

    def extras_initramfs(self, key: str) -> Path:
        return self.initramfs_dir / f"extra-v{INITRAMFS_FORMAT}-{key}.cpio"

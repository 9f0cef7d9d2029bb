"""The guest's initramfs: busybox, lspci, a few modules, and a test runner.

The base archive is built once per chroot (it holds everything that does not
change between boots); each boot appends small archives (extra Debian
binaries, then the test script).  The kernel unpacks concatenated newc
archives in order, later files replacing earlier ones.

Guest layout follows the chroot's merged /usr, with the chroot's own
symlinks (lib64 -> usr/lib64, ...) copied, so every library lands where the
dynamic loader of the chroot will look for it.
"""

from __future__ import annotations

import errno
import gzip
import logging
import lzma
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from mdevcore.tools.lab.cpio import CpioArchive
from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.rootpath import host_path, resolve_in_root

log = logging.getLogger(__name__)

# The guest's PID 1.  It runs the script from the per-boot archive with its
# output on the console between two markers carrying a per-boot token (so a
# script printing "LAB-RESULT" cannot confuse the host), then powers off.
INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
LAB_TOKEN=none
LAB_DMESG=on-failure
LAB_PRINTK=1
[ -r /lab/env ] && . /lab/env
# While the script runs, only messages at least as urgent as LAB_PRINTK reach
# the console (1: emergencies such as panics), so kernel warnings cannot
# split the script's output; dmesg keeps them all.
[ -n "$LAB_PRINTK" ] && echo "$LAB_PRINTK" > /proc/sys/kernel/printk
echo "LAB-BEGIN $LAB_TOKEN"
if [ -r /lab/script ]; then
    cd /tmp
    sh /lab/script </dev/null 2>&1
    rc=$?
    cd /
else
    echo "lab: no /lab/script in the initramfs"
    rc=127
fi
printf '\nLAB-RESULT %s rc=%d\n' "$LAB_TOKEN" "$rc"
# The console is kept quiet (loglevel=4) so kernel lines do not land in the
# script's output; the full kernel log follows the result when asked for,
# and always after a failure.
if [ "$LAB_DMESG" = always ] || { [ "$LAB_DMESG" = on-failure ] && [ "$rc" != 0 ]; }; then
    echo "LAB-DMESG-BEGIN $LAB_TOKEN"
    dmesg
    echo "LAB-DMESG-END $LAB_TOKEN"
fi
sync
poweroff -f
# Not reached unless poweroff failed: make the kernel stop instead of hanging.
echo o > /proc/sysrq-trigger
"""

_ROOT_DIRS = ("proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt", "lab")


def kernel_version(root: Path) -> str:
    """The newest kernel installed in the chroot's /boot."""
    found = [p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*")]
    if not found:
        raise LabError(errno.ENOENT, f"no kernel in {root / 'boot'}")

    def numeric(version: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", version)]

    return max(found, key=numeric)


def find_binary(root: Path, name: str) -> PurePosixPath:
    """A program's path in the chroot: absolute as given, else from PATH."""
    if name.startswith("/"):
        candidates = [PurePosixPath(name)]
    else:
        if "/" in name:
            raise LabError(errno.EINVAL, f"binary must be a name or absolute path: {name}")
        candidates = [PurePosixPath(d, name) for d in ("/usr/local/bin", "/usr/sbin", "/usr/bin")]
    for candidate in candidates:
        resolved = resolve_in_root(root, candidate, must_exist=False).path
        if os.access(host_path(root, resolved), os.X_OK) and host_path(root, resolved).is_file():
            return candidate
    raise LabError(errno.ENOENT, f"{name} not found in the lab chroot {root}")


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+) \(0x[0-9a-f]+\)$")


def parse_loader_list(text: str) -> list[PurePosixPath]:
    """Library paths from ``ld.so --list`` output (the vDSO has no file)."""
    libs = []
    for line in text.splitlines():
        if "not found" in line:
            raise LabError(errno.ENOENT, f"missing library: {line.strip()}")
        match = _LDD_LINE.match(line)
        if match and match.group(2).startswith("/"):
            libs.append(PurePosixPath(match.group(2)))
    return libs


def shared_libraries(root: Path, binary: PurePosixPath) -> list[PurePosixPath]:
    """The libraries ``binary`` loads, asked of the chroot's own loader."""
    proc = subprocess.run(
        ["chroot", str(root), "/lib64/ld-linux-x86-64.so.2", "--list", str(binary)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise LabError(errno.EIO, f"cannot list libraries of {binary}: {proc.stderr.strip()}")
    return parse_loader_list(proc.stdout)


def add_from_root(archive: CpioArchive, root: Path, path: PurePosixPath, mode: int = 0) -> None:
    """Copy a chroot file into the archive, with every symlink on its way."""
    resolved = resolve_in_root(root, path)
    for link, target in resolved.links:
        archive.add_symlink(link, target)
    source = host_path(root, resolved.path)
    if not source.is_file():
        raise LabError(errno.EINVAL, f"{path} is not a regular file in {root}")
    archive.add_file(resolved.path, source.read_bytes(), mode or (source.stat().st_mode & 0o7777))


def add_program(archive: CpioArchive, root: Path, name: str) -> PurePosixPath:
    """A chroot program and its libraries; returns its guest path."""
    binary = find_binary(root, name)
    add_from_root(archive, root, binary)
    for lib in shared_libraries(root, binary):
        add_from_root(archive, root, lib)
    return binary


def _top_level_links(archive: CpioArchive, root: Path) -> None:
    # bin -> usr/bin and friends, so guest paths match the chroot's.
    for entry in root.iterdir():
        if entry.is_symlink() and entry.name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            archive.add_symlink(entry.name, os.readlink(entry))


def add_busybox(archive: CpioArchive, root: Path) -> None:
    """Busybox and a link for each applet (busybox-static runs on the host)."""
    busybox = find_binary(root, "busybox")
    add_from_root(archive, root, busybox)
    real = resolve_in_root(root, busybox).path
    listing = subprocess.run(
        [str(host_path(root, real)), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    for applet in listing.split():
        where = resolve_in_root(root, PurePosixPath("/", applet).parent, must_exist=False).path
        link = where / PurePosixPath(applet).name
        if link != real:  # the list names busybox itself too
            archive.add_symlink(link, str(real))


def module_closure(modules_dep: str, wanted: Iterable[str]) -> list[str]:
    """Module files (relative, as in modules.dep) for ``wanted``, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
        by_name[_module_name(module)] = module
    order: list[str] = []

    def visit(module: str, trail: tuple[str, ...]) -> None:
        if module in order or module in trail:
            return
        for dep in deps.get(module, []):
            visit(dep, trail + (module,))
        order.append(module)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise LabError(errno.ENOENT, f"kernel module {name} not in modules.dep")
        visit(by_name[key], ())
    return order


def _module_name(path: str) -> str:
    base = PurePosixPath(path).name
    return base.split(".ko")[0].replace("-", "_")


def _uncompressed_name(path: str) -> str:
    return re.sub(r"\.ko\.(xz|gz|zst)$", ".ko", path)


def _decompress(root: Path, inside: PurePosixPath) -> bytes:
    # busybox insmod/modprobe want plain .ko files.
    data = host_path(root, inside).read_bytes()
    if inside.name.endswith(".xz"):
        return lzma.decompress(data)
    if inside.name.endswith(".gz"):
        return gzip.decompress(data)
    if inside.name.endswith(".zst"):
        return subprocess.run(
            ["chroot", str(root), "zstd", "-dc", str(inside)], capture_output=True, check=True
        ).stdout
    return data


def add_modules(archive: CpioArchive, root: Path, kver: str, wanted: Sequence[str]) -> list[str]:
    """Decompressed modules plus a matching modules.dep; returns their names."""
    # /lib/modules resolves to /usr/lib/modules in the chroot and, through
    # the copied lib -> usr/lib link, in the guest too.
    moddir = resolve_in_root(root, f"/lib/modules/{kver}").path
    dep_text = host_path(root, moddir / "modules.dep").read_text()
    deps = {
        line.partition(":")[0]: line.partition(":")[2].split()
        for line in dep_text.splitlines()
        if ":" in line
    }
    files = module_closure(dep_text, wanted)
    dep_lines = []
    for module in files:
        archive.add_file(moddir / _uncompressed_name(module), _decompress(root, moddir / module))
        plain_deps = " ".join(_uncompressed_name(d) for d in deps[module])
        dep_lines.append(f"{_uncompressed_name(module)}: {plain_deps}".rstrip())
    archive.add_file(moddir / "modules.dep", ("\n".join(dep_lines) + "\n").encode())
    return [_module_name(m) for m in files]


def build_base(
    root: Path,
    *,
    modules: Sequence[str],
    binaries: Sequence[str],
    data_files: Sequence[str],
) -> CpioArchive:
    """The initramfs every boot starts from."""
    archive = CpioArchive()
    _top_level_links(archive, root)
    for name in _ROOT_DIRS:
        if name not in archive:
            archive.add_dir(name, 0o1777 if name == "tmp" else 0o755)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    archive.add_char_device("dev/console", 5, 1)
    add_busybox(archive, root)
    for name in binaries:
        add_program(archive, root, name)
    for path in data_files:
        add_from_root(archive, root, PurePosixPath(path))
    loaded = add_modules(archive, root, kernel_version(root), modules)
    log.info("lab initramfs: modules %s", ", ".join(loaded))
    archive.add_file("init", INIT.encode(), 0o755)
    return archive


def build_extras(root: Path, binaries: Sequence[str]) -> CpioArchive:
    """Extra chroot programs (fio, nvme, dd, ...) with their libraries."""
    archive = CpioArchive()
    for name in binaries:
        add_program(archive, root, name)
    return archive


def build_boot(
    script: str,
    token: str,
    *,
    dmesg: str = "on-failure",
    console_loglevel: int | None = 1,
    files: Mapping[str, bytes | str] | None = None,
) -> CpioArchive:
    """The per-boot archive: the test script, the marker token, when to dump
    the kernel log (``always``, ``on-failure`` or ``never``), the console
    loglevel while the script runs (None: keep the boot's) and extra guest
    files (absolute guest path -> content; mode 0755 so scripts can run)."""
    if dmesg not in ("always", "on-failure", "never"):
        raise ValueError(f"bad dmesg mode {dmesg!r}")
    if console_loglevel is not None and not 0 <= console_loglevel <= 8:
        raise ValueError(f"bad console loglevel {console_loglevel!r}")
    printk = "" if console_loglevel is None else str(console_loglevel)
    env = f"LAB_TOKEN={token}\nLAB_DMESG={dmesg}\nLAB_PRINTK={printk}\n"
    archive = CpioArchive()
    for guest_path, content in (files or {}).items():
        if not guest_path.startswith("/") or guest_path.rstrip("/") in ("/lab", "/init"):
            raise ValueError(f"bad guest file path {guest_path!r}")
        data = content.encode() if isinstance(content, str) else bytes(content)
        archive.add_file(guest_path, data, 0o755)
    archive.add_file("lab/script", script.encode(), 0o755)
    archive.add_file("lab/env", env.encode(), 0o644)
    return archive

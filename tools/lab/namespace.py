"""Run a command inside the chroot, in a private mount namespace.

``unshare --mount --propagation private`` gives the command its own copy of
the mount table; /dev, /proc, /sys and any requested host directories are
bound into the chroot only there.  When the last process of the namespace
exits, the kernel drops those mounts, so nothing can stay mounted on the host,
whatever happens to the caller (timeout, Ctrl-C, kill -9).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.rootpath import host_path, resolve_in_root

# Runs inside the new namespace: $1 = chroot, then operations, "--", argv.
#   tmpfs DIR     a fresh tmpfs on DIR, seen only by this namespace
#   bind SRC DST  bind host SRC on DST (made if missing: inside a tmpfs above,
#                 so nothing is created on disk)
_NS_SCRIPT = r"""
set -e
root=$1; shift
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --bind /sys "$root/sys"
while [ "$1" != "--" ]; do
    case "$1" in
    tmpfs) mount -t tmpfs -o mode=0755 lab-tmpfs "$2"; shift 2 ;;
    bind) mkdir -p "$3"; mount --bind "$2" "$3"; shift 3 ;;
    *) echo "lab-namespace: bad operation $1" >&2; exit 125 ;;
    esac
done
shift
exec chroot "$root" "$@"
"""

# Chroot directories nothing in the lab reads: a missing mount point below
# one of them is made in a namespace-private tmpfs laid over it.
_SCRATCH_TOP = ("tmp", "run", "mnt", "media", "srv", "home", "opt")

_PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def chroot_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """A small, predictable environment for programs in the chroot."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    env.update({k: os.environ[k] for k in _PASS_ENV if k in os.environ})
    env.update(extra)
    return env


def require_root_tools() -> None:
    """Fail early, with the reason, when the lab cannot work on this host."""
    if os.geteuid() != 0:
        raise LabError(errno.EPERM, "the lab needs root (chroot, mount namespaces)")
    for tool in ("unshare", "mount", "chroot"):
        if shutil.which(tool) is None:
            raise LabError(errno.ENOENT, f"{tool} not found on PATH (util-linux, coreutils)")


@dataclass
class Binds:
    """Host directories to bind at the same path inside the chroot.

    QEMU runs in the chroot, so a socket at /run/mdevd/x.sock on the host must
    be at /run/mdevd/x.sock in the chroot too: then the daemon's -device line
    works verbatim.  Missing mount points are not made on disk (removing them
    afterwards would detach the same bind in a concurrent boot's namespace):
    they are made in a private tmpfs laid over the chroot's top directory
    (/tmp, /run, ...; a missing top directory such as /work is created once
    and kept, empty).  Only below system directories (/usr, /var) are missing
    directories created on disk, and kept.
    """

    root: Path
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    tmpfs: list[Path] = field(default_factory=list)

    @classmethod
    def plan(cls, root: Path, host_dirs: Sequence[str | os.PathLike[str]]) -> Binds:
        binds = cls(root)
        for entry in host_dirs:
            binds.add(Path(entry))
        return binds

    def add(self, src: Path, at: PurePosixPath | None = None) -> None:
        """Bind ``src`` at ``at`` in the chroot (default: its own path)."""
        if not src.is_absolute():
            raise LabError(errno.EINVAL, f"bind path must be absolute: {src}")
        if not src.is_dir():
            raise LabError(errno.ENOENT, f"bind source is not a directory: {src}")
        if at is None:
            if src == Path("/"):
                raise LabError(errno.EINVAL, "cannot bind / into the chroot")
            if src.parts[1] in ("dev", "proc", "sys"):
                return  # already visible through the namespace's own binds
            at = PurePosixPath(src)
        inside = resolve_in_root(self.root, at, must_exist=False).path
        dst = host_path(self.root, inside)
        if any(dst == known for _, known in self.pairs):
            return
        if not dst.is_dir():
            top = self.root / inside.parts[1]
            if not top.exists():
                top.mkdir(mode=0o755)  # kept: an empty directory, reused later
            if inside.parts[1] in _SCRATCH_TOP or not any(top.iterdir()):
                if top not in self.tmpfs:
                    self.tmpfs.append(top)
            else:
                dst.mkdir(parents=True, exist_ok=True)  # kept, see above
        self.pairs.append((src, dst))

    def operations(self) -> list[str]:
        ops: list[str] = []
        for top in self.tmpfs:
            ops += ["tmpfs", str(top)]
        for src, dst in self.pairs:
            ops += ["bind", str(src), str(dst)]
        return ops


def namespace_argv(root: Path, argv: Sequence[str], binds: Binds | None = None) -> list[str]:
    """The host command that runs ``argv`` in the chroot, in a private namespace."""
    ops = binds.operations() if binds else []
    prefix: list[str] = []
    if shutil.which("setpriv"):
        # If the caller dies without cleaning up, the kernel kills the child.
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
    return [
        *prefix,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        _NS_SCRIPT,
        "lab-namespace",
        str(root),
        *ops,
        "--",
        *argv,
    ]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace."""
    prefix = str(path.absolute())
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found

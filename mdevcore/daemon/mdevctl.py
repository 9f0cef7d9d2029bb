"""Run the real, unmodified mdevctl against the mirror.

mdevctl 1.2.0 has its paths compiled in (/sys, /etc/mdevctl.d), so it runs
in a private mount namespace where the mirror is bind-mounted over /sys
and a scratch directory over /etc/mdevctl.d (so ``define`` never touches
the host's configuration).  The host's mounts are not changed.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

from mdevcore.sysfs.mounts import is_mounted

# Run inside the new namespace: $1 = mirror, $2 = config dir, then mdevctl argv.
_NAMESPACE_SCRIPT = (
    'mount --bind "$1" /sys && mount --bind "$2" /etc/mdevctl.d && shift 2 && exec "$@"'
)


def find_mdevctl() -> str:
    for candidate in (shutil.which("mdevctl"), "/usr/sbin/mdevctl", "/usr/bin/mdevctl"):
        if candidate and Path(candidate).exists():
            return candidate
    raise OSError(errno.ENOENT, "mdevctl is not installed (apt-get install mdevctl)")


def prepare_config(config: Path) -> None:
    """Create the scratch config dir with the script dirs mdevctl insists on."""
    for sub in ("scripts.d/callouts", "scripts.d/notifiers"):
        (config / sub).mkdir(parents=True, exist_ok=True)


def mdevctl_argv(sysfs: Path, config: Path, args: list[str]) -> list[str]:
    """The command line that runs ``mdevctl ARGS`` against ``sysfs``."""
    if not is_mounted(sysfs):
        raise OSError(errno.ENOENT, f"no sysfs mirror mounted at {sysfs} (start mdevd serve)")
    if not Path("/etc/mdevctl.d").is_dir():
        raise OSError(errno.ENOENT, "/etc/mdevctl.d is missing (is the mdevctl package installed?)")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise OSError(errno.ENOENT, "unshare(1) is missing (util-linux)")
    prepare_config(config)
    return [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _NAMESPACE_SCRIPT,
        "mdevd-mdevctl",
        str(sysfs.resolve()),
        str(config.resolve()),
        find_mdevctl(),
        *args,
    ]


def run_mdevctl(sysfs: Path, config: Path, args: list[str]) -> int:
    """Run mdevctl with our stdin/stdout/stderr; return its exit code."""
    return subprocess.run(mdevctl_argv(sysfs, config, args), check=False).returncode

"""The one line ``mdevd`` prints for an error that stops it, and its exit status.

The daemon's steps (serve, persist, the mirror's mount, the control socket)
raise OSErrors as the system gives them: ``[Errno 2] No such file or
directory: '/proc/nope'``.  The user gave each path for a purpose, so the
path says what was being done: an error on the mirror's mount point is
"cannot mount the sysfs mirror at /proc/nope: No such file or directory".
:func:`explain` maps an error's path (``filename``, or a path its message
starts with) to the role the command line gave that path; errors raised
with a message of their own (``OSError(EINVAL, "--parent-opt ...")``)
already name their object and keep it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

# Exit statuses, as `mdevd --help` lists them.
EXIT_OK = 0
EXIT_FAILED = 1  # an operation failed; the error line says which, on what
EXIT_USAGE = 2  # the command line or the config file is wrong
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2) before the daemon was ready

EXIT_STATUS = """\
exit status:
  0    done (serve: stopped by SIGTERM or SIGINT)
  1    an operation failed: the "mdevd: error:" line names it and the path or object
  2    bad usage: an unknown flag or value, or a bad config file (FILE:LINE: KEY: ...)
  130  interrupted before serve was ready
  mdevd mdevctl, devlink and ip exit as the tool they stand in for;
  mdevd migrate: see mdevd migrate --help"""


@dataclasses.dataclass(frozen=True)
class Role:
    """A path the command line gave, and what failing on it means."""

    path: Path
    operation: str  # "mount the sysfs mirror at": the path follows
    inside: str = ""  # for a path below it, if that is another operation


def roles_for_serve(
    run_dir: Path,
    sysfs: Path,
    persist: Path | None,
    mdevctl_config: Path | None,
    backing_dir: Path | None = None,
) -> list[Role]:
    """What each path of ``mdevd serve`` is for (the control socket is in RUN_DIR)."""
    roles = [
        Role(run_dir, "create the run directory", inside="serve in the run directory"),
        Role(run_dir / "mdevd.ctl", "listen on the control socket"),
        Role(sysfs, "mount the sysfs mirror at"),
    ]
    if persist is not None:
        roles.append(Role(persist, "restore and record devices in"))
    if mdevctl_config is not None:
        roles.append(Role(mdevctl_config, "read the mdevctl definitions in"))
    if backing_dir is not None:
        roles.append(Role(backing_dir, "create the pds namespace files in"))
    return roles


def _within(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _role(path: Path, roles: Iterable[Role]) -> Role | None:
    """The most specific role ``path`` falls under (RUN_DIR/sys before RUN_DIR)."""
    matching = [r for r in roles if _within(path, r.path)]
    return max(matching, key=lambda r: len(r.path.parts), default=None)


def explain(error: OSError, roles: Iterable[Role] = ()) -> str:
    """What failed, on what, and the system's reason; without the "mdevd: error: "."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    if error.filename is not None:
        path = Path(os.fsdecode(error.filename))
    else:
        # OSError(errno, "PATH is busy (...)"): a message that starts with a path.
        first, _, rest = reason.partition(" ")
        role = _role(Path(first), roles) if first.startswith("/") and rest else None
        if role is None:
            return reason
        path, reason = Path(first), rest.removeprefix("is ")
    role = _role(path, roles)
    if role is None:
        return f"{path}: {reason}"
    if path == role.path:
        return f"cannot {role.operation} {path}: {reason}"
    return f"cannot {role.inside or role.operation} {role.path}: {path}: {reason}"

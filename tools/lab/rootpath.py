"""Resolve paths inside a chroot without leaving it.

A chroot's symlinks are relative to the chroot (``/lib64`` -> ``usr/lib64``,
``/var/run`` -> ``/run``).  Following them with the host's ``realpath`` would
escape into the host tree, so the lab resolves them itself, treating the
chroot directory as ``/``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mdevcore.tools.lab.errors import LabError

_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS


@dataclass
class Resolved:
    """Where a chroot path really is, and the symlinks on the way there."""

    path: PurePosixPath  # absolute, as seen inside the chroot
    links: list[tuple[PurePosixPath, str]] = field(default_factory=list)  # (link, target)


def resolve_in_root(root: Path, path: str | PurePosixPath, *, must_exist: bool = True) -> Resolved:
    """Resolve ``path`` as the chroot at ``root`` would.

    Missing components are kept literally (``must_exist=False``) so a caller
    can learn where a directory it is about to create will really live.
    """
    pending = list(PurePosixPath("/", path).parts[1:])
    done = PurePosixPath("/")
    links: list[tuple[PurePosixPath, str]] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = done.parent
            continue
        candidate = done / part
        host = root / candidate.relative_to("/")
        if host.is_symlink():
            hops += 1
            if hops > _MAX_LINKS:
                raise LabError(errno.ELOOP, f"too many symlinks resolving {path} in {root}")
            target = os.readlink(host)
            links.append((candidate, target))
            if target.startswith("/"):
                done = PurePosixPath("/")
            pending = list(PurePosixPath(target).parts) + pending
            if target.startswith("/"):
                pending = pending[1:]  # drop the leading "/" part
            continue
        if must_exist and not host.exists():
            raise LabError(errno.ENOENT, f"{candidate} does not exist in {root}")
        done = candidate
    return Resolved(done, links)


def host_path(root: Path, inside: PurePosixPath) -> Path:
    """The host path of an absolute chroot path (no symlink resolution)."""
    return root / inside.relative_to("/")

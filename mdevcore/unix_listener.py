"""A listening UNIX stream socket bound at a path, and the path's clean-up.

Both the vfio-user device sockets and mdevd's control socket live as files
in the run directory: a stale one left by a killed process is replaced, a
non-socket at the path is refused (EEXIST), and the file goes away with
the listener.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator


def unlink_stale_socket(path: str | os.PathLike[str]) -> None:
    """Remove a socket left by an earlier server; EEXIST if ``path`` is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)


@contextlib.contextmanager
def unix_listener(
    path: str | os.PathLike[str], backlog: int, *, mode: int | None = None
) -> Iterator[socket.socket]:
    """A non-blocking listening socket at ``path``; closed and unlinked on exit."""
    unlink_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(path))
        if mode is not None:
            os.chmod(path, mode)
        listener.listen(backlog)
        listener.setblocking(False)
        yield listener
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

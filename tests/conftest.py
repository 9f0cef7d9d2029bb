"""Fixtures shared by every test directory."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short private directory (replaces pytest's deep one).

    UNIX socket paths are limited to 108 bytes, and pytest's own tmp_path
    (/tmp/pytest-of-root/pytest-NNN/<test name>/...) plus a run dir and a
    UUID socket name goes past that once NNN has three digits.
    """
    path = Path(tempfile.mkdtemp(prefix="mdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fd_table_full() -> Callable[[], AbstractContextManager[None]]:
    """Makes ``with fd_table_full():`` a block in which every new fd fails EMFILE.

    Lowers RLIMIT_NOFILE to just above the highest fd open and fills the
    holes below it; both are undone on exit.  Keep the block short and
    free of anything that opens files (logging to the terminal is fine).
    """

    @contextlib.contextmanager
    def full() -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        fillers: list[int] = [null]
        highest = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        try:
            while True:
                try:
                    fillers.append(os.dup(null))
                except OSError as e:
                    if e.errno != errno.EMFILE:
                        raise
                    break
            yield
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return full


@pytest.fixture
def break_listener() -> Callable[[str], None]:
    """``break_listener(path)``: this process's listener at ``path`` fails accept() EINVAL.

    The kernel does that for a blocking listening socket that was shut
    down; blocking mode is a flag of the open file, shared by every handle
    on it, so a second handle (from /proc/self/fd) can set both.
    """

    def breaks(path: str) -> None:
        for name in os.listdir("/proc/self/fd"):
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                sock = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue
            with sock:
                if sock.family == socket.AF_UNIX and sock.getsockname() == path:
                    sock.setblocking(True)
                    sock.shutdown(socket.SHUT_RDWR)
                    return
        raise LookupError(f"no listening socket at {path}")

    return breaks

"""A wake-up any thread may set and a trio task waits for: an eventfd.

The VF's hooks (bar_write, on_reset, on_migration_state) may run on a
vfio-user connection thread (``mdevcore.vfio_user.locking``), where trio
objects must not be touched; its processing task runs in trio.  An eventfd
joins the two: ``set`` is one ``write`` (thread-safe, never blocks: the
counter saturates long after any number of sets), ``wait`` parks the task
in trio's epoll until it is readable and drains it.
"""

from __future__ import annotations

import math
import os

import trio


class Wakeup:
    """Set from any thread; awaited by one trio task; closed by its owner."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    def set(self) -> None:
        if not self._closed:
            os.eventfd_write(self.fd, 1)

    def clear(self) -> bool:
        """Drain the counter; True if it had been set."""
        if self._closed:
            return False
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    async def wait(self, timeout: float = math.inf) -> bool:
        """Wait until set (then clear it) or ``timeout`` seconds pass; True if it was set."""
        if self.clear():
            await trio.lowlevel.checkpoint()
            return True
        with trio.move_on_after(timeout):
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:
                return False  # closed under us (the device was removed): see ``closed``
        return self.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # A task parked in wait() must hear of it before the fd number is reused.
            trio.lowlevel.notify_closing(self.fd)
        except RuntimeError:
            pass  # not in a trio thread: nobody waits in this one
        os.close(self.fd)

"""The daemon's threading rule for devices, stated once, and its helpers.

A vfio-user connection may be served on its own thread
(``mdevcore.vfio_user.threaded``) while the rest of the daemon (sysfs,
the control socket, timers, device background tasks, migration) runs in
the trio thread.  One rule keeps a device whole:

* A backend is served on a thread only if it says so: ``serve_in_thread``
  true (PciDevice decides it from ``thread_safe_hooks``).  Such a backend's
  methods are then called from the connection's thread, always with its
  ``device_lock`` held, so they must not touch trio objects (Events,
  channels, ``trio.current_time``): signal the trio side with thread-safe
  means (an eventfd, ``TrioToken.run_sync_soon``).  Interrupt eventfd
  writes are thread-safe.
* Trio-side code that touches such a device's state (its background task,
  sysfs attributes, the control socket, timers, migration, removal) holds
  ``device_lock``.  PciDevice does that for the parent: its backend entry
  points and public methods take the lock, and its ``background`` runs with
  the lock held except while it awaits (:func:`run_locked`).
* The server never holds the lock while it waits for a client (a socket
  call), so the trio side waits at most for one turn of the engine.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar

from mdevcore.vfio_user.backend import DeviceBackend

T = TypeVar("T")


class DeviceLock(Protocol):
    """What the server needs of a backend's ``device_lock`` (a threading.RLock)."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
        /,
    ) -> bool | None: ...


def device_lock(backend: DeviceBackend) -> DeviceLock | None:
    """The backend's lock if it may be served on a thread, else None (trio only)."""
    if not getattr(backend, "serve_in_thread", False):
        return None
    lock: DeviceLock | None = getattr(backend, "device_lock", None)
    if lock is None:
        raise TypeError(f"{type(backend).__name__} has serve_in_thread but no device_lock")
    return lock


# True in a task that run_locked runs (and in the tasks it starts): the
# device's connections are on threads and this task holds the lock.
_LOCKED_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mdevcore_locked_run", default=False
)


def in_locked_run() -> bool:
    """Whether the calling trio task runs under :func:`run_locked`.

    A device's ``background`` asks this to learn that its connections are
    served on threads (so the device lock guards every access and a thread
    of its own may take it too), without peeking into the lock.
    """
    return _LOCKED_RUN.get()


@types.coroutine
def _forward(trap: Any) -> Generator[Any, Any, Any]:
    return (yield trap)


async def run_locked(fn: Callable[[], Awaitable[T]], lock: DeviceLock) -> T:
    """Run ``fn()`` in this task with ``lock`` held, except while it awaits.

    Each step of the coroutine (from one await to the next) runs under the
    lock; what it awaits is passed to trio as is, so cancellation, nurseries
    and checkpoints behave as if ``fn()`` were awaited directly.  Tasks that
    ``fn`` starts in a nursery of its own are not covered: they take the
    lock themselves.
    """
    _LOCKED_RUN.set(True)  # this task's context only (trio gives each task a copy)
    coro = fn().__await__()
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            with lock:
                try:
                    trap = coro.send(value) if error is None else coro.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
            value, error = None, None
            try:
                value = await _forward(trap)
            except BaseException as e:  # handed to the coroutine, which decides
                error = e
    finally:
        del error
        coro.close()

"""One observer mechanism for the daemon's models (the mdev core, the PCI bus).

The threading rule, the same for every model: a model changes in one
place at a time (MdevCore under its lock; the PCI bus from the daemon's
trio thread, where sysfs writes and the control socket run), and it
delivers each event synchronously, in order, to every observer, before
the change returns.  So an observer (a sysfs view, the vfio-user server
manager) sees the model exactly as the event describes it.  Observers
must therefore be quick: no blocking I/O, no calls back into the model
that change it; work that must wait (binding a socket, cancelling a
server) is handed to trio (``NamedServers`` schedules it with a trio
token and the mirror settles it before the sysfs write returns).  An
observer that raises is logged and does not undo the change: the driver
already did it, and the other observers must still hear of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

E = TypeVar("E")


class Observers(Generic[E]):
    """The observers of one model and their delivery (see the module doc)."""

    def __init__(self) -> None:
        self._observers: list[Callable[[E], None]] = []

    def subscribe(self, observer: Callable[[E], None], replay: Iterable[E] = ()) -> None:
        """Add ``observer``; it first receives ``replay`` (what exists already)."""
        for event in replay:
            observer(event)
        self._observers.append(observer)

    def unsubscribe(self, observer: Callable[[E], None]) -> None:
        self._observers.remove(observer)

    def emit(self, event: E) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                log.exception("observer %r failed on %r", observer, event)

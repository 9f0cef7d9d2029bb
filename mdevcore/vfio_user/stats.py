"""What one device's vfio-user server counted: requests, clients, errors by kind.

A :class:`DeviceStats` belongs to a DeviceServer and outlives its clients,
so an operator can still read what a hostile client did after it left
(sysfs ``vfio_user/errors``, ``mdevd status``).  Records a client can
provoke go through a :class:`~mdevcore.ratelimit.RateLimitedLog` keyed by
the device: the first ``burst`` of each kind are logged (naming the
client), then one summary per interval.  Throttling is per device, not per
connection, so a client that reconnects in a loop gets no fresh burst.

Kinds are few by construction ("EINVAL REGION_READ", "unsolicited reply"):
commands outside the protocol count as "UNKNOWN", so no client can invent
new counters.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Hashable, Mapping
from typing import Protocol

from mdevcore.ratelimit import RateLimitedLog
from mdevcore.vfio_user.constants import Command

# What the engine and server log about clients: "mdevcore.vfio_user: dev#3: ..."
log = logging.getLogger("mdevcore.vfio_user")

LOG_BURST = 10
LOG_INTERVAL = 10.0

_COMMAND_NAMES = {int(c): c.name for c in Command}


def failure_kind(errno_value: int, command: int) -> str:
    """The counter a failed request goes to, e.g. "EINVAL REGION_READ"."""
    name = errno.errorcode.get(errno_value, "E?")
    return f"{name} {_COMMAND_NAMES.get(command, 'UNKNOWN')}"


def log_fields(device: Hashable, kind: str) -> Mapping[str, object]:
    """What mdevd's JSON log shows of a record: the device, the kind, its errno."""
    fields: dict[str, object] = {"device": str(device), "event": kind}
    code = kind.partition(" ")[0]
    if code in errno.errorcode.values():
        fields["errno"] = code
    return fields


class Counted(Protocol):
    """A connection's counters (mdevcore.vfio_user.engine.Connection)."""

    handled: int  # messages
    replies: int  # of which replies to our requests


class DeviceStats:
    """Counters of one device's server, and its rate-limited error log.

    ``requests`` counts every request handled (answered, failed or posted)
    since the server started; ``clients`` the connections accepted.  Live
    connections are read when asked (``attach``/``detach``), so the hot
    path counts nothing for us.
    """

    def __init__(
        self,
        name: str,
        *,
        logger: logging.Logger = log,
        burst: int = LOG_BURST,
        interval: float = LOG_INTERVAL,
    ) -> None:
        self.name = name
        self.clients = 0
        self._requests_done = 0  # by detached connections
        self._live: list[Counted] = []
        self._errors = RateLimitedLog(logger, burst=burst, interval=interval, fields=log_fields)
        # Connection lifecycle lines: throttled alike, not counted as errors.
        self._events = RateLimitedLog(logger, burst=burst, interval=interval, fields=log_fields)

    def attach(self, conn: Counted) -> None:
        self._live.append(conn)

    def detach(self, conn: Counted) -> None:
        """The connection ended: keep its count, drop the connection."""
        if conn in self._live:
            self._live.remove(conn)
            self._requests_done += conn.handled - conn.replies

    @property
    def requests(self) -> int:
        live = sum(c.handled - c.replies for c in self._live)
        return self._requests_done + live

    def error(
        self,
        kind: str,
        msg: str,
        *args: object,
        level: int = logging.INFO,
        exc_info: BaseException | bool | None = None,
    ) -> None:
        """Count one error of ``kind``; log it unless this device's kind is throttled."""
        self._errors.log(level, self.name, kind, msg, *args, exc_info=exc_info)

    def event(self, kind: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        """Log a connection event (connect, negotiate, leave), throttled per kind."""
        self._events.log(level, self.name, kind, msg, *args)

    def flush(self) -> None:
        """Summarise what is suppressed so far (a client left)."""
        self._errors.flush(self.name)
        self._events.flush(self.name)

    def errors(self) -> dict[str, int]:
        """Error counts by kind since the server started."""
        return self._errors.total(self.name)

    def errors_text(self) -> str:
        """One ``KIND COUNT`` line per kind (sorted), then ``total N``."""
        errors = self.errors()
        lines = [f"{kind} {n}" for kind, n in sorted(errors.items())]
        lines.append(f"total {sum(errors.values())}")
        return "\n".join(lines) + "\n"

"""sd_notify(3) without libsystemd: tell the service manager that mdevd is ready.

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET`` to a datagram
socket (a path, or ``@name`` in the abstract namespace) and waits for
``READY=1`` before it considers the service started.  Without the
variable, nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("NOTIFY_SOCKET=%r is neither a path nor abstract: not notified", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        # The service manager is gone or the socket is wrong: serving goes on.
        log.warning("cannot notify %s: %s", os.environ["NOTIFY_SOCKET"], e)
        return False
    return True

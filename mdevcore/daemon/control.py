"""mdevd's control socket: JSON lines on ``<run-dir>/mdevd.ctl``.

One request per line, one reply per line.  Commands:
``{"cmd": "devlink", "argv": [...]}`` answered by ``{"rc", "out", "err"}``
(see ``mdevcore.daemon.devlink``), ``"cmd": "ip"`` the same way
(``mdevcore.daemon.iplink``), and ``{"cmd": "status"}`` answered by
``{"rc": 0, "devices": [...]}`` (see ``mdevcore.daemon.status``).
Requests run on the daemon's trio
thread, so they see and change the same state as sysfs writes; after a
request that changed something, ``settle`` is awaited before the reply,
so what it started (a socket, a device) exists when the client returns.

The socket is root-only (0600) and every request is size-limited and
validated: a bad one gets an error reply, never a crash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from mdevcore.daemon.devlink import DevlinkRegistry, run_devlink
from mdevcore.daemon.iplink import NetdevRegistry, run_ip
from mdevcore.unix_listener import unix_listener

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Settle = Callable[[], Awaitable[None]]
Status = Callable[[], list[dict[str, object]]]


def handle_request(
    registry: DevlinkRegistry,
    line: bytes,
    netdevs: NetdevRegistry | None = None,
    *,
    status: Status | None = None,
) -> dict[str, Any]:
    """One request line -> the reply object (never raises for bad input)."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        return {"rc": 1, "out": "", "err": f"mdevd: malformed request: {e}\n"}
    if isinstance(request, dict) and request.get("cmd") == "status" and status is not None:
        return {"rc": 0, "out": "", "err": "", "devices": status()}
    if not isinstance(request, dict) or request.get("cmd") not in ("devlink", "ip"):
        return {"rc": 1, "out": "", "err": "mdevd: unknown control command\n"}
    argv = request.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return {"rc": 1, "out": "", "err": "mdevd: argv must be a list of strings\n"}
    try:
        if request["cmd"] == "ip":
            reply = run_ip(netdevs if netdevs is not None else NetdevRegistry(), argv)
        else:
            reply = run_devlink(registry, argv)
    except Exception:
        # A driver's parameter hook failing in an unforeseen way must not
        # take the control server (and with it the daemon) down.
        log.exception("control: devlink %s crashed", argv)
        return {"rc": 1, "out": "", "err": "mdevd: internal error, see the daemon's log\n"}
    return {"rc": reply.rc, "out": reply.out, "err": reply.err}


class ControlServer:
    def __init__(
        self,
        path: Path,
        registry: DevlinkRegistry,
        settle: Settle,
        netdevs: NetdevRegistry | None = None,
        *,
        status: Status | None = None,
    ) -> None:
        self.path = path
        self.netdevs = netdevs
        self.registry = registry
        self.settle = settle
        self.status = status

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; the socket file is removed on the way out."""
        with unix_listener(self.path, 8, mode=0o600) as raw:
            listener = trio.socket.from_stdlib_socket(raw)
            log.info("control socket at %s", self.path)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._connection, trio.SocketStream(sock))

    async def _connection(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            try:
                while True:
                    while b"\n" not in buf:
                        chunk = await stream.receive_some(MAX_REQUEST)
                        if not chunk:
                            return
                        buf += chunk
                        if len(buf) > MAX_REQUEST and b"\n" not in buf:
                            log.warning("control: request over %d bytes; closing", MAX_REQUEST)
                            return
                    line, buf = buf.split(b"\n", 1)
                    reply = handle_request(self.registry, line, self.netdevs, status=self.status)
                    await self.settle()
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

"""``mdevd status``: every vfio-user server of the running daemon, with its counters.

The daemon answers ``{"cmd": "status"}`` on its control socket
(``mdevcore.daemon.control``) with ``{"rc": 0, "devices": [...]}``, one
object per server from ``NamedServers.status``; this module prints them::

    mdev 3b1f0c2e-... (mtty-2)
      socket    /run/mdevd/3b1f0c2e-....sock
      state     serving, client connected (3b1f0c2e-...#2)
      requests  5120 from 2 clients
      errors    3
        EINVAL REGION_READ 2
        EINVAL UNKNOWN 1

``--json`` prints the objects as the daemon sent them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mdevcore.daemon.devlink import control_path, request


def format_status(devices: Sequence[Mapping[str, object]]) -> str:
    """The text ``mdevd status`` prints for the daemon's device objects."""
    if not devices:
        return "no devices served\n"
    lines: list[str] = []
    for dev in devices:
        state = str(dev.get("state", "?"))
        if dev.get("connected"):
            state += f", client connected ({dev.get('client')})"
        elif state == "serving":
            state += ", no client"
        errors = dev.get("errors")
        kinds = errors if isinstance(errors, dict) else {}
        lines += [
            str(dev.get("label") or dev.get("name")),
            f"  socket    {dev.get('socket')}",
            f"  state     {state}",
            f"  requests  {dev.get('requests', 0)} from {dev.get('clients', 0)} clients",
            f"  errors    {sum(int(n) for n in kinds.values())}",
        ]
        lines += [f"    {kind} {n}" for kind, n in sorted(kinds.items())]
    return "\n".join(lines) + "\n"


def status_main(run_dir: Path, as_json: bool = False) -> int:
    """``mdevd status``: ask the daemon, print what it said; 1 if it cannot be reached."""
    try:
        reply = request(run_dir, {"cmd": "status"})
    except OSError as e:
        where = control_path(run_dir)
        print(f"mdevd status: cannot reach mdevd at {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    devices = reply.get("devices")
    if reply.get("rc") != 0 or not isinstance(devices, list):
        sys.stderr.write(str(reply.get("err", "mdevd status: malformed reply\n")))
        return 1
    sys.stdout.write(json.dumps(devices, indent=2) + "\n" if as_json else format_status(devices))
    return 0

"""devlink parameters, and ``mdevd devlink``: iproute2's ``devlink dev param`` against mdevd.

The daemon owns a :class:`DevlinkRegistry` (instances by handle, e.g.
``pci/0000:60:00.0``, each with its parameters).  ``mdevd devlink ARGS``
sends ARGS over the daemon's control socket (``<run-dir>/mdevd.ctl``, see
``mdevcore.daemon.control``); the daemon runs :func:`run_devlink` on them,
which parses iproute2's syntax and answers with what iproute2 would print
and its exit status, e.g.::

    mdevd devlink --run-dir RUN dev param set pci/0000:60:00.0 name enable_lm \\
        value true cmode runtime
    mdevd devlink --run-dir RUN dev param show pci/0000:60:00.0 name enable_lm
    pci/0000:60:00.0:
      name enable_lm type driver-specific
        values:
          cmode runtime value true

Errors read as iproute2's: its own argument checks ("Unknown configuration
mode ..."), and kernel refusals as "kernel answers: <strerror>" preceded by
"Error: <extack>." when the driver gave a reason.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CONTROL_SOCKET = "mdevd.ctl"
CMODES = ("runtime", "driverinit", "permanent")
_TRUE = ("true", "1", "enable")
_FALSE = ("false", "0", "disable")


class DevlinkError(OSError):
    """A driver refusing a parameter change; ``extack`` is its reason."""

    def __init__(self, err: int, extack: str = "") -> None:
        super().__init__(err, extack or os.strerror(err))
        self.extack = extack


@dataclasses.dataclass(eq=False)
class BoolParam:
    """A boolean devlink parameter (DEVLINK_PARAM_TYPE_BOOL).

    ``set`` raises DevlinkError to refuse; it is only called with a value
    different from ``get()``, as iproute2 skips no-op sets.
    """

    name: str
    get: Callable[[], bool]
    set: Callable[[bool], None]
    cmodes: tuple[str, ...] = ("runtime",)
    generic: bool = False


class DevlinkRegistry:
    """Devlink instances by handle ("bus/device"), each with its parameters."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, BoolParam]] = {}

    def register(self, handle: str, params: Sequence[BoolParam]) -> None:
        if handle in self.instances:
            raise OSError(errno.EEXIST, f"devlink instance {handle} exists")
        self.instances[handle] = {p.name: p for p in params}

    def unregister(self, handle: str) -> None:
        self.instances.pop(handle, None)


@dataclasses.dataclass
class Reply:
    rc: int = 0
    out: str = ""
    err: str = ""

    def fail(self, message: str) -> Reply:
        self.rc = 1
        self.err += message + "\n"
        return self

    def kernel(self, e: OSError) -> Reply:
        extack = getattr(e, "extack", "")
        if extack:
            self.err += f"Error: {extack}{'' if extack.endswith('.') else '.'}\n"
        return self.fail(f"kernel answers: {os.strerror(e.errno or errno.EINVAL)}")


def _matches(word: str, full: str) -> bool:
    """iproute2's matches(): a non-empty prefix of the keyword."""
    return bool(word) and full.startswith(word)


@dataclasses.dataclass
class _Opts:
    handle: str | None = None
    name: str | None = None
    value: str | None = None
    cmode: str | None = None


def _parse(args: list[str], allowed: tuple[str, ...], reply: Reply) -> _Opts | None:
    """HANDLE followed by keyword/value pairs among ``allowed``."""
    opts = _Opts()
    if args:
        handle = args.pop(0)
        if handle.count("/") != 1 or handle.startswith("/") or handle.endswith("/"):
            reply.fail("Wrong devlink identification string format.")
            reply.fail('Expected "bus_name/dev_name".')
            return None
        opts.handle = handle
    while args:
        key = args.pop(0)
        if key not in allowed:
            reply.fail(f'Unknown option "{key}"')
            return None
        if not args:
            reply.fail({"value": "Value to set expected."}.get(key, "String parameter expected"))
            return None
        word = args.pop(0)
        if key == "cmode" and word not in CMODES:
            reply.fail(f'Unknown configuration mode "{word}"')
            return None
        setattr(opts, key, word)
    return opts


def _format_param(handle: str, param: BoolParam) -> str:
    kind = "generic" if param.generic else "driver-specific"
    value = "true" if param.get() else "false"
    lines = [f"{handle}:", f"  name {param.name} type {kind}", "    values:"]
    lines += [f"      cmode {cmode} value {value}" for cmode in param.cmodes]
    return "\n".join(lines) + "\n"


def _lookup(registry: DevlinkRegistry, opts: _Opts, reply: Reply) -> BoolParam | None:
    assert opts.handle is not None and opts.name is not None
    params = registry.instances.get(opts.handle)
    if params is None:
        reply.kernel(OSError(errno.ENODEV, opts.handle))
        return None
    param = params.get(opts.name)
    if param is None:
        reply.kernel(OSError(errno.EINVAL, opts.name))
        return None
    return param


def _param_show(registry: DevlinkRegistry, args: list[str], reply: Reply) -> Reply:
    opts = _parse(args, ("name",), reply)
    if opts is None:
        return reply
    if opts.handle is None:
        for handle, params in registry.instances.items():
            reply.out += "".join(_format_param(handle, p) for p in params.values())
        return reply
    if opts.name is None:
        found = registry.instances.get(opts.handle)
        if found is None:
            return reply.kernel(OSError(errno.ENODEV, opts.handle))
        reply.out += "".join(_format_param(opts.handle, p) for p in found.values())
        return reply
    param = _lookup(registry, opts, reply)
    if param is not None:
        reply.out += _format_param(opts.handle, param)
    return reply


def _param_set(registry: DevlinkRegistry, args: list[str], reply: Reply) -> Reply:
    opts = _parse(args, ("name", "value", "cmode"), reply)
    if opts is None:
        return reply
    for have, message in (
        (opts.handle, 'Devlink identification ("bus_name/dev_name") expected'),
        (opts.name, "Parameter name expected."),
        (opts.value, "Value to set expected."),
        (opts.cmode, "Configuration mode expected."),
    ):
        if have is None:
            return reply.fail(message)
    param = _lookup(registry, opts, reply)
    if param is None:
        return reply
    if opts.cmode not in param.cmodes:
        return reply.fail("Configuration mode not supported")
    assert opts.value is not None
    if opts.value not in _TRUE + _FALSE:
        return reply.fail(f'Value "{opts.value}" is not a number or not within range')
    wanted = opts.value in _TRUE
    if wanted == param.get():
        return reply  # iproute2 sends nothing for an unchanged value
    try:
        param.set(wanted)
    except OSError as e:
        return reply.kernel(e)
    return reply


def run_devlink(registry: DevlinkRegistry, argv: Sequence[str]) -> Reply:
    """What ``devlink ARGV`` prints and returns, for the subset we serve."""
    args = list(argv)
    reply = Reply()
    if not args or not _matches(args[0], "dev"):
        # only the dev object is served here
        return reply.fail(f'Object "{args[0] if args else ""}" not found')
    if len(args) < 2 or not _matches(args[1], "param"):
        return reply.fail(f'Command "{args[1] if len(args) > 1 else ""}" not found')
    args = args[2:]
    verb = args.pop(0) if args else "show"
    if _matches(verb, "show") or _matches(verb, "list"):
        return _param_show(registry, args, reply)
    if _matches(verb, "set"):
        return _param_set(registry, args, reply)
    return reply.fail(f'Command "{verb}" not found')


# --- the client side: ``mdevd devlink`` ----------------------------------------------


def control_path(run_dir: Path) -> Path:
    return run_dir / CONTROL_SOCKET


def request(run_dir: Path, message: dict[str, object], timeout: float = 30.0) -> dict[str, object]:
    """Send one JSON request to the daemon's control socket; return its reply."""
    path = control_path(run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError(errno.ECONNRESET, "mdevd closed the control connection")
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise OSError(errno.EPROTO, "malformed reply from mdevd")
    return reply


def devlink_main(run_dir: Path, argv: Sequence[str]) -> int:
    """``mdevd devlink ARGV``: run it in the daemon, print what it answered."""
    try:
        reply = request(run_dir, {"cmd": "devlink", "argv": list(argv)})
    except OSError as e:
        where = control_path(run_dir)
        print(f"mdevd devlink: cannot reach mdevd at {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    sys.stdout.write(str(reply.get("out", "")))
    sys.stderr.write(str(reply.get("err", "")))
    rc = reply.get("rc", 1)
    return rc if isinstance(rc, int) else 1

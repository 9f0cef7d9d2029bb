"""PF netdevs, and ``mdevd ip``: iproute2's ``ip link ... vf N`` against mdevd.

A PF driver that owns SR-IOV VFs of a network card registers its PF
netdev (a :class:`VfNetdev`) in the daemon's :class:`NetdevRegistry`.
``mdevd ip ARGS`` sends ARGS over the control socket (as ``mdevd
devlink`` does, see ``mdevcore.daemon.control``); the daemon runs
:func:`run_ip`, which takes iproute2's syntax for the VF settings a host
administrator makes and answers with what iproute2 would print::

    mdevd ip --run-dir RUN link set ifcvf0 vf 0 mac 52:54:00:12:34:56
    mdevd ip --run-dir RUN link set ifcvf0 vf 1 state disable
    mdevd ip --run-dir RUN link show ifcvf0
    7: ifcvf0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UP mode DEFAULT
        link/ether 02:1f:c0:61:00:00 brd ff:ff:ff:ff:ff:ff
        vf 0     link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff, link-state auto
        ...

The device may be named by its netdev name or its PCI address.  Served:
``link set [dev] DEV vf N [mac LLADDR] [state auto|enable|disable]``
(several ``vf`` groups in one command, applied in order, as one netlink
message would be) and ``link show [[dev] DEV]``.  Errors read as
iproute2's; a driver refusing a change reads "RTNETLINK answers: ...".
"""

from __future__ import annotations

import dataclasses
import errno
import os
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mdevcore.daemon.devlink import Reply, control_path, request

LINK_STATES = ("auto", "enable", "disable")


@dataclasses.dataclass(frozen=True, slots=True)
class VfInfo:
    mac: bytes
    link_state: str  # one of LINK_STATES


class VfNetdev(Protocol):
    """A PF's netdev as ip link sees it (ndo_get_vf_config, ndo_set_vf_*)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str:
        """The PCI address of the PF, e.g. 0000:61:00.0."""
        ...

    @property
    def mac(self) -> bytes: ...

    @property
    def mtu(self) -> int: ...

    def vfs(self) -> list[VfInfo]:
        """One entry per enabled VF, VF 0 first."""
        ...

    def set_vf_mac(self, vf: int, mac: bytes) -> None:
        """OSError(EINVAL) for a VF that does not exist or a MAC it refuses."""
        ...

    def set_vf_link_state(self, vf: int, state: str) -> None: ...


class NetdevRegistry:
    """The PF netdevs of the daemon, by name, in registration order."""

    def __init__(self) -> None:
        self.netdevs: dict[str, VfNetdev] = {}

    def register(self, netdev: VfNetdev) -> None:
        if netdev.name in self.netdevs:
            raise OSError(errno.EEXIST, f"netdev {netdev.name} exists")
        self.netdevs[netdev.name] = netdev

    def unregister(self, name: str) -> None:
        self.netdevs.pop(name, None)

    def find(self, name: str) -> VfNetdev | None:
        """By netdev name, or by the PCI address of its function."""
        found = self.netdevs.get(name)
        if found is None:
            found = next((n for n in self.netdevs.values() if n.address == name), None)
        return found

    def ifindex(self, netdev: VfNetdev) -> int:
        # lo is 1 on every host; ours follow in registration order.
        return 2 + list(self.netdevs.values()).index(netdev)


def _matches(word: str, full: str) -> bool:
    """iproute2's matches(): a non-empty prefix of the keyword."""
    return bool(word) and full.startswith(word)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_lladdr(text: str) -> bytes | None:
    """ll_addr_a2n() for Ethernet: six hex bytes separated by ':'."""
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        return None
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        return None


def _format_link(registry: NetdevRegistry, netdev: VfNetdev) -> str:
    lines = [
        f"{registry.ifindex(netdev)}: {netdev.name}: <BROADCAST,MULTICAST,UP,LOWER_UP> "
        f"mtu {netdev.mtu} state UP mode DEFAULT",
        f"    link/ether {format_mac(netdev.mac)} brd ff:ff:ff:ff:ff:ff",
    ]
    for n, vf in enumerate(netdev.vfs()):
        lines.append(
            f"    vf {n}     link/ether {format_mac(vf.mac)} brd ff:ff:ff:ff:ff:ff, "
            f"link-state {vf.link_state}"
        )
    return "\n".join(lines) + "\n"


def _invarg(reply: Reply, what: str, arg: str) -> Reply:
    return reply.fail(f'Error: argument "{arg}" is wrong: {what}')


_INCOMPLETE = 'Command line is not complete. Try option "help"'


@dataclasses.dataclass
class _VfChange:
    vf: int
    mac: bytes | None = None
    state: str | None = None


def _vf_number(word: str) -> int | None:
    """get_integer(): decimal, or hex after 0x; no sign, spaces or underscores; int range."""
    digits, base = (word[2:], 16) if word[:2].lower() == "0x" else (word, 10)
    allowed = string.hexdigits if base == 16 else string.digits
    if not digits or not all(c in allowed for c in digits):
        return None
    value = int(digits, base)
    return value if value <= 0x7FFFFFFF else None


def _parse_vf(args: list[str], reply: Reply) -> _VfChange | None:
    """After ``vf``: NUM then mac/state pairs (iplink_parse_vf)."""
    if not args:
        reply.fail(_INCOMPLETE)
        return None
    word = args.pop(0)
    vf = _vf_number(word)
    if vf is None:
        _invarg(reply, 'Invalid "vf" value', word)
        return None
    change = _VfChange(vf)
    while args and args[0] in ("mac", "state"):
        key = args.pop(0)
        if not args:
            reply.fail(_INCOMPLETE)
            return None
        value = args.pop(0)
        if key == "mac":
            change.mac = parse_lladdr(value)
            if change.mac is None:
                reply.fail(f'"{value}" is invalid lladdr.')
                return None
        else:
            if value not in LINK_STATES:
                _invarg(reply, 'Invalid "state" value', value)
                return None
            change.state = value
    if change.mac is None and change.state is None:
        # iproute2 sends an empty IFLA_VFINFO_LIST; the kernel does nothing.
        pass
    return change


def _link_set(registry: NetdevRegistry, args: list[str], reply: Reply) -> Reply:
    dev: str | None = None
    changes: list[_VfChange] = []
    while args:
        word = args.pop(0)
        if word == "dev":
            if not args:
                return reply.fail(_INCOMPLETE)
            if dev is not None:
                return reply.fail(f'Error: either "dev" is duplicate, or "{args[0]}" is a garbage.')
            dev = args.pop(0)
        elif word == "vf":
            if dev is None:
                return reply.fail('Not enough of information: "dev" argument is required.')
            change = _parse_vf(args, reply)
            if change is None:
                return reply
            changes.append(change)
        elif dev is None:
            dev = word
        else:
            return reply.fail(f'Error: either "dev" is duplicate, or "{word}" is a garbage.')
    if dev is None:
        return reply.fail('Not enough of information: "dev" argument is required.')
    netdev = registry.find(dev)
    if netdev is None:
        return reply.fail(f'Cannot find device "{dev}"')
    for change in changes:
        try:
            if change.mac is not None:
                netdev.set_vf_mac(change.vf, change.mac)
            if change.state is not None:
                netdev.set_vf_link_state(change.vf, change.state)
        except OSError as e:
            return reply.fail(f"RTNETLINK answers: {os.strerror(e.errno or errno.EINVAL)}")
    return reply


def _link_show(registry: NetdevRegistry, args: list[str], reply: Reply) -> Reply:
    if args and args[0] == "dev":
        args.pop(0)
        if not args:
            return reply.fail(_INCOMPLETE)
    if len(args) > 1:
        return reply.fail(f'Error: either "dev" is duplicate, or "{args[1]}" is a garbage.')
    if not args:
        reply.out += "".join(_format_link(registry, n) for n in registry.netdevs.values())
        return reply
    netdev = registry.find(args[0])
    if netdev is None:
        return reply.fail(f'Device "{args[0]}" does not exist.')
    reply.out += _format_link(registry, netdev)
    return reply


def run_ip(registry: NetdevRegistry, argv: Sequence[str]) -> Reply:
    """What ``ip ARGV`` prints and returns, for the subset we serve."""
    args = list(argv)
    reply = Reply()
    if not args or not _matches(args[0], "link"):
        # only the link object is served here
        obj = args[0] if args else ""
        return reply.fail(f'Object "{obj}" is unknown, try "ip help".')
    args = args[1:]
    verb = args.pop(0) if args else "show"
    if _matches(verb, "set"):
        return _link_set(registry, args, reply)
    if _matches(verb, "show") or _matches(verb, "list"):
        return _link_show(registry, args, reply)
    return reply.fail(f'Command "{verb}" is unknown, try "ip link help".')


# --- the client side: ``mdevd ip`` --------------------------------------------------


def ip_main(run_dir: Path, argv: Sequence[str]) -> int:
    """``mdevd ip ARGV``: run it in the daemon, print what it answered."""
    try:
        reply = request(run_dir, {"cmd": "ip", "argv": list(argv)})
    except OSError as e:
        where = control_path(run_dir)
        print(f"mdevd ip: cannot reach mdevd at {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    sys.stdout.write(str(reply.get("out", "")))
    sys.stderr.write(str(reply.get("err", "")))
    rc = reply.get("rc", 1)
    return rc if isinstance(rc, int) else 1

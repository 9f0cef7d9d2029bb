"""vfio-user-cli: poke a vfio-user device socket by hand.

    vfio-user-cli SOCKET info
    vfio-user-cli SOCKET regions
    vfio-user-cli SOCKET irqs
    vfio-user-cli SOCKET read REGION OFFSET COUNT
    vfio-user-cli SOCKET write REGION OFFSET HEX
    vfio-user-cli SOCKET reset
    vfio-user-cli SOCKET config

Numbers accept 0x prefixes.  Exit status: 0 when done, 1 on any error
(bad arguments, a socket that cannot be reached, a request the server
refused: its errno is printed).  An error line says what failed and on
what: ``vfio-user-cli: error: cannot connect to SOCKET: REASON``, ``...:
read 4 bytes of region 0 at 0xfff on SOCKET: REGION_READ: Invalid argument
(EINVAL)``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from mdevcore import __version__
from mdevcore.vfio_user.backend import (
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    PCI_CONFIG_REGION_INDEX,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
)
from mdevcore.vfio_user.client import Client

REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5",
                6: "ROM", 7: "CONFIG", 8: "VGA"}  # fmt: skip
IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}
PCI_CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific",
                 0x10: "PCI Express", 0x11: "MSI-X"}  # fmt: skip


def _flags(value: int, names: dict[int, str]) -> str:
    words = [name for bit, name in names.items() if value & bit]
    return ",".join(words) if words else "-"


def hexdump(data: bytes, base: int = 0) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + i:08x}  {hexpart:<47}  |{text}|")
    return "\n".join(lines)


def cmd_info(c: Client, args: argparse.Namespace) -> None:
    info = c.device_info()
    flags = _flags(info.flags, {DEVICE_FLAGS_RESET: "RESET", DEVICE_FLAGS_PCI: "PCI"})
    print(f"flags        {info.flags:#x} ({flags})")
    print(f"regions      {info.num_regions}")
    print(f"irq indexes  {info.num_irqs}")
    print(f"server caps  {c.server_caps}")


def cmd_regions(c: Client, args: argparse.Namespace) -> None:
    names = {REGION_FLAG_READ: "R", REGION_FLAG_WRITE: "W", REGION_FLAG_MMAP: "MMAP",
             REGION_FLAG_CAPS: "CAPS"}  # fmt: skip
    print(f"{'index':<6}{'name':<8}{'size':>12}  {'flags':<16}details")
    for index in range(c.device_info().num_regions):
        r = c.region_info(index)
        try:
            info = r.as_region_info()
        finally:
            if r.fd is not None:
                os.close(r.fd)
        details = []
        if r.fd is not None:
            details.append(f"fd offset {r.offset:#x}")
        if info.sparse_areas:
            details.append(
                "mmap " + " ".join(f"[{a.offset:#x}+{a.size:#x}]" for a in info.sparse_areas)
            )
        if info.type_cap is not None:
            details.append(f"type {info.type_cap[0]:#x}/{info.type_cap[1]:#x}")
        name = REGION_NAMES.get(index, "dev")
        print(f"{index:<6}{name:<8}{r.size:>#12x}  {_flags(r.flags, names):<16}{' '.join(details)}")


def cmd_irqs(c: Client, args: argparse.Namespace) -> None:
    names = {IRQ_INFO_EVENTFD: "EVENTFD", IRQ_INFO_MASKABLE: "MASKABLE",
             IRQ_INFO_AUTOMASKED: "AUTOMASKED", IRQ_INFO_NORESIZE: "NORESIZE"}  # fmt: skip
    print(f"{'index':<6}{'name':<7}{'count':>6}  flags")
    for index in range(c.device_info().num_irqs):
        irq = c.irq_info(index)
        name = IRQ_NAMES.get(index, "?")
        print(f"{index:<6}{name:<7}{irq.count:>6}  {_flags(irq.flags, names)}")


def cmd_read(c: Client, args: argparse.Namespace) -> None:
    print(hexdump(c.region_read(args.region, args.offset, args.count), args.offset))


def cmd_write(c: Client, args: argparse.Namespace) -> None:
    data = bytes.fromhex(args.hex)
    c.region_write(args.region, args.offset, data)
    print(f"wrote {len(data)} bytes to region {args.region} at {args.offset:#x}")


def cmd_reset(c: Client, args: argparse.Namespace) -> None:
    c.reset()
    print("device reset")


def decode_config(cfg: bytes) -> list[str]:
    def u(off: int, n: int) -> int:
        return int.from_bytes(cfg[off : off + n], "little")

    out = [
        f"vendor:device  {u(0, 2):04x}:{u(2, 2):04x}",
        f"subsystem      {u(0x2C, 2):04x}:{u(0x2E, 2):04x}",
        f"class          {u(0x0B, 1):02x}{u(0x0A, 1):02x}{u(0x09, 1):02x} "
        f"(base {u(0x0B, 1):#04x} sub {u(0x0A, 1):#04x} prog-if {u(0x09, 1):#04x})",
        f"revision       {u(8, 1):#04x}",
        f"command        {u(4, 2):#06x}   status {u(6, 2):#06x}",
        f"header type    {u(0x0E, 1):#04x}",
        f"interrupt pin  {u(0x3D, 1)}   line {u(0x3C, 1)}",
    ]
    for bar in range(6):
        value = u(0x10 + 4 * bar, 4)
        if value:
            kind = "io" if value & 1 else ("mem64" if value & 6 == 4 else "mem32")
            out.append(f"BAR{bar}           {value:#010x} ({kind})")
    if u(6, 2) & 0x10 and len(cfg) > 0x34:
        ptr, seen = u(0x34, 1) & 0xFC, set()
        while ptr and ptr not in seen and ptr + 2 <= len(cfg):
            seen.add(ptr)
            cap_id = u(ptr, 1)
            out.append(f"capability     {ptr:#04x}: {PCI_CAP_NAMES.get(cap_id, hex(cap_id))}")
            ptr = u(ptr + 1, 1) & 0xFC
    return out


def cmd_config(c: Client, args: argparse.Namespace) -> None:
    size = c.region_info(PCI_CONFIG_REGION_INDEX).size
    cfg = c.region_read(PCI_CONFIG_REGION_INDEX, 0, min(size, 4096))
    print(hexdump(cfg))
    print()
    print("\n".join(decode_config(cfg)))


def _int(text: str) -> int:
    return int(text, 0)


EXIT_STATUS = "exit status: 0 done, 1 error (bad arguments, socket unreachable, request refused)"


class _Parser(argparse.ArgumentParser):
    """Bad arguments exit 1, as every other error does (argparse's own is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vfio-user-cli", description="Talk to a vfio-user device socket.", epilog=EXIT_STATUS
    )
    p.add_argument("--version", action="version", version=f"vfio-user-cli {__version__}")
    p.add_argument("socket", help="path of the device's UNIX socket")
    sub = p.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[Client, argparse.Namespace], None]] = {
        "info": cmd_info,
        "regions": cmd_regions,
        "irqs": cmd_irqs,
        "reset": cmd_reset,
        "config": cmd_config,
    }
    for name, fn in commands.items():
        sub.add_parser(name).set_defaults(fn=fn)
    rd = sub.add_parser("read", help="read COUNT bytes of REGION at OFFSET")
    rd.add_argument("region", type=_int)
    rd.add_argument("offset", type=_int)
    rd.add_argument("count", type=_int)
    rd.set_defaults(fn=cmd_read)
    wr = sub.add_parser("write", help="write HEX bytes to REGION at OFFSET")
    wr.add_argument("region", type=_int)
    wr.add_argument("offset", type=_int)
    wr.add_argument("hex")
    wr.set_defaults(fn=cmd_write)
    return p


def operation(args: argparse.Namespace) -> str:
    """What the command does, for its error line ("read 4 bytes of region 0 at 0x10")."""
    if args.command == "read":
        return f"read {args.count} bytes of region {args.region} at {args.offset:#x}"
    if args.command == "write":
        return f"write region {args.region} at {args.offset:#x}"
    return {"info": "get the device info", "regions": "list the regions",
            "irqs": "list the IRQs", "reset": "reset the device",
            "config": "read config space"}.get(args.command, args.command)  # fmt: skip


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        text = e.strerror or os.strerror(e.errno or 0)
        name = errno.errorcode.get(e.errno or 0)
        return f"{text} ({name})" if name else text
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or bad arguments (1)
        return e.code if isinstance(e.code, int) else 1
    doing = f"cannot connect to {args.socket}"
    try:
        with Client(args.socket, timeout=10.0) as client:
            doing = f"cannot negotiate with {args.socket}"
            client.negotiate()
            doing = f"{operation(args)} on {args.socket}"
            args.fn(client, args)
    except (ValueError, OSError, EOFError) as e:  # ValueError: e.g. HEX that is not hex
        print(f"vfio-user-cli: error: {doing}: {_reason(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

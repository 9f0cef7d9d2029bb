"""Standalone runner: ``python -m mdevcore.vfio_user --device pkg.mod:Class --socket PATH``.

``--transport libvfio-user`` serves it through libvfio-user instead of the
native engine (``--spin-us``, ``--io`` and ``--profile`` then do not apply).
``--io thread|trio``: a connection on its own thread (when the device
allows it) or as a trio task; ``--profile`` prints per-command costs to
stderr when a client leaves (``mdevcore.vfio_user.profile``).

Builds the device with no arguments, serves it until SIGTERM/SIGINT and
exits 0 after removing the socket.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial

import trio

from mdevcore.loader import load_object
from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.server import DEFAULT_IO, DEFAULT_SPIN_US, IO_MODES, serve_forever


def load_device(spec: str) -> DeviceBackend:
    try:
        factory = load_object(spec)
    except OSError as e:
        raise SystemExit(f"--device wants pkg.module:Class: {e.strerror}") from None
    device = factory()
    if not isinstance(device, DeviceBackend):
        raise SystemExit(f"{spec} did not build a DeviceBackend")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdevcore.vfio_user", description=__doc__)
    parser.add_argument("--device", required=True, help="pkg.module:Class of a DeviceBackend")
    parser.add_argument("--socket", required=True, help="UNIX socket path to listen on")
    parser.add_argument("--name", default=None, help="name used in logs (default: the class)")
    parser.add_argument(
        "--spin-us",
        type=float,
        default=None,
        help="poll this long for the next request before sleeping (0 = never; "
        "default: the device's request_spin_us on a connection thread, else "
        f"{DEFAULT_SPIN_US:g})",
    )
    parser.add_argument(
        "--io",
        choices=IO_MODES,
        default=DEFAULT_IO,
        help=f"serve a connection on its own thread or as a trio task (default {DEFAULT_IO})",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print per-command costs when a client leaves"
    )
    parser.add_argument(
        "--transport",
        choices=("native", "libvfio-user"),
        default="native",
        help="vfio-user implementation (libvfio-user: the C library via cffi)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request error")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    device = load_device(args.device)
    name = args.name or args.device.rpartition(":")[2]
    if args.transport == "libvfio-user":
        from mdevcore.vfio_user.libvfio_user import serve_forever as serve_libvfio_user

        trio.run(partial(serve_libvfio_user, device, args.socket, name=name))
        return 0
    serve = partial(
        serve_forever,
        device,
        args.socket,
        name=name,
        spin_us=args.spin_us,
        io=args.io,
        profile=args.profile,
    )
    trio.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())

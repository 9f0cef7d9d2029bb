"""``mdevd migrate``: live-migrate a vfio-user device between two servers.

mdevd migrate --src SOCK --dst SOCK [--workload mtty|nvme|virtio_net|none] [--memory 64M] [--json]
mdevd migrate send --src SOCK --to tcp:HOST:PORT|unix:PATH [...]
mdevd migrate receive --dst SOCK --listen tcp:HOST:PORT|unix:PATH [...]

The first form does both ends in one process.  ``send`` owns the source
guest memory and workload; ``receive`` owns the destination memory and
continues the workload it finds in the stream (by name) and verifies it.
Exit status: 0 migrated and verified, 1 migration failed (source rolled
back, workload verified on it), 3 the workload found a mismatch.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any

from mdevcore.migration.links import SocketLink, connect, listen, serve_receiver
from mdevcore.migration.receiver import Receiver
from mdevcore.migration.sender import Options, Progress, Report, Sender
from mdevcore.migration.session import Endpoint, continue_on, migrate_local
from mdevcore.migration.workload import Workload, WorkloadMismatch, create

EXIT_FAILED = 1
EXIT_MISMATCH = 3
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    size = int(number) * _UNITS[unit]
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError(f"{text}: want a non-zero multiple of 4 KiB")
    return size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=parse_size, default="64M", help="guest RAM (default 64M)")
    p.add_argument(
        "--fdless", type=parse_size, default=0, metavar="SIZE",
        help="map the top SIZE of RAM without an fd (DMA by messages)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="final report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--after", type=float, default=0.3, metavar="S", help="run the workload S s after"
    )


def _source_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="source device's vfio-user socket")
    p.add_argument("--workload", default="mtty", help="mtty, nvme, virtio_net, none (default mtty)")
    p.add_argument("--warmup", type=float, default=0.3, metavar="S", help="workload before")
    p.add_argument("--max-rounds", type=int, default=10)
    p.add_argument("--round-seconds", type=float, default=0.05)
    p.add_argument("--dirty-target", type=parse_size, default="64K")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdevd migrate",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode")
    local = sub.add_parser("local", help="both ends in this process (the default)")
    _source_opts(local)
    local.add_argument("--dst", required=True, help="destination device's vfio-user socket")
    _common(local)
    send = sub.add_parser("send", help="source side: stream to a receiver")
    _source_opts(send)
    send.add_argument("--to", required=True, metavar="ADDR", help="tcp:HOST:PORT or unix:PATH")
    _common(send)
    recv = sub.add_parser("receive", help="destination side: accept one stream")
    recv.add_argument("--dst", required=True, help="destination device's vfio-user socket")
    recv.add_argument("--listen", required=True, metavar="ADDR", help="tcp:HOST:PORT|unix:PATH")
    recv.add_argument("--timeout", type=float, default=60.0, help="idle seconds before giving up")
    _common(recv)
    return p


def main(argv: list[str]) -> int:
    if not argv[:1] or argv[0] not in ("local", "send", "receive", "-h", "--help"):
        argv = ["local", *argv]
    args = _parser().parse_args(argv)
    try:
        if args.mode == "receive":
            return _receive(args)
        return _send(args)
    except OSError as e:
        print(f"mdevd migrate: error: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED


def _progress(args: argparse.Namespace) -> Any:
    if args.quiet:
        return None

    def show(p: Progress) -> None:
        print(
            f"mdevd migrate: {p.phase} round {p.round}: dirty {p.dirty_bytes} B, "
            f"sent {p.sent_bytes} B, {p.rate / 1e6:.1f} MB/s",
            file=sys.stderr,
            flush=True,
        )

    return show


def _options(args: argparse.Namespace) -> Options:
    return Options(
        max_rounds=args.max_rounds,
        round_seconds=args.round_seconds,
        dirty_target=args.dirty_target,
    )


def _workload(name: str) -> Workload | None:
    return None if name == "none" else create(name)


def _send(args: argparse.Namespace) -> int:
    wl = _workload(args.workload)  # an unknown workload fails before any connection
    src = Endpoint(args.src, args.memory, name="source", fdless=args.fdless)
    try:
        if wl is not None:
            wl.start(src.client, src.mem)
            wl.run_for(args.warmup)
        if args.mode == "send":
            try:
                link = SocketLink(connect(args.to))
            except (OSError, ValueError) as e:
                # No receiver: nothing was touched, the source just carries on.
                err = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
                report = Report(error=f"cannot reach {args.to}: {e}", errno=err)
            else:
                report = Sender(
                    src.dev, src.mem, link, workload=wl, options=_options(args),
                    progress=_progress(args),
                ).migrate()  # fmt: skip
                link.close()
            extra: dict[str, Any] = {}
            after: Workload | None = None
        else:
            dst = Endpoint(args.dst, args.memory, name="destination", fdless=args.fdless)
            after = None
            try:
                report, receiver = migrate_local(
                    src, dst, wl, options=_options(args), progress=_progress(args)
                )
                after = continue_on(receiver, dst) if report.ok else None
                extra = {}
                if after is not None:
                    extra = _finish(after, args.after)
            finally:
                if after is not None:
                    after.close()
                dst.close()
        if not report.ok and wl is not None:
            extra = _finish(wl, args.after)  # the source carries on
        return _print(args, report, extra)
    finally:
        if wl is not None:
            wl.close()
        src.close()


def _finish(wl: Workload, seconds: float) -> dict[str, Any]:
    """Run the workload a little more, then verify it."""
    try:
        wl.run_for(seconds)
        wl.verify()
    except WorkloadMismatch as e:
        return {"verified": False, "mismatch": str(e), "after": wl.stats()}
    return {"verified": True, "after": wl.stats()}


def _print(args: argparse.Namespace, report: Report, extra: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({**report.as_dict(), **extra}, sort_keys=True))
    else:
        print(report.text())
        if "verified" in extra:
            verdict = "verified" if extra["verified"] else f"MISMATCH: {extra['mismatch']}"
            print(f"  workload after: {verdict} " + " ".join(
                f"{k}={v}" for k, v in extra["after"].items()
            ))  # fmt: skip
    if extra.get("verified") is False:
        return EXIT_MISMATCH
    return 0 if report.ok else EXIT_FAILED


def _receive(args: argparse.Namespace) -> int:
    dst = Endpoint(args.dst, args.memory, name="destination", fdless=args.fdless)
    try:
        server = listen(args.listen)
        print(f"mdevd migrate: listening on {args.listen}", file=sys.stderr, flush=True)
        try:
            server.settimeout(args.timeout)
            conn, _ = server.accept()
        finally:
            server.close()
        receiver = Receiver(dst.dev, dst.mem)
        with conn:
            serve_receiver(conn, receiver, args.timeout)
        result: dict[str, Any] = {
            "ok": receiver.done,
            "error": "" if receiver.error is None else str(receiver.error.strerror),
            "errno": 0 if receiver.error is None else receiver.error.errno,
            "device_bytes": receiver.device_bytes,
            "pages": receiver.pages,
        }
        if receiver.done:
            wl = continue_on(receiver, dst)
            if wl is not None:
                try:
                    result.update(_finish(wl, args.after))
                finally:
                    wl.close()
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print("received: " + " ".join(f"{k}={v}" for k, v in result.items() if k != "after"))
        if result.get("verified") is False:
            return EXIT_MISMATCH
        return 0 if receiver.done else EXIT_FAILED
    finally:
        dst.close()

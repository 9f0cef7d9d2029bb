"""``mdevd lab ...`` / ``python -m mdevcore.tools.lab ...``: set up the lab, boot guests.

Exit status of ``boot`` is the guest script's own; lab failures use the
values timeout(1) and shells use: 124 timeout, 125 any other lab error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.lab import Lab, clean

EXIT_TIMEOUT = 124
EXIT_LAB_ERROR = 125


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab",
        description="A Debian trixie chroot with QEMU >= 10.1 that boots throwaway guests.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_cache(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--cache", help="cache directory (default $MDEVCORE_LAB_DIR or /var/cache/mdevcore-lab)"
        )
        return p

    with_cache(sub.add_parser("setup", help="build the chroot and initramfs (once, ~60 s)"))
    info = with_cache(sub.add_parser("info", help="paths, QEMU and kernel versions, accel"))
    info.add_argument("--json", action="store_true", help="machine-readable output")
    with_cache(sub.add_parser("clean", help="remove everything the lab cached"))

    boot = with_cache(
        sub.add_parser(
            "boot",
            help="boot a guest that runs a script and powers off",
            description="Boot a guest, run a busybox sh script in it, print what it printed "
            "and exit with its status.  Arguments after -- go to QEMU verbatim.",
        )
    )
    what = boot.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", metavar="FILE", help="script file ('-' for stdin)")
    what.add_argument("--cmd", metavar="CODE", help="shell code to run")
    boot.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="SPEC",
        help="a QEMU -device value, e.g. the daemon's vfio-user-pci JSON",
    )
    boot.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one raw QEMU argument (use --qemu-arg=-drive for dashes)",
    )
    boot.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="PATH",
        help="host directory (or file's directory) to show at the same path",
    )
    boot.add_argument(
        "--binary",
        action="append",
        default=[],
        metavar="NAME",
        help="chroot program to add to the guest with its libraries (fio, nvme)",
    )
    boot.add_argument("--kernel-arg", action="append", default=[], metavar="ARG")
    boot.add_argument("--timeout", type=float, default=120.0, metavar="S")
    boot.add_argument("--memory", type=int, default=512, metavar="MB")
    boot.add_argument("--cpus", type=int, default=1)
    boot.add_argument("--accel", choices=("tcg", "kvm"), help="default: tcg unless real KVM")
    boot.add_argument(
        "--loglevel",
        type=int,
        default=1,
        choices=range(9),
        metavar="N",
        help="kernel console loglevel while the script runs (default 1: emergencies only)",
    )
    boot.add_argument(
        "--dmesg", action="store_true", help="print the guest's kernel log to stderr after the run"
    )
    boot.add_argument(
        "--console",
        action="store_true",
        help="copy the whole serial console to stderr as it arrives",
    )
    boot.add_argument("qemu_rest", nargs="*", metavar="-- QEMU-ARGS")
    return parser


def _read_script(args: argparse.Namespace) -> str:
    if args.cmd is not None:
        return str(args.cmd) + "\n"
    if args.script == "-":
        return sys.stdin.read()
    try:
        with open(args.script) as f:
            return f.read()
    except OSError as err:
        raise LabError(
            err.errno or errno.EIO, f"cannot read {args.script}: {err.strerror}"
        ) from err


def _boot(args: argparse.Namespace) -> int:
    script = _read_script(args)
    lab = Lab.ensure(args.cache)
    result = lab.boot(
        script,
        devices=args.device,
        qemu_args=[*args.qemu_arg, *args.qemu_rest],
        binds=args.bind,
        memory_mb=args.memory,
        cpus=args.cpus,
        timeout=args.timeout,
        extra_binaries=args.binary,
        kernel_args=args.kernel_arg,
        accel=args.accel,
        kernel_log=True if args.dmesg else None,
        console_loglevel=args.loglevel,
        echo=args.console,
    )
    sys.stdout.write(result.output)
    sys.stdout.flush()
    if args.dmesg:
        sys.stderr.write(result.kernel_log)
    logging.getLogger(__name__).info(
        "guest script exited %d after %.1f s (%s)", result.rc, result.elapsed, result.accel
    )
    return result.rc


def _print_info(info: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key + ':':22} {value}")


def _interrupt_on_sigterm() -> None:
    # `timeout`, CI runners and service managers stop us with SIGTERM; make
    # it unwind like Ctrl-C so QEMU is killed and scratch files removed.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _interrupt_on_sigterm()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "setup":
            started = time.monotonic()
            lab = Lab.ensure(args.cache)
            _print_info(lab.info(), False)
            print(f"{'this run:':22} {time.monotonic() - started:.1f} s")
            return 0
        if args.command == "info":
            _print_info(Lab.open(args.cache).info(), args.json)
            return 0
        if args.command == "clean":
            for path in clean(args.cache):
                print(f"removed {path}")
            return 0
        return _boot(args)
    except LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return EXIT_TIMEOUT if err.errno == errno.ETIMEDOUT else EXIT_LAB_ERROR
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130

"""``mdevd``: serve the mdev sysfs mirror, run mdevctl against it, or the lab.

mdevd serve [--config FILE | --no-config] [--sysfs DIR] [--run-dir DIR] [--persist DIR]
            [--mdevctl-config DIR] [--parent-opt NAME.KEY=VALUE]...
            [--transport native|libvfio-user] [--io thread|trio]
            [--parent-transport PARENT=TRANSPORT]...
            [--log-format text|json] [--log-level LEVEL]
mdevd parents
mdevd new-parent NAME [--dir DIR]
mdevd mdevctl [--sysfs DIR] [--config DIR] [--run-dir DIR] ARGS...
mdevd devlink [--run-dir DIR] dev param {set|show} ...
mdevd ip [--run-dir DIR] link {set|show} ...
mdevd migrate [send|receive] ...
mdevd status [--run-dir DIR] [--json]
mdevd lab ...
mdevd --version
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from mdevcore import __version__
from mdevcore.daemon import config, errors, logs

DEFAULT_RUN_DIR = Path("/run/mdevd")
TRANSPORTS = ("native", "libvfio-user")


def _parent_transport(text: str) -> str:
    """--parent-transport PARENT=TRANSPORT, checked where argparse can say which flag."""
    parent, sep, transport = text.partition("=")
    if not (sep and parent) or transport not in TRANSPORTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PARENT=TRANSPORT, TRANSPORT one of {', '.join(TRANSPORTS)}"
        )
    return text


@config.numeric
def _spin_us(text: str) -> float:
    """--spin-us: a finite number of microseconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1e6:  # refuses nan and inf too
        raise argparse.ArgumentTypeError(f"{text!r}: expected microseconds from 0 to 1e6")
    return value


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="mdevd",
        description=__doc__.split("\n\n")[0],
        epilog=errors.EXIT_STATUS,
        formatter_class=raw,
    )
    p.add_argument("--version", action="version", version=f"mdevd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="mount the sysfs mirror and serve devices over vfio-user",
        description="Mount the sysfs mirror and serve devices over vfio-user. Options come "
        f"from the config file ({config.DEFAULT_PATH} if present), then from the flags, "
        "which win.",
        epilog=errors.EXIT_STATUS,
        formatter_class=raw,
    )
    cfg = s.add_mutually_exclusive_group()
    cfg.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML file of serve's options (default {config.DEFAULT_PATH}, if present): "
        "a key per long flag (run-dir = ...), [parents.NAME] tables for --parent-opt",
    )
    cfg.add_argument("--no-config", action="store_true", help="read no config file")
    s.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="vfio-user sockets")
    s.add_argument("--sysfs", type=Path, help="mount point (default RUN_DIR/sys)")
    s.add_argument(
        "--persist",
        type=Path,
        help="record devices, SR-IOV VFs and their bindings here; recreate them at start",
    )
    s.add_argument(
        "--mdevctl-config",
        type=Path,
        metavar="DIR",
        help="start the devices `mdevd mdevctl define --auto` wrote here "
        "(default RUN_DIR/mdevctl.d, what `mdevd mdevctl` uses)",
    )
    s.add_argument(
        "--parent",
        action="append",
        default=[],
        metavar="MODULE:FACTORY@LOCATION",
        help="register a parent that is not an installed plug-in, "
        "e.g. pkg.mod:Driver@devices/virtual/foo/foo (Driver is called with no arguments)",
    )
    s.add_argument(
        "--parent-opt",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an option for an installed parent plug-in (mdevd parents lists them)",
    )
    s.add_argument(
        "--no-parent",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this installed parent plug-in out",
    )
    s.add_argument(
        "--no-builtins", action="store_true", help="register no plug-ins, only --parent ones"
    )
    s.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="native",
        help="vfio-user implementation serving the devices (default native)",
    )
    s.add_argument(
        "--io",
        choices=("thread", "trio"),
        default="",
        help="native transport: serve each connection on its own thread (devices that "
        "allow it; the default) or as a trio task",
    )
    s.add_argument(
        "--spin-us",
        type=_spin_us,
        default=None,
        metavar="US",
        help="native transport, connection threads: poll this long for a bursting client's "
        "next request before sleeping (0 = never; default: each device's request_spin_us)",
    )
    s.add_argument(
        "--parent-transport",
        action="append",
        default=[],
        metavar="PARENT=TRANSPORT",
        type=_parent_transport,
        help="serve the mdevs of one parent with another transport, e.g. mtty=libvfio-user",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging (--log-level debug)")
    s.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="text (default) or json: one object per line (time, level, logger, message, "
        "device, client, event, errno)",
    )
    s.add_argument("--log-level", choices=logs.LEVELS, default="info", help="default info")
    pds = s.add_argument_group("pds card (shorthands for --no-parent pds / --parent-opt pds.*)")
    pds.add_argument("--no-pds", action="store_true", help="no pds card")
    pds.add_argument("--pds-pf", metavar="BDF", help="PF address (default 0000:60:00.0)")
    pds.add_argument("--pds-total-vfs", metavar="N", help="sriov_totalvfs (default 8)")
    pds.add_argument("--pds-ns-size", metavar="SIZE", help="namespace per VF (default 1G)")
    pds.add_argument("--pds-backing-dir", metavar="DIR", help="VF namespace files (RUN_DIR/pds)")
    pds.add_argument("--pds-doorbells", choices=("trapped", "mmap"), help="VF doorbell mode")

    sub.add_parser("parents", help="list the installed parent plug-ins and their options")

    n = sub.add_parser("new-parent", help="write a new parent package from the template")
    n.add_argument("name", help="package and parent name, e.g. mydev")
    n.add_argument("--dir", type=Path, default=Path("."), help="where to create NAME/ (default .)")

    m = sub.add_parser("mdevctl", help="run the real mdevctl against the mirror")
    m.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    m.add_argument("--sysfs", type=Path, help="the mirror (default RUN_DIR/sys)")
    m.add_argument("--config", type=Path, help="stands in for /etc/mdevctl.d (RUN_DIR/mdevctl.d)")
    m.add_argument("args", nargs=argparse.REMAINDER, help="mdevctl arguments")

    d = sub.add_parser("devlink", help="iproute2's devlink dev param, against mdevd")
    d.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    d.add_argument("args", nargs=argparse.REMAINDER, help="e.g. dev param show")

    i = sub.add_parser("ip", help="iproute2's ip link set PF vf N mac/state, against mdevd")
    i.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    i.add_argument("args", nargs=argparse.REMAINDER, help="e.g. link set ifcvf0 vf 0 state disable")

    st = sub.add_parser("status", help="the running daemon's devices: sockets, clients, errors")
    st.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    st.add_argument("--json", action="store_true", help="as JSON objects")

    sub.add_parser("lab", help="the QEMU lab (mdevcore.tools.lab)", add_help=False)
    sub.add_parser("migrate", help="live-migrate a device (mdevcore.migration.cli)", add_help=False)
    return p


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """serve's arguments: the config file's values under the flags given.

    The file's values become the serve parser's defaults and the command
    line is parsed again, so a flag wins and a list flag adds to the file.
    """
    args = parser.parse_args(argv)
    path: Path | None = args.config
    if args.no_config or (path is None and not config.DEFAULT_PATH.exists()):
        return _fold_pds_shorthands(args, [])
    loaded = config.load(path or config.DEFAULT_PATH)
    known = None
    if config.PARENTS in loaded.document:
        from mdevcore.plugins import discover

        known = {d.plugin.name: tuple(d.plugin.options) for d in discover()}
    defaults = config.parser_defaults(loaded, _subparser(parser, "serve"), known)
    _subparser(parser, "serve").set_defaults(**defaults)
    return _fold_pds_shorthands(parser.parse_args(argv), defaults.get("parent_opt", []))


def _fold_pds_shorthands(args: argparse.Namespace, from_file: list[str]) -> argparse.Namespace:
    """--parent-opt as the file, the --pds-* flags, then --parent-opt flags (last wins)."""
    names = ("pf", "total_vfs", "ns_size", "backing_dir", "doorbells")
    shorthands = []
    for name in names:
        value = getattr(args, f"pds_{name}")
        if value is not None:
            shorthands.append(f"pds.{name}={value}")
            setattr(args, f"pds_{name}", None)
    flags = args.parent_opt[len(from_file) :]
    args.parent_opt = [*from_file, *shorthands, *flags]
    return args


def _serve_roles(args: argparse.Namespace) -> list[errors.Role]:
    run_dir: Path = args.run_dir
    opts = dict(o.partition("=")[::2] for o in args.parent_opt)
    backing = opts.get("pds.backing_dir")
    return errors.roles_for_serve(
        run_dir,
        args.sysfs or run_dir / "sys",
        args.persist,
        args.mdevctl_config or run_dir / "mdevctl.d",
        Path(backing) if backing else run_dir / "pds",
    )


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["lab"]:
        from mdevcore.tools.lab.cli import main as lab_main  # another component; imported lazily

        return int(lab_main(args_list[1:]) or 0)
    if args_list[:1] == ["migrate"]:
        from mdevcore.migration.cli import main as migrate_main

        return migrate_main(args_list[1:])
    parser = _parser()
    roles: list[errors.Role] = []
    try:
        args = parser.parse_args(args_list)
        if args.command == "serve":
            if args.config is not None:
                roles = [errors.Role(args.config, "read the config file")]
            args = _with_config(parser, args_list)
            roles = _serve_roles(args)
            logs.configure(args.log_format, "debug" if args.verbose else args.log_level)
        code = _run(args)
        sys.stdout.flush()  # here, so a closed pipe is seen by the handler below
        return code
    except config.ConfigError as e:
        print(f"mdevd: error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`mdevd parents | head`): nothing failed here.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.EXIT_OK
    except OSError as e:
        print(f"mdevd: error: {errors.explain(e, roles)}", file=sys.stderr)
        return errors.EXIT_FAILED
    except KeyboardInterrupt:
        return errors.EXIT_INTERRUPTED


def _run(args: Any) -> int:
    """The subcommand (errors go to main's handler)."""
    if args.command == "serve":
        from mdevcore.daemon.serve import serve  # trio and pyfuse3 only when serving

        return serve(args)
    if args.command == "parents":
        from mdevcore.plugins import describe, discover

        print(describe(discover()))
        return 0
    if args.command == "new-parent":
        from mdevcore.newparent import main as new_parent

        return new_parent(args.name, args.dir)
    if args.command == "mdevctl":
        from mdevcore.daemon.mdevctl import run_mdevctl

        run_dir: Path = args.run_dir
        sysfs = args.sysfs or run_dir / "sys"
        mdevctl_config = args.config or run_dir / "mdevctl.d"
        return run_mdevctl(sysfs, mdevctl_config, args.args)
    if args.command == "devlink":
        from mdevcore.daemon.devlink import devlink_main

        return devlink_main(args.run_dir, args.args)
    if args.command == "ip":
        from mdevcore.daemon.iplink import ip_main

        return ip_main(args.run_dir, args.args)
    if args.command == "status":
        from mdevcore.daemon.status import status_main

        return status_main(args.run_dir, args.json)
    return errors.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

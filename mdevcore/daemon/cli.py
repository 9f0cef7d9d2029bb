"""``mdevd``: serve the mdev sysfs mirror, run mdevctl against it, or the lab.

mdevd serve [--sysfs DIR] [--run-dir DIR] [--persist DIR] [--mdevctl-config DIR]
            [--parent-opt NAME.KEY=VALUE]...
            [--transport native|libvfio-user] [--io thread|trio]
            [--parent-transport PARENT=TRANSPORT]...
mdevd parents
mdevd new-parent NAME [--dir DIR]
mdevd mdevctl [--sysfs DIR] [--config DIR] [--run-dir DIR] ARGS...
mdevd devlink [--run-dir DIR] dev param {set|show} ...
mdevd ip [--run-dir DIR] link {set|show} ...
mdevd migrate [send|receive] ...
mdevd status [--run-dir DIR] [--json]
mdevd lab ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/mdevd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdevd", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="mount the sysfs mirror and serve devices over vfio-user")
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
        choices=("native", "libvfio-user"),
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
        "--parent-transport",
        action="append",
        default=[],
        metavar="PARENT=TRANSPORT",
        help="serve the mdevs of one parent with another transport, e.g. mtty=libvfio-user",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    sub.add_parser("lab", help="the QEMU lab (tools.lab)", add_help=False)
    sub.add_parser("migrate", help="live-migrate a device (mdevcore.migration.cli)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["lab"]:
        from tools.lab.cli import main as lab_main  # another component; imported lazily

        return int(lab_main(args_list[1:]) or 0)
    if args_list[:1] == ["migrate"]:
        from mdevcore.migration.cli import main as migrate_main

        return migrate_main(args_list[1:])
    args = _parser().parse_args(args_list)
    try:
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
            config = args.config or run_dir / "mdevctl.d"
            return run_mdevctl(sysfs, config, args.args)
        if args.command == "devlink":
            from mdevcore.daemon.devlink import devlink_main

            return devlink_main(args.run_dir, args.args)
        if args.command == "ip":
            from mdevcore.daemon.iplink import ip_main

            return ip_main(args.run_dir, args.args)
        if args.command == "status":
            from mdevcore.daemon.status import status_main

            return status_main(args.run_dir, args.json)
    except OSError as e:
        print(f"mdevd: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

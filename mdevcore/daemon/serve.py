"""``mdevd serve``: mount the mirror, register parents, serve devices until a signal.

Startup order: parents (installed plug-ins, then --parent), the server manager,
--persist restore of the mdevs, hosted parents (the pds card,
mdevcore.daemon.hosts) and the --persist restore of their PCI state
(SR-IOV, bindings, devlink: mdevcore.daemon.pci_persist), the devices
mdevctl defined with --auto (mdevcore.daemon.autostart), the control socket
<run-dir>/mdevd.ctl (``mdevd devlink``, ``mdevd ip``,
``mdevd status``), the mirror mount, then the banner
ending in "mdevd: ready" and, under systemd, READY=1 to $NOTIFY_SOCKET.
SIGTERM/SIGINT: STOPPING=1, stop following persistence (records stay),
stop hosted parents, disconnect clients and stop servers (sockets
unlinked), unmount, exit 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import trio

from mdevcore import plugins
from mdevcore.core import MdevCore
from mdevcore.daemon import parents, sdnotify
from mdevcore.daemon.autostart import Autostart
from mdevcore.daemon.control import ControlServer
from mdevcore.daemon.devlink import DevlinkRegistry, control_path
from mdevcore.daemon.hosts import HostContext, HostedParent
from mdevcore.daemon.iplink import NetdevRegistry
from mdevcore.daemon.pci_persist import PCI_STATE_FILE, PciPersist
from mdevcore.daemon.persist import PersistStore
from mdevcore.daemon.servers import LIBVFIO_USER, UNIX_PATH_MAX, ServerManager, TransportChoice
from mdevcore.pci.bus import PciBus
from mdevcore.sysfs import MdevSysfs, qemu_device_arg
from mdevcore.sysfs.fuse import check_mountpoint, mounted
from mdevcore.sysfs.mounts import clear_stale_mount
from mdevcore.sysfs.pci_view import PciSysfs

log = logging.getLogger("mdevd")


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Every create and remove logs; the format names no source file, line,
    # thread or process, so the records need not look them up (a fifth of
    # a record's cost: the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        extra = tuple(parents.ParentSpec.parse(text) for text in args.parent)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e)) from None
    found = [] if args.no_builtins else plugins.discover()
    options = plugins.parse_options(_parent_opts(args), (d.plugin for d in found))
    left_out = set(args.no_parent) | ({"pds"} if args.no_pds else set())
    unknown = left_out - {d.plugin.name for d in found} - {"pds"}
    if unknown and not args.no_builtins:
        raise OSError(errno.EINVAL, f"--no-parent: no plug-in named {', '.join(sorted(unknown))}")
    found = [d for d in found if d.plugin.name not in left_out]
    transports = _transports(args)
    run_dir: Path = args.run_dir
    sysfs: Path = args.sysfs or run_dir / "sys"
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_mount(sysfs)
    if not sysfs.exists():
        sysfs.mkdir(parents=True)
    check_mountpoint(sysfs)
    core = MdevCore()
    hosts = parents.register_plugins(core, found, options, run_dir)
    parents.register_specs(core, extra)
    try:
        mdevctl_config = args.mdevctl_config or run_dir / "mdevctl.d"
        trio.run(_serve, core, sysfs, run_dir, args.persist, hosts, transports, mdevctl_config)
    except BaseExceptionGroup as group:
        sole = _sole_os_error(group)
        if sole is group:
            raise
        raise sole from None
    return 0


def _transports(args: argparse.Namespace) -> TransportChoice:
    """--transport and --parent-transport; a missing libvfio-user fails here, at start."""
    per_parent: dict[str, str] = {}
    for item in args.parent_transport:
        parent, sep, transport = item.partition("=")
        if not sep or not parent:
            raise OSError(errno.EINVAL, f"--parent-transport {item!r}: expected PARENT=TRANSPORT")
        per_parent[parent] = transport
    try:
        choice = TransportChoice(args.transport, per_parent, io=args.io, spin_us=args.spin_us)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e)) from None
    if choice.uses(LIBVFIO_USER):
        from mdevcore.vfio_user.libvfio_user_ffi import load

        load()  # LibvfioUserMissing (an OSError) says how to install it
    return choice


def _sole_os_error(group: BaseExceptionGroup) -> BaseException:
    """The OSError a nursery wrapped (to report it in one line), else the group."""
    matched, rest = group.split(OSError)
    if matched is None or rest is not None:
        return group
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _parent_opts(args: argparse.Namespace) -> list[str]:
    """--parent-opt values, with the --pds-* shorthands first (an explicit one wins)."""
    names = ("pf", "total_vfs", "ns_size", "backing_dir", "doorbells")
    shorthands = [
        f"pds.{name}={getattr(args, f'pds_{name}')}"
        for name in names
        if getattr(args, f"pds_{name}", None) is not None
    ]
    return shorthands + list(args.parent_opt)


async def _serve(
    core: MdevCore,
    sysfs: Path,
    run_dir: Path,
    persist_dir: Path | None,
    hosts: Sequence[HostedParent] = (),
    transports: TransportChoice | None = None,
    mdevctl_config: Path | None = None,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            servers = ServerManager(core, run_dir, nursery, transports or TransportChoice())
            host_servers = servers.servers  # VFs by BDF beside the mdevs by UUID
            devlink = DevlinkRegistry()
            netdevs = NetdevRegistry()  # PF netdevs for mdevd ip
            settle = servers.settle

            persist = PersistStore(core, persist_dir) if persist_dir else None
            if persist is not None:
                restored = persist.restore()
                persist.start()
                log.info("persist: recreated %d device(s) from %s", restored, persist_dir)
            view = MdevSysfs(core, socket_path=servers.socket_path, vfio_errors=servers.errors_text)
            # One PCI bus and its sysfs view for every hosted parent.
            bus = PciBus()
            pci_view = PciSysfs(bus, view.tree) if hosts else None
            started: list[HostedParent] = []
            pci_persist: PciPersist | None = None
            autostart: Autostart | None = None
            try:
                for host in hosts:
                    host.start(HostContext(view.tree, host_servers, devlink, run_dir, bus, netdevs))
                    started.append(host)
                if persist_dir is not None and hosts:
                    pci_persist = PciPersist(bus, devlink, persist_dir / PCI_STATE_FILE)
                    restored = pci_persist.restore()
                    pci_persist.start()
                    log.info("persist: restored the PCI state of %d function(s)", restored)
                if mdevctl_config is not None:
                    autostart = Autostart(core, mdevctl_config, nursery)
                    autostart.start()
                ctl = control_path(run_dir)
                if len(os.fsencode(ctl)) <= UNIX_PATH_MAX:
                    control = ControlServer(
                        ctl, devlink, settle, netdevs, status=host_servers.status
                    )
                    await nursery.start(control.serve)
                else:
                    log.warning("%s is too long for AF_UNIX: no control socket (devlink)", ctl)
                async with mounted(view.tree, sysfs, settle=settle):
                    await settle()
                    _print_banner(core, sysfs, run_dir, started)
                    sdnotify.notify(f"READY=1\nSTATUS=serving, mirror at {sysfs}")
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        break
            finally:
                with trio.CancelScope(shield=True):
                    sdnotify.notify("STOPPING=1")
                    if autostart is not None:
                        autostart.stop()
                    if pci_persist is not None:
                        pci_persist.stop()  # nor the VFs and their bindings
                    if persist is not None:
                        persist.stop()  # shutting down must not forget the devices
                    for host in reversed(started):
                        try:
                            host.stop()  # unbinds and removes its devices
                        except Exception:
                            log.exception("hosted parent %s failed to stop", host.name)
                    await servers.aclose()
                    if pci_view is not None:
                        pci_view.close()
                    view.close()
                nursery.cancel_scope.cancel()


def _print_banner(
    core: MdevCore, sysfs: Path, run_dir: Path, hosts: Sequence[HostedParent] = ()
) -> None:
    lines = [f"mdevd: sysfs mirror at {sysfs}, vfio-user sockets in {run_dir}"]
    for host in hosts:
        lines += [f"mdevd: {line}" for line in host.banner(sysfs, run_dir)]
    for parent in core.parents.values():
        for type_id in parent.types:
            create = sysfs / parent.location / "mdev_supported_types" / type_id / "create"
            lines.append(
                f"mdevd: create a {type_id}: echo $(cat /proc/sys/kernel/random/uuid) > {create}"
            )
    if not core.parents:
        lines.append("mdevd: no parents registered (use --parent)")
    sock = qemu_device_arg(run_dir / "UUID.sock")
    lines.append(f"mdevd: attach it to QEMU: -device '{sock}'")
    lines.append(f"mdevd: or with mdevctl: mdevd mdevctl --sysfs {sysfs} start -p PARENT -t TYPE")
    lines.append("mdevd: ready")
    print("\n".join(lines), flush=True)

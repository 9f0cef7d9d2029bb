"""``mdevd serve``: mount the mirror, register parents, serve devices until a signal.

Startup order: parents (built-ins, then --parent), the server manager,
--persist restore, the mirror mount, then the banner ending in
"mdevd: ready".  SIGTERM/SIGINT: stop following persistence (records stay),
disconnect clients and stop servers (sockets unlinked), unmount, exit 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
from pathlib import Path

import trio

from mdevcore.core import MdevCore
from mdevcore.daemon import builtins
from mdevcore.daemon.persist import PersistStore
from mdevcore.daemon.servers import ServerManager
from mdevcore.sysfs import MdevSysfs, qemu_device_arg
from mdevcore.sysfs.fuse import check_mountpoint, mounted
from mdevcore.sysfs.mounts import clear_stale_mount

log = logging.getLogger("mdevd")


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        extra = tuple(builtins.ParentSpec.parse(text) for text in args.parent)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e)) from None
    run_dir: Path = args.run_dir
    sysfs: Path = args.sysfs or run_dir / "sys"
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_mount(sysfs)
    if not sysfs.exists():
        sysfs.mkdir(parents=True)
    check_mountpoint(sysfs)
    core = MdevCore()
    if not args.no_builtins:
        builtins.register(core, builtins.BUILTIN_PARENTS, required=False)
    builtins.register(core, extra, required=True)
    try:
        trio.run(_serve, core, sysfs, run_dir, args.persist)
    except BaseExceptionGroup as group:
        sole = _sole_os_error(group)
        if sole is group:
            raise
        raise sole from None
    return 0


def _sole_os_error(group: BaseExceptionGroup) -> BaseException:
    """The OSError a nursery wrapped (to report it in one line), else the group."""
    matched, rest = group.split(OSError)
    if matched is None or rest is not None:
        return group
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _serve(core: MdevCore, sysfs: Path, run_dir: Path, persist_dir: Path | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            servers = ServerManager(core, run_dir, nursery)
            persist = PersistStore(core, persist_dir) if persist_dir else None
            if persist is not None:
                restored = persist.restore()
                persist.start()
                log.info("persist: recreated %d device(s) from %s", restored, persist_dir)
            view = MdevSysfs(core, socket_path=servers.socket_path)
            try:
                async with mounted(view.tree, sysfs, settle=servers.settle):
                    await servers.settle()
                    _print_banner(core, sysfs, run_dir)
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        break
            finally:
                with trio.CancelScope(shield=True):
                    if persist is not None:
                        persist.stop()  # shutting down must not forget the devices
                    await servers.aclose()
                    view.close()
                nursery.cancel_scope.cancel()


def _print_banner(core: MdevCore, sysfs: Path, run_dir: Path) -> None:
    lines = [f"mdevd: sysfs mirror at {sysfs}, vfio-user sockets in {run_dir}"]
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

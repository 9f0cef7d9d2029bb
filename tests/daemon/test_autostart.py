"""mdevctl's auto-start definitions, started as udev would: at start and when the parent appears."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import trio
import trio.testing
from mdev_testdriver import PoolDriver

from mdevcore.core import MdevCore
from mdevcore.daemon.autostart import Autostart

AUTO = uuid.UUID("11111111-2222-3333-4444-555555555555")
MANUAL = uuid.UUID("66666666-7777-8888-9999-000000000000")


def define(config: Path, parent: str, dev: uuid.UUID, start: str, **extra: object) -> None:
    """What ``mdevctl define [--auto]`` writes: <config>/<parent>/<uuid>."""
    (config / parent).mkdir(parents=True, exist_ok=True)
    record = {"mdev_type": "pool-2", "start": start, "attrs": [], **extra}
    (config / parent / str(dev)).write_text(json.dumps(record, indent=2) + "\n")


def register_pool(core: MdevCore) -> None:
    core.register_parent("pool", "devices/virtual/pool/pool", PoolDriver())


async def test_auto_definitions_start_with_the_daemon_and_with_their_parent(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mdevctl.d"
    define(config, "pool", AUTO, "auto")
    define(config, "pool", MANUAL, "manual")
    (config / "pool" / "not-a-uuid").write_text("{}")
    (config / "scripts.d").mkdir()  # mdevctl's own directory sits beside the parents
    core = MdevCore()
    async with trio.open_nursery() as nursery:
        autostart = Autostart(core, config, nursery)
        assert autostart.start() == 0  # the parent is not there yet
        register_pool(core)  # the parent appears: its auto devices start
        await trio.testing.wait_all_tasks_blocked()
        assert set(core.devices) == {AUTO}
        assert core.devices[AUTO].type.id == "pool-2"
        # gone and back: started again; a device that exists is left alone
        core.unregister_parent("pool")
        register_pool(core)
        await trio.testing.wait_all_tasks_blocked()
        assert set(core.devices) == {AUTO}
        assert autostart.start_parent("pool") == 0
        autostart.stop()
    core2 = MdevCore()
    register_pool(core2)
    async with trio.open_nursery() as nursery:
        assert Autostart(core2, config, nursery).start() == 1  # parents present at start
    assert set(core2.devices) == {AUTO}


async def test_bad_definitions_are_skipped(tmp_path: Path) -> None:
    config = tmp_path / "mdevctl.d"
    good = uuid.UUID(int=3)
    define(config, "pool", uuid.UUID(int=1), "auto", mdev_type="no-such-type")
    (config / "pool" / str(uuid.UUID(int=2))).write_text("{broken")
    define(config, "pool", good, "auto")
    core = MdevCore()
    register_pool(core)
    async with trio.open_nursery() as nursery:
        assert Autostart(core, config, nursery).start() == 1
        assert Autostart(core, tmp_path / "missing", nursery).start() == 0
    assert set(core.devices) == {good}

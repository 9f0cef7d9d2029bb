"""Parents as plug-ins: discovery, listing, options, and refusals that say why."""

from __future__ import annotations

import errno
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from mdevd_proc import MDEVD, Mdevd

from mdevcore.plugins import ENTRY_POINT_GROUP, ParentPlugin, describe, discover, parse_options

MTTY_TYPES = "devices/virtual/mtty/mtty/mdev_supported_types"


def test_mtty_and_pds_are_installed_plugins() -> None:
    found = {d.plugin.name: d for d in discover()}
    assert found["mtty"].plugin.kind == "mdev"
    assert found["pds"].plugin.kind == "hosted"
    r = subprocess.run([*MDEVD, "parents"], capture_output=True, text=True, check=True)
    assert "mtty  (mdev parent at devices/virtual/mtty/mtty" in r.stdout
    assert "--parent-opt pds.total_vfs=" in r.stdout
    assert r.stdout.strip() == describe(discover())


def test_broken_or_foreign_entry_points_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    eps = [
        metadata.EntryPoint("gone", "no.such.module:PLUGIN", ENTRY_POINT_GROUP),
        metadata.EntryPoint("odd", "os:sep", ENTRY_POINT_GROUP),  # not a ParentPlugin
        metadata.EntryPoint("mtty", "mdevcore.samples.mtty.plugin:PLUGIN", ENTRY_POINT_GROUP),
        metadata.EntryPoint("again", "mdevcore.samples.mtty.plugin:PLUGIN", ENTRY_POINT_GROUP),
    ]
    found = discover(eps)
    assert [d.plugin.name for d in found] == ["mtty"]
    text = caplog.text
    assert "gone" in text and "odd" in text and "ignored" in text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mtty.ports", "is not NAME.KEY=VALUE"),
        ("ports=3", "is not NAME.KEY=VALUE"),
        ("nope.ports=3", "no parent plug-in 'nope'"),
        ("mtty.colour=red", "mtty takes no 'colour' (it takes: ports)"),
    ],
)
def test_bad_parent_options_say_what_is_wrong(text: str, why: str) -> None:
    plugins = [d.plugin for d in discover()]
    with pytest.raises(OSError) as info:
        parse_options([text], plugins)
    assert info.value.errno == errno.EINVAL and why in str(info.value)


def test_a_plugin_gives_exactly_one_kind() -> None:
    with pytest.raises(ValueError):
        ParentPlugin(name="x", summary="neither")
    with pytest.raises(ValueError):
        ParentPlugin(name="x", summary="mdev without a place", driver=lambda o: None)  # type: ignore[arg-type,return-value]


def test_options_reach_the_plugin_and_parents_can_be_left_out(tmp_path: Path) -> None:
    # every hosted parent left out (ifcvf once the package is installed with it)
    hosted = [d.plugin.name for d in discover() if d.plugin.kind == "hosted"]
    leave_out = [a for name in hosted for a in ("--no-parent", name)]
    d = Mdevd(tmp_path, "--parent-opt", "mtty.ports=3", *leave_out, builtins=True)
    try:
        types = d.sysfs / MTTY_TYPES
        assert (types / "mtty-2/available_instances").read_text() == "1\n"
        assert (types / "mtty-1/available_instances").read_text() == "3\n"
        assert not (d.sysfs / "bus/pci/devices").exists()  # no hosted card, no PCI tree
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--parent-opt", "mtty.ports=many"], "mtty.ports='many' is not a number"),
        (["--no-parent", "nosuch"], "--no-parent: no plug-in named nosuch"),
        (["--parent", "mdevcore.driver:MdevDriver@devices/virtual/x/x"], "has no name"),
    ],
)
def test_daemon_refuses_bad_parent_setup_in_one_line(
    tmp_path: Path, args: list[str], why: str
) -> None:
    r = subprocess.run(
        [*MDEVD, "serve", "--run-dir", str(tmp_path), "--no-pds", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert why in r.stderr and "Traceback" not in r.stderr

"""mdevd serve's TOML config file: what it sets, what flags override, what it refuses."""

from __future__ import annotations

import argparse
import json
import textwrap
import uuid
from pathlib import Path

import pytest
from mdevd_run import Serving, mdevd

from mdevcore.daemon import cli, config
from mdevcore.daemon.config import ConfigError


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "mdevd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _args(path: Path, *flags: str) -> argparse.Namespace:
    """What mdevd serve would run with (the real parser, the file, the flags)."""
    return cli._with_config(cli._parser(), ["serve", "--config", str(path), *flags])


def test_the_file_sets_options_and_flags_win(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        run-dir = "/run/a"
        sysfs = "/run/a/mirror"
        persist = "/var/lib/a"
        transport = "native"
        io = "trio"
        parent-transport = { mtty = "libvfio-user" }
        no-parent = ["ifcvf"]
        log-format = "json"

        [parents.pds]
        doorbells = "mmap"
        total_vfs = 4
        """,
    )
    args = _args(path, "--sysfs", "/run/b", "--no-parent", "pds", "--pds-doorbells", "trapped")
    assert args.run_dir == Path("/run/a") and args.persist == Path("/var/lib/a")
    assert args.sysfs == Path("/run/b")  # the flag
    assert args.io == "trio"  # a flag added to serve is a key without a change to config.py
    assert args.parent_transport == ["mtty=libvfio-user"]
    assert args.no_parent == ["ifcvf", "pds"]  # a list flag adds to the file
    assert args.log_format == "json" and args.log_level == "info"
    # File first, then --pds-*, then --parent-opt: the last one of a key wins.
    assert args.parent_opt == ["pds.doorbells=mmap", "pds.total_vfs=4", "pds.doorbells=trapped"]
    explicit = _args(path, "--pds-doorbells", "trapped", "--parent-opt", "pds.doorbells=mmap")
    assert explicit.parent_opt[-1] == "pds.doorbells=mmap"
    assert _args(path, "--log-format", "text").log_format == "text"
    assert args.spin_us is None  # each device's own request_spin_us
    # A number for a numeric flag; elsewhere a number is still refused (transport = 5 below).
    assert _args(_write(tmp_path, "spin-us = 50\n")).spin_us == 50.0
    assert _args(_write(tmp_path, "spin-us = 2.5\n"), "--spin-us", "0").spin_us == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('# mdevd\nrun_dir = "/run/x"\n',
         "{path}:2: run_dir: unknown key (did you mean 'run-dir'?); "
         "the keys are mdevd serve's flags"),
        ('sysfs = "/s"\ntransport = 5\n',
         "{path}:2: transport: expected a string, not an integer (5)"),
        ('log-format = "xml"\n',
         "{path}:1: log-format: 'xml' is not one of text, json"),
        ('no-builtins = "yes"\n',
         "{path}:1: no-builtins: expected true or false, not a string ('yes')"),
        ('\n[parents.mtty]\nports = 4\nport = 2\n',
         "{path}:4: parents.mtty.port: mtty takes no 'port' (it takes: ports)"),
        ('[parents.mtty]\nports = [1]\n',
         "{path}:2: parents.mtty.ports: expected a string, number or boolean, not an array ([1])"),
        ('[parents.nosuch]\nx = 1\n',
         "{path}:1: parents.nosuch: no parent plug-in 'nosuch' (installed: ifcvf, mtty, pds)"),
        ('parent-transport = { mtty = "carrier-pigeon" }\n',
         "{path}:1: parent-transport: 'mtty=carrier-pigeon': expected PARENT=TRANSPORT, "
         "TRANSPORT one of native, libvfio-user"),
        ('run-dir = "/run/x"\nsysfs = \n',
         "{path}:2: not valid TOML: Invalid value"),
        ('spin-us = -1\n',
         "{path}:1: spin-us: '-1': expected microseconds from 0 to 1e6"),
        ('spin-us = "nan"\n',
         "{path}:1: spin-us: 'nan': expected microseconds from 0 to 1e6"),
    ],
)  # fmt: skip
def test_a_bad_file_is_refused_naming_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        _args(path)
    assert str(caught.value) == message.format(path=path)


def test_mdevd_serve_from_a_config_file(tmp_path: Path) -> None:
    """The real daemon: the file's run dir, ports and JSON log, the flag's mirror."""
    run_dir, sysfs = tmp_path / "run", tmp_path / "mirror"
    path = _write(
        tmp_path,
        f"""\
        run-dir = "{run_dir}"
        sysfs = "{tmp_path}/not-this-one"
        no-parent = ["pds", "ifcvf"]
        log-format = "json"
        log-level = "debug"

        [parents.mtty]
        ports = 3
        """,
    )
    daemon = Serving(tmp_path / "log", "--config", path, "--sysfs", sysfs)
    try:
        assert f"mdevd: sysfs mirror at {sysfs}, vfio-user sockets in {run_dir}" in daemon.banner
        types = sysfs / "devices/virtual/mtty/mtty/mdev_supported_types"
        assert (types / "mtty-1" / "available_instances").read_text() == "3\n"
        dev = uuid.uuid4()
        (types / "mtty-1" / "create").write_text(f"{dev}\n")
        assert (run_dir / f"{dev}.sock").exists()
    finally:
        assert daemon.stop() == 0
    lines = daemon.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"debug", "info"} <= {r["level"] for r in records}
    assert any(str(dev) in r["message"] for r in records)


def test_a_bad_file_stops_mdevd_with_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, 'run-dir = "/run/x"\n[parents.pds]\ndoorbels = "mmap"\n')
    r = mdevd("serve", "--config", path)
    assert r.returncode == 2
    assert r.stderr == (
        f"mdevd: error: {path}:3: parents.pds.doorbels: pds takes no 'doorbels' "
        "(it takes: backing_dir, doorbells, ns_size, pf, total_vfs)\n"
    )


def test_the_example_file_in_contrib_is_accepted() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "mdevd.toml"
    args = _args(example)
    assert args.run_dir == Path("/run/mdevd") and args.sysfs == Path("/run/mdevd/sys")
    assert args.parent_opt == ["pds.backing_dir=/var/lib/mdevd/pds", "pds.doorbells=trapped"]


def test_the_default_file_is_read_if_present_and_no_config_skips_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", _write(tmp_path, 'run-dir = "/run/default"\n'))
    parser = cli._parser()
    assert cli._with_config(parser, ["serve"]).run_dir == Path("/run/default")
    assert cli._with_config(cli._parser(), ["serve", "--no-config"]).run_dir == Path("/run/mdevd")
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert cli._with_config(cli._parser(), ["serve"]).run_dir == Path("/run/mdevd")

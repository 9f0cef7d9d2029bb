"""The wheel a user installs: built from the checkout, installed into a fresh
venv (not editable), its console scripts and its ``mdevd serve`` working
against the mirror with one mtty device, and nothing else claimed in
site-packages."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from kit_venv import CLEAN_ENV, WheelVenv, run, wait_ready

from mdevcore import __version__

# Generic top-level names another project could hold too.  The repository
# keeps parents/, samples/ and tools/ at its top, but they install as
# mdevcore.parents, mdevcore.samples and mdevcore.tools (mdevcore/ holds
# symlinks to them), so none of these may appear in site-packages.
GENERIC_NAMES = ("parents", "samples", "tools")
EXPECTED_GENERIC = False
TYPES = "devices/virtual/mtty/mtty/mdev_supported_types/mtty-1"


def _top_level_names(venv: WheelVenv) -> set[str]:
    """What the mdevcore install put at the top of site-packages (its RECORD)."""
    code = (
        "from importlib.metadata import distribution\n"
        "print('\\n'.join(str(f) for f in distribution('mdevcore').files))"
    )
    files = run(venv.python, "-c", code).split()
    top = {f.split("/")[0] for f in files if not f.startswith("../")}
    return {name for name in top if not name.endswith((".dist-info", ".pth"))}


def test_wheel_installs_mdevcore_and_only_the_expected_top_level_names(
    wheel_venv: WheelVenv,
) -> None:
    names = _top_level_names(wheel_venv)
    assert "mdevcore" in names
    generic = names & set(GENERIC_NAMES)
    if EXPECTED_GENERIC:
        assert generic == set(GENERIC_NAMES), names
    else:
        assert not generic, f"generic top-level names installed: {sorted(generic)}"
    assert names - {"mdevcore", *GENERIC_NAMES} == set(), names
    # Not an editable install: the code runs from site-packages.
    where = run(wheel_venv.python, "-c", "import mdevcore; print(mdevcore.__file__)")
    assert Path(where.strip()).is_relative_to(wheel_venv.site_packages())


def test_dist_passes_twine_check(wheel_venv: WheelVenv) -> None:
    dist = sorted(wheel_venv.wheel.parent.iterdir())
    assert sorted(p.suffix for p in dist) == [".gz", ".whl"], dist  # the sdist and the wheel
    out = run(sys.executable, "-m", "twine", "check", "--strict", *dist)
    assert out.count("PASSED") == 2, out
    metadata = run(
        wheel_venv.python, "-c", "from importlib.metadata import metadata; "
        "m = metadata('mdevcore'); print(m['License-Expression'], m['Requires-Python'])"
    )  # fmt: skip
    assert metadata.split() == ["MIT", ">=3.11"]


def test_console_scripts_print_the_one_version(wheel_venv: WheelVenv) -> None:
    assert run(wheel_venv.bin("mdevd"), "--version").strip() == f"mdevd {__version__}"
    out = run(wheel_venv.bin("vfio-user-cli"), "--version").strip()
    assert out == f"vfio-user-cli {__version__}"
    assert wheel_venv.wheel.name.startswith(f"mdevcore-{__version__}-")


def test_installed_mdevd_serves_an_mtty_device(wheel_venv: WheelVenv, tmp_path: Path) -> None:
    sysfs, run_dir = tmp_path / "sys", tmp_path / "run"
    proc = subprocess.Popen(
        [wheel_venv.bin("mdevd"), "serve", "--no-config", "--no-pds", "--no-parent", "ifcvf",
         "--sysfs", sysfs, "--run-dir", run_dir],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path, env=CLEAN_ENV,
    )  # fmt: skip
    try:
        wait_ready(proc)
        dev = uuid.uuid4()
        (sysfs / TYPES / "create").write_text(f"{dev}\n")
        socket = run_dir / f"{dev}.sock"
        line = (sysfs / "bus/mdev/devices" / str(dev) / "vfio_user/qemu_device").read_text()
        assert str(socket) in line
        # The installed vfio-user-cli talks to the installed daemon's device.
        config = run(wheel_venv.bin("vfio-user-cli"), socket, "config", timeout=60)
        assert "vendor:device  4348:3253" in config
        (sysfs / "bus/mdev/devices" / str(dev) / "remove").write_text("1\n")
        assert not socket.exists()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0

"""The parent author's path, end to end: a generated parent, installed into a
fresh venv (not editable), found by that venv's ``mdevd serve``, created
through the mirror and with mdevctl, and driven by a lab guest."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from kit_venv import WheelVenv, run, wait_ready

from mdevcore.newparent import generate

pytestmark = pytest.mark.qemu

NAME = "kitdev"
TYPES = f"devices/virtual/{NAME}/{NAME}/mdev_supported_types/{NAME}-1"


@pytest.fixture(scope="module")
def venv(wheel_venv: WheelVenv, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The session's fresh venv (mdevcore from its wheel) and the generated parent in it."""
    package = generate(NAME, tmp_path_factory.mktemp("kit"))
    wheel_venv.pip_install(f"{package}[test]")
    return wheel_venv.dir, package


def test_generated_parent_passes_its_own_unit_tests(venv: tuple[Path, Path]) -> None:
    env_dir, package = venv
    out = run(env_dir / "bin" / "python", "-m", "pytest", "-q", "-m", "not qemu", package / "tests")
    assert "3 passed" in out


def test_generated_parent_is_served_and_driven_by_a_guest(
    venv: tuple[Path, Path], tmp_path: Path
) -> None:
    env_dir, package = venv
    mdevd = env_dir / "bin" / "mdevd"
    assert f"{NAME}  (mdev parent at devices/virtual/{NAME}/{NAME}" in run(mdevd, "parents")
    sysfs, run_dir = tmp_path / "sys", tmp_path / "run"
    proc = subprocess.Popen(
        [mdevd, "serve", "--no-pds", "--sysfs", sysfs, "--run-dir", run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(proc)
        assert (sysfs / TYPES / "available_instances").read_text() == "4\n"
        dev = uuid.uuid4()
        (sysfs / TYPES / "create").write_text(f"{dev}\n")
        device_line = (sysfs / "bus/mdev/devices" / str(dev) / "vfio_user/qemu_device").read_text()
        # The real mdevctl sees the parent and starts a second device.
        mdevctl: list[str | Path] = [mdevd, "mdevctl", "--sysfs", sysfs, "--run-dir", run_dir]
        assert f"{NAME}-1" in run(*mdevctl, "types")
        started = run(*mdevctl, "start", "-p", NAME, "-t", f"{NAME}-1").strip()
        assert str(dev) in run(*mdevctl, "list") and started in run(*mdevctl, "list")
        assert (sysfs / TYPES / "available_instances").read_text() == "2\n"

        from mdevcore.tools.lab.lab import Lab

        script = (package / NAME / "guest.sh").read_text()
        result = Lab.ensure().boot(script, devices=[device_line.strip()], timeout=240)
        print(result.output)
        assert result.rc == 0, result.output
        assert f"{NAME}: registers ok (ID 0x4D444556, COUNT 0 -> 1)" in result.output
        run(*mdevctl, "stop", "-u", started)
        (sysfs / "bus/mdev/devices" / str(dev) / "remove").write_text("1\n")
        assert (sysfs / TYPES / "available_instances").read_text() == "4\n"
    finally:
        proc.terminate()
        assert proc.wait(60) == 0

"""One fresh venv holding mdevcore installed from its built wheel, for the
whole session: the wheel test and the parent kit test share it (a venv and
its dependencies are most of their time)."""

from __future__ import annotations

import sys

import pytest
from kit_venv import WheelVenv, build_dist, run


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> WheelVenv:
    """A fresh venv (not the checkout's) with mdevcore installed from its wheel."""
    base = tmp_path_factory.mktemp("wheel")
    (wheel,) = build_dist(base).glob("mdevcore-*.whl")
    env_dir = base / "venv"
    run(sys.executable, "-m", "venv", env_dir)
    venv = WheelVenv(env_dir, wheel)
    venv.pip_install(wheel)
    return venv

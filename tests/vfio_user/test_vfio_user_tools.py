"""The standalone runner (python -m mdevcore.vfio_user) and vfio-user-cli."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdevcore.tools.vfio_user_cli import main as cli_main

HERE = Path(__file__).parent


@pytest.fixture
def runner(sockdir: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    path = os.path.join(sockdir, "run.sock")
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mdevcore.vfio_user", "--device",
         "vfio_user_fakedev:FakeDevice", "--socket", path],
        env=env,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30  # a startup bound, not a speed check
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "runner never listened"
        time.sleep(0.02)
    yield proc, path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_runner_serves_and_exits_0_on_sigterm(
    runner: tuple[subprocess.Popen[bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    proc, path = runner
    assert cli_main([path, "write", "0", "0x20", "c0ffee"]) == 0
    assert cli_main([path, "read", "0", "0x20", "3"]) == 0
    assert "c0 ff ee" in capsys.readouterr().out
    assert cli_main([path, "info"]) == 0
    out = capsys.readouterr().out
    assert "RESET,PCI" in out and "regions      10" in out
    assert cli_main([path, "regions"]) == 0
    out = capsys.readouterr().out
    assert "mmap [0x0+0x1000] [0x2000+0x2000]" in out and "type 0x80008086/0x3" in out
    assert cli_main([path, "irqs"]) == 0
    assert "MSI-X       4  EVENTFD,NORESIZE" in capsys.readouterr().out
    assert cli_main([path, "config"]) == 0
    out = capsys.readouterr().out
    assert "vendor:device  1234:11e8" in out and "class          ff0000" in out
    assert cli_main([path, "reset"]) == 0
    assert cli_main([path, "read", "0", "0x20", "3"]) == 0
    assert "00 00 00" in capsys.readouterr().out
    assert cli_main([path, "read", "0", "0xfff", "4"]) == 1
    assert "Invalid argument" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not os.path.exists(path)


def test_runner_sigint_also_exits_0(runner: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, path = runner
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert not os.path.exists(path)


def test_cli_bad_socket(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([os.path.join(sockdir, "nothing"), "info"]) == 1
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["sock"], ["sock", "frobnicate"], ["sock", "read", "0", "zz", "4"], ["sock", "write"]],
)
def test_cli_bad_arguments_exit_1(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_exit_status_as_a_process() -> None:
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "mdevcore.tools.vfio_user_cli"]
    bad = subprocess.run([*cmd, "sock", "read"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1 and "usage: vfio-user-cli" in bad.stderr
    helped = subprocess.run([*cmd, "--help"], cwd=root, capture_output=True, text=True)
    assert helped.returncode == 0
    assert "exit status: 0 done, 1 error" in " ".join(helped.stdout.split())

"""mdevd's error lines name what failed and on what; the exit statuses are
those ``--help`` lists.  Each case runs the real ``mdevd serve``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mdevd_run import mdevd

from mdevcore import __version__
from mdevcore.tools.vfio_user_cli import main as vfio_user_cli


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    run = str(tmp / "run")
    (tmp / "file").touch()
    (tmp / "busy").mkdir()
    (tmp / "busy" / "mdevd.ctl").touch()  # not a socket: never replaced
    return [
        (["--sysfs", "/proc/nope", "--run-dir", run],
         "cannot mount the sysfs mirror at /proc/nope: No such file or directory"),
        (["--sysfs", str(tmp / "file"), "--run-dir", run],
         f"cannot mount the sysfs mirror at {tmp}/file: not a directory"),
        (["--run-dir", "/proc/nope"],
         "cannot create the run directory /proc/nope: No such file or directory"),
        (["--run-dir", str(tmp / "busy")],
         f"cannot listen on the control socket {tmp}/busy/mdevd.ctl: exists and is not a socket"),
        (["--run-dir", run, "--persist", "/proc/nope"],
         "cannot restore and record devices in /proc/nope: No such file or directory"),
        (["--run-dir", run, "--parent-opt", "mtty.ports=x"],
         "cannot set up parent plug-in mtty: mtty.ports='x' is not a number"),
        (["--config", str(tmp / "none.toml")],
         f"cannot read the config file {tmp}/none.toml: No such file or directory"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(7))
def test_serve_error_names_the_operation_and_path(case: int, tmp_path: Path) -> None:
    argv, message = _cases(tmp_path)[case]
    extra = [] if "--config" in argv else ["--no-config"]
    # Plug-ins only where the case needs one (they cost a second to load).
    extra += ["--no-pds", "--no-parent", "ifcvf"] if "--parent-opt" in argv else ["--no-builtins"]
    r = mdevd("serve", *extra, *argv)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines()[-1] == f"mdevd: error: {message}"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "sys").is_mount()


def test_usage_errors_exit_2_and_help_lists_the_exit_statuses() -> None:
    r = mdevd("serve", "--no-config", "--parent-transport", "mtty=carrier-pigeon")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        "mdevd serve: error: argument --parent-transport: 'mtty=carrier-pigeon': "
        "expected PARENT=TRANSPORT, TRANSPORT one of native, libvfio-user"
    )
    helped = mdevd("serve", "--help")
    assert helped.returncode == 0
    for line in ("0    done", "1    an operation failed", "2    bad usage", "130  interrupted"):
        assert line in helped.stdout
    assert mdevd("--help").stdout.count("exit status:") == 1
    version = mdevd("--version")
    assert (version.returncode, version.stdout) == (0, f"mdevd {__version__}\n")


def test_vfio_user_cli_says_what_it_could_not_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = tmp_path / "none.sock"
    assert vfio_user_cli([str(socket), "info"]) == 1
    assert capsys.readouterr().err == (
        f"vfio-user-cli: error: cannot connect to {socket}: No such file or directory (ENOENT)\n"
    )
    os.mkfifo(tmp_path / "fifo")  # not a socket at all
    assert vfio_user_cli([str(tmp_path / "fifo"), "read", "0", "0", "4"]) == 1
    assert capsys.readouterr().err == (
        f"vfio-user-cli: error: cannot connect to {tmp_path}/fifo: "
        "Connection refused (ECONNREFUSED)\n"
    )


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """`mdevd parents | head -1`: the closed pipe ends mdevd quietly, exit 0."""
    cli = "import sys; from mdevcore.daemon.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", cli, "parents"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before mdevd has written anything
    err = proc.stderr.read()
    assert proc.wait(30) == 0
    assert b"error" not in err, err

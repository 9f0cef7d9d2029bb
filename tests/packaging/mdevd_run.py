"""Run the real ``mdevd`` (this checkout's) as a process, for the operator's-side tests."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

MDEVD = [sys.executable, "-m", "mdevcore.daemon.cli"]
HANG_GUARD = 60.0  # seconds; only stops a broken daemon from hanging the suite


def mdevd(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command that is expected to end by itself (an error, --help, --version)."""
    return subprocess.run(
        [*MDEVD, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
        env=env,
    )


class Serving:
    """``mdevd serve ARGS`` until ready; stderr (the log) goes to a file."""

    def __init__(self, log_path: Path, *argv: str | Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*MDEVD, "serve", *map(str, argv)], stdout=subprocess.PIPE, stderr=log
            )
        self.banner = self._read_until_ready()

    def _read_until_ready(self) -> str:
        assert self.proc.stdout is not None
        fd, out = self.proc.stdout.fileno(), b""
        while b"mdevd: ready\n" not in out:
            ready, _, _ = select.select([fd], [], [], HANG_GUARD)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mdevd did not start: {self.log_path.read_text()}")
            out += chunk
        return out.decode()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(HANG_GUARD)

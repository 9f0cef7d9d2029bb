"""Run ``mdevd serve`` as a subprocess for tests, with the pool test parent."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

CORE_TESTS = Path(__file__).resolve().parents[1] / "core"
MDEVD = [sys.executable, "-c", "import sys; from mdevcore.daemon.cli import main; sys.exit(main())"]
POOL = "mdev_testdriver:PoolDriver@devices/virtual/pool/pool"  # 24 slots
BIG_POOL = "mdev_testdriver:BigPool@devices/virtual/pool/pool"  # 65536 slots
HANG_GUARD = 60.0  # seconds; only stops a broken daemon from hanging the suite


class Mdevd:
    def __init__(
        self,
        base: Path,
        *extra: str,
        builtins: bool = False,
        parent: str = POOL,
        env: dict[str, str] | None = None,
    ) -> None:
        self.sysfs = base / "sys"
        self.run_dir = base / "run"
        args = ["serve", "--sysfs", str(self.sysfs), "--run-dir", str(self.run_dir)]
        args += ["--parent", parent, *extra]
        if not builtins:
            args.append("--no-builtins")
        env = dict(
            os.environ,
            PYTHONPATH=f"{CORE_TESTS}:{os.environ.get('PYTHONPATH', '')}",
            **(env or {}),
        )
        # the log goes to a file: an unread pipe would fill up and stall the daemon
        self.log_path = base / "mdevd.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*MDEVD, *args], stdout=subprocess.PIPE, stderr=log, env=env
            )
        self.banner = self._read_until_ready()

    def _read_until_ready(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        while b"mdevd: ready\n" not in out:
            # raw reads: a buffered readline could hide data from select()
            ready, _, _ = select.select([fd], [], [], HANG_GUARD)
            if not ready:
                self.stop()
                raise RuntimeError("mdevd did not become ready")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                raise RuntimeError(f"mdevd exited early: {self.stderr}")
            out += chunk
        return out.decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(HANG_GUARD)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, then detach the dead mirror so no test leaves a mount behind."""
        self.proc.kill()
        self.proc.wait()
        if mounted(self.sysfs):
            subprocess.run(["umount", "-l", str(self.sysfs)], check=False)

    @property
    def stderr(self) -> str:
        return self.log_path.read_text()


def sh(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=HANG_GUARD,
    )


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)

"""Start and stop an ``mdevd serve`` subprocess for the sysfs benchmarks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The pool test parent: big enough for 1,000+ devices (mtty has 24 ports).
POOL_PARENT = "mdev_testdriver:BigPool@devices/virtual/pool/pool"
POOL_TYPE_DIR = "devices/virtual/pool/pool/mdev_supported_types/pool-1"


POOL_ARGS = ("--no-builtins", "--parent", POOL_PARENT)


class Daemon:
    """``mdevd serve ARGS`` with its mirror at <base>/sys, sockets in ``run_dir``.

    ``run_dir`` defaults to <base>/run.  Construction returns once the
    daemon printed "mdevd: ready"; call :meth:`wait_ready` yourself with
    ``wait=False`` (to start several at once).
    """

    def __init__(
        self,
        base: Path,
        args: tuple[str, ...] = POOL_ARGS,
        *,
        run_dir: Path | None = None,
        wait: bool = True,
    ) -> None:
        self.sysfs = base / "sys"
        self.run_dir = run_dir or base / "run"
        path = os.pathsep.join([str(REPO), str(REPO / "tests" / "core")])
        env = dict(os.environ, PYTHONPATH=path)
        cmd = [
            sys.executable,
            "-c",
            "import sys; from mdevcore.daemon.cli import main; sys.exit(main())",
        ]
        cmd += ["serve", *args, "--sysfs", str(self.sysfs), "--run-dir", str(self.run_dir)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        out = b""
        while b"mdevd: ready\n" not in out:
            select.select([self.proc.stdout.fileno()], [], [], 60)
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise SystemExit("mdevd failed to start")
            out += chunk

    def cpu_seconds(self) -> float:
        """User plus system CPU the daemon has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

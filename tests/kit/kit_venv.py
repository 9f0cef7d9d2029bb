"""A fresh venv with mdevcore installed from its wheel (tests/kit's conftest makes one)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
PIP = ("-m", "pip", "install", "-q", "--disable-pip-version-check")


# Without the checkout on the path: what the venv runs must come from its install.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(*argv: str | Path, timeout: float = 600) -> str:
    r = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=CLEAN_ENV,
        cwd="/",
    )
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r.stdout


class WheelVenv:
    def __init__(self, env_dir: Path, wheel: Path) -> None:
        self.dir = env_dir
        self.wheel = wheel
        self.python = env_dir / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.dir / "bin" / name

    def pip_install(self, *what: str | Path) -> None:
        run(self.python, *PIP, *what)

    def site_packages(self) -> Path:
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        return Path(run(self.python, "-c", code).strip())


def build_dist(out: Path, ignore: Sequence[str] = (".git", ".venv", "build", "*.egg-info")) -> Path:
    """``python -m build`` of a copy of the checkout: the sdist, then the wheel built
    from that sdist (so the sdist is complete).  Returns the dist directory."""
    source = out / "src"  # a build in place would leave build/ in the checkout
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(*ignore, "dist"))
    run(sys.executable, "-m", "build", "--outdir", out / "dist", source)
    return out / "dist"


def wait_ready(proc: subprocess.Popen[bytes]) -> None:
    """Until the mdevd ``proc`` prints "mdevd: ready" (killed and failed if it ends first)."""
    assert proc.stdout is not None
    out = b""
    while b"mdevd: ready\n" not in out:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            proc.kill()
            raise AssertionError(f"mdevd did not start: {out.decode()}")
        out += chunk

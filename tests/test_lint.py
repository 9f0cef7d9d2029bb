"""ruff and mypy are part of the test command: the tree stays clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CODE = ["mdevcore", "benchmarks"]  # mdevcore/ holds parents, samples, tools (symlinks)


def run(*argv: str, env_path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None if env_path is None else dict(os.environ, MYPYPATH=env_path)
    return subprocess.run(
        list(argv), cwd=ROOT, capture_output=True, text=True, check=False, timeout=600, env=env
    )


def test_ruff() -> None:
    for argv in ([str(BIN / "ruff"), "check", "."], [str(BIN / "ruff"), "format", "--check", "."]):
        r = run(*argv)
        assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_code() -> None:
    r = run(str(BIN / "mypy"), *CODE, "tests/conftest.py")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_tests() -> None:
    # Each test folder imports its helpers by bare name (and has its own
    # conftest), so each is checked on its own with its folder on the path.
    failures = []
    for folder in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir()):
        if not any(folder.glob("*.py")):
            continue
        rel = folder.relative_to(ROOT)
        r = run(str(BIN / "mypy"), str(rel), env_path=f"{rel}:tests/core:tests/daemon")
        if r.returncode:
            failures.append(r.stdout + r.stderr)
    assert not failures, "\n".join(failures)

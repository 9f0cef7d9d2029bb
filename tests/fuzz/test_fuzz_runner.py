"""The coverage-guided runner end to end: atheris runs a target and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mdevcore.tools.fuzz as fuzz

pytest.importorskip("atheris")


def test_runner_reports_executions_coverage_and_no_findings(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "mdevcore.tools.fuzz", "sysfs", "--runs", "200", "--seed", "1"]
    out = subprocess.run(
        [*argv, "--work", str(tmp_path)],
        cwd=fuzz.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    summary = re.search(r"sysfs: (\d+) executions .* coverage (\d+) edges", out.stdout)
    assert summary, out.stdout + out.stderr
    # libFuzzer counts the corpus replay too, so at least the runs asked for.
    assert int(summary[1]) >= 200
    assert int(summary[2]) > 100  # instrumented branches of mdevcore were seen
    assert "0 findings" in out.stdout and out.returncode == 0, out.stdout
    assert (tmp_path / "libfuzzer.log").read_text().count("INITED") == 1

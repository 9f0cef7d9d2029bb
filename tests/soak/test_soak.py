"""The reliability soak's short form: workloads verified while a device is fuzzed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from reliability_soak import soak  # noqa: E402


def test_short_soak_mtty_fuzz_and_killed_clients(tmp_path: Path) -> None:
    report = soak(8.0, seed=1234, base=tmp_path, nvme=False)
    assert report.ok, report.mismatches + report.failures
    assert report.fuzz_messages > 500 and report.kills > 10 and report.churn_checks > 5
    assert all(report.workload_stats[f"mtty{i}"]["verified_bytes"] > 0 for i in (0, 1))
    assert report.fds[1] <= report.fds[0]


@pytest.mark.xfail(
    reason="open bug found by this soak (2026-12-01): under heavy load the NVMe workload on a "
    "pds VF sees completions for commands not in flight and blocks of other LBAs "
    "(a command executed twice or a phantom CQ entry); not yet found whether device or "
    "host driver - see the issue note",
    strict=False,
)
def test_short_soak_with_the_nvme_workload(tmp_path: Path) -> None:
    report = soak(8.0, seed=1234, base=tmp_path)
    assert report.ok, report.mismatches + report.failures
    assert report.workload_stats["nvme"]["verified_bytes"] > 0

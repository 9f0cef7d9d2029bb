"""The reliability soak's short form: workloads verified while a device is fuzzed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from reliability_soak import soak  # noqa: E402


def test_short_soak(tmp_path: Path) -> None:
    """NVMe and mtty workloads verified while another device is fuzzed and clients are killed.

    The NVMe half once failed under load (issue 12): the host driver's
    mapped doorbell stores were split, so the controller read a 0 in between
    (tests/nvme/test_nvme_doorbell_store.py holds that regression).
    """
    report = soak(8.0, seed=1234, base=tmp_path)
    assert report.ok, report.mismatches + report.failures
    assert report.fuzz_messages > 500 and report.kills > 10 and report.churn_checks > 5
    assert all(report.workload_stats[f"mtty{i}"]["verified_bytes"] > 0 for i in (0, 1))
    assert report.workload_stats["nvme"]["verified_bytes"] > 0
    assert report.workload_stats["nvme"]["mismatches"] == 0
    assert report.fds[1] <= report.fds[0]

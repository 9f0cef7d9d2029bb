"""Warnings a guest can trigger in a loop: the first few logged, then summaries; all counted."""

from __future__ import annotations

import logging
import struct

import pytest
from nvme_host import FakeClock, Host

from mdevcore.nvme import NvmeController
from mdevcore.ratelimit import RateLimitedLog

MISSING_SQ_DOORBELL = 0x1000 + 8 * 7  # SQ 7 tail: no such queue
FLOOD = 1000


def test_doorbell_floods_are_throttled(
    host: Host, ctrl: NvmeController, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    burst = RateLimitedLog(logging.getLogger()).burst
    with caplog.at_level(logging.DEBUG, logger="mdevcore.nvme"):
        for _ in range(FLOOD):
            ctrl.mmio_write(MISSING_SQ_DOORBELL, struct.pack("<I", 1))
            ctrl.mmio_write(0x1000, struct.pack("<H", 1))  # a doorbell of the wrong width
        assert len(caplog.records) <= 2 * burst
        caplog.clear()
        clock.now += 60  # a later window: one summary per kind, then a fresh burst
        ctrl.mmio_write(MISSING_SQ_DOORBELL, struct.pack("<I", 1))
        summaries = [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]
        assert len(summaries) == 1 and f"{FLOOD - burst} more suppressed" in summaries[0]
    counts = ctrl.limited_log.total(ctrl.name)
    assert counts["doorbell for missing queue"] == FLOOD + 1
    assert counts["bad doorbell write"] == FLOOD

"""RateLimitedLog: the first records of a kind, then one summary per interval."""

from __future__ import annotations

import logging

import pytest

from mdevcore.ratelimit import RateLimitedLog


def test_bursts_then_summaries(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), burst=3, interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for i in range(1000):
            limited.log(logging.INFO, "dev a", "EINVAL", "bad request %d", i)
        limited.log(logging.INFO, "dev b", "EINVAL", "other device")
        assert [r.getMessage() for r in caplog.records] == [
            "bad request 0",
            "bad request 1",
            "bad request 2",
            "other device",
        ]
        caplog.clear()
        now[0] = 9.0
        limited.log(logging.INFO, "dev a", "EINVAL", "the flood goes on")
        now[0] = 11.0
        limited.log(logging.INFO, "dev a", "EINVAL", "and on")
        # A flood that goes on gets a summary per interval, not a new burst.
        assert [r.getMessage() for r in caplog.records] == [
            "dev a: EINVAL: 998 more suppressed in the last 11 s",
        ]
        caplog.clear()
        now[0] = 30.0  # quiet for more than an interval: the kind starts afresh
        limited.log(logging.INFO, "dev a", "EINVAL", "bad request again")
        assert [r.getMessage() for r in caplog.records] == [
            "dev a: EINVAL: 1 more suppressed in the last 19 s",
            "bad request again",
        ]
    assert limited.total("dev a") == {"EINVAL": 1003}
    assert limited.total("dev b") == {"EINVAL": 1}


def test_invented_kinds_cannot_grow_memory() -> None:
    limited = RateLimitedLog(logging.getLogger("t"), max_kinds=8)
    for i in range(100):
        limited.log(logging.DEBUG, "dev", f"kind {i}", "x")
    assert len(limited._kinds) <= 8
    assert sum(limited.total("dev").values()) == 100


def test_flush_summarises_a_kind_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client reconnecting in a loop gets no summary line per connection.

    The soak's fuzzed device (about 13 connections a second) wrote one
    summary per kind at every client's leaving: megabytes per ten minutes.
    """
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), burst=1, interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for connection in range(100):  # 100 connections in 5 s, 5 failures each
            now[0] = connection * 0.05
            for _ in range(5):
                limited.log(logging.INFO, "dev", "EINVAL", "bad")
            limited.flush("dev")
        summaries = [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]
        assert summaries == ["dev: EINVAL: 4 more suppressed in the last 0 s"]
        caplog.clear()
        now[0] = 10.5  # an interval after the last summary: the rest is told
        limited.flush("dev")
        assert [r.getMessage() for r in caplog.records] == [
            "dev: EINVAL: 495 more suppressed in the last 10 s"
        ]
    assert limited.total("dev") == {"EINVAL": 500}

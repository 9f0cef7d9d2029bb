"""Logging a guest cannot flood: the first few of each kind, then summaries.

A hostile client can make a device fail a million requests a second.  Each
failure is still counted (operators read the counts), but only the first
``burst`` occurrences of each (source, kind) pair are logged; after that
one summary line per ``interval`` says how many were suppressed, for as
long as the flood goes on; a kind quiet for an interval starts afresh.  Sources
are e.g. "device X, client 3"; kinds are e.g. "EINVAL REGION_READ".
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Mapping

# What a record of (source, kind) carries for structured logs (``extra=``).
Fields = Callable[[Hashable, str], Mapping[str, object]]


@dataclasses.dataclass(slots=True)
class _Kind:
    logged: int = 0
    suppressed: int = 0
    window_start: float = 0.0
    summarised_at: float | None = None  # when flush() last summarised this kind
    flooded: bool = False  # something was suppressed in this window (flush() or not)
    last_seen: float = 0.0


class RateLimitedLog:
    """Throttles records per (source, kind); thread-safe enough for counters."""

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter,  # type: ignore[type-arg]
        *,
        burst: int = 10,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 4096,
        fields: Fields | None = None,
    ) -> None:
        self.logger = logger
        self.fields = fields  # e.g. device and event, for mdevd's JSON log
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.max_kinds = max_kinds  # bounds memory whatever kinds a client invents
        self.counts: collections.Counter[tuple[Hashable, str]] = collections.Counter()
        self._kinds: dict[tuple[Hashable, str], _Kind] = {}

    def log(
        self,
        level: int,
        source: Hashable,
        kind: str,
        msg: str,
        *args: object,
        exc_info: BaseException | bool | None = None,
    ) -> None:
        """Count one occurrence and log it unless its (source, kind) is throttled.

        ``exc_info`` is passed on to the logger with the records that are logged
        (a traceback per occurrence is what floods fastest).
        """
        key = (source, kind)
        self.counts[key] += 1
        state = self._kinds.get(key)
        if state is None:
            if len(self._kinds) >= self.max_kinds:
                self._kinds.clear()  # forget throttling state, keep the counts
            state = self._kinds[key] = _Kind(window_start=self.clock())
        now = self.clock()
        if now - state.window_start >= self.interval:
            if state.suppressed:
                self.logger.log(
                    level,
                    "%s: %s: %d more suppressed in the last %.0f s",
                    source,
                    kind,
                    state.suppressed,
                    now - state.window_start,
                    extra=self._extra(source, kind),
                )
            # A flood that goes on stays summarised: a fresh burst every
            # interval would let one guest write burst lines per kind per
            # interval forever.  A kind with nothing suppressed in the last
            # window, or quiet for an interval since, gets its burst back.
            still = state.flooded and now - state.last_seen < self.interval
            state.logged = self.burst if still else 0
            state.suppressed, state.flooded, state.window_start = 0, False, now
        state.last_seen = now
        if state.logged < self.burst:
            state.logged += 1
            self.logger.log(level, msg, *args, exc_info=exc_info, extra=self._extra(source, kind))
        else:
            state.suppressed += 1
            state.flooded = True

    def flush(self, source: Hashable, level: int = logging.INFO) -> None:
        """Log what is suppressed for ``source`` now (e.g. when its client leaves).

        Without it, the last window of a flood that stopped would never be
        summarised.  Throttling goes on as before: only the suppressed count
        restarts, so nothing is summarised twice.  A kind is summarised here
        at most once per ``interval``: a client that reconnects in a loop
        would otherwise buy a summary line per kind with every connection.
        """
        now = self.clock()
        for (src, kind), state in self._kinds.items():
            if src != source or not state.suppressed:
                continue
            if state.summarised_at is not None and now - state.summarised_at < self.interval:
                continue
            state.summarised_at = now
            self.logger.log(
                level,
                "%s: %s: %d more suppressed in the last %.0f s",
                source,
                kind,
                state.suppressed,
                now - state.window_start,
                extra=self._extra(src, kind),
            )
            state.suppressed = 0

    def _extra(self, source: Hashable, kind: str) -> Mapping[str, object] | None:
        return None if self.fields is None else self.fields(source, kind)

    def total(self, source: Hashable) -> dict[str, int]:
        """Every kind counted for ``source`` (for sysfs attributes and status)."""
        return {kind: n for (src, kind), n in self.counts.items() if src == source}

"""When to raise which interrupt vector: coalescing and INTMS/INTMC masking.

Interrupt Coalescing (feature 08h) gives an aggregation threshold (THR,
0-based entry count) and an aggregation time (TIME, in 100 us).  It applies
to I/O completion queues only, per vector, unless the vector has Coalescing
Disable set (feature 09h).  A vector fires once it has THR+1 pending
completions or its oldest pending completion is TIME old; TIME 0 means "do
not delay".  The clock is injected so the timing rules are testable without
sleeping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mdevcore.nvme.checks import U16, U32, dict_of, int_in, list_of


@dataclasses.dataclass(slots=True)
class _Pending:
    count: int
    since: float


class InterruptLogic:
    def __init__(self, raise_irq: Callable[[int], None], clock: Callable[[], float]) -> None:
        self._raise = raise_irq
        self._clock = clock
        self.threshold = 0  # THR, 0-based
        self.time_100us = 0  # TIME
        self.coalescing_disabled: set[int] = set()
        self.mask = 0  # INTMS/INTMC state (pin-based and MSI only)
        self._masked_pending = 0
        self._pending: dict[int, _Pending] = {}

    def reset(self) -> None:
        self.threshold = 0
        self.time_100us = 0
        self.coalescing_disabled.clear()
        self.mask = 0
        self._masked_pending = 0
        self._pending.clear()

    # --- migration ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "mask": self.mask,
            "threshold": self.threshold,
            "time": self.time_100us,
            "no_coalescing": sorted(self.coalescing_disabled),
        }

    @staticmethod
    def check_snapshot(data: Any) -> tuple[int, int, int, set[int]]:
        irq = dict_of(data, "irq")
        return (
            int_in(irq["mask"], 0, U32, "INTMS"),
            int_in(irq["threshold"], 0, 255, "THR"),
            int_in(irq["time"], 0, 255, "TIME"),
            {int_in(v, 0, U16, "vector") for v in list_of(irq["no_coalescing"], None, "iv")},
        )

    def load(self, checked: tuple[int, int, int, set[int]]) -> None:
        self.mask, self.threshold, self.time_100us, self.coalescing_disabled = checked

    # --- completions ------------------------------------------------------

    def completions_posted(self, vector: int, count: int, *, coalescible: bool) -> None:
        """``count`` entries landed in a CQ using ``vector`` (admin CQ: not coalescible)."""
        if not coalescible or not self.time_100us or vector in self.coalescing_disabled:
            self._fire(vector)  # TIME 0: no delay, whatever the threshold
            return
        pending = self._pending.get(vector)
        if pending is None:
            pending = self._pending[vector] = _Pending(0, self._clock())
        pending.count += count
        if pending.count > self.threshold or self.time_100us == 0:
            self._fire(vector)

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.since for p in self._pending.values()) + self.time_100us * 100e-6

    def tick(self) -> None:
        """Fire every vector whose aggregation time has run out."""
        if not self._pending:
            return
        limit = self._clock() - self.time_100us * 100e-6
        for vector in [v for v, p in self._pending.items() if p.since <= limit]:
            self._fire(vector)

    def _fire(self, vector: int) -> None:
        self._pending.pop(vector, None)
        if vector < 32 and self.mask >> vector & 1:
            self._masked_pending |= 1 << vector
            return
        self._raise(vector)

    # --- INTMS / INTMC ----------------------------------------------------

    def set_mask(self, bits: int) -> None:
        self.mask |= bits

    def clear_mask(self, bits: int) -> None:
        self.mask &= ~bits
        release = self._masked_pending & bits
        self._masked_pending &= ~bits
        for vector in range(32):
            if release >> vector & 1:
                self._raise(vector)

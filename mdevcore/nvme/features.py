"""Settable feature values that live in the controller (not in other helpers)."""

from __future__ import annotations

from typing import Any

from mdevcore.nvme.checks import U32, int_in, list_of

_Values = tuple[int, int, int, bool, int]

# Arbitration Burst 2**3 = 8 commands per queue turn (AB field, log2).
DEFAULT_ARBITRATION = 3


class Features:
    """Current values of the settable features (reset on controller reset)."""

    def __init__(self, max_io_queues: int) -> None:
        self.max_io_queues = max_io_queues
        self.reset()

    def reset(self) -> None:
        self.arbitration = DEFAULT_ARBITRATION
        self.sq_allocated = self.max_io_queues  # Number of Queues, 1-based here
        self.cq_allocated = self.max_io_queues
        self.queues_set_locked = False  # set once an I/O queue was created
        self.keep_alive_ms = 0

    def snapshot(self) -> list[Any]:
        return [
            self.arbitration,
            self.sq_allocated,
            self.cq_allocated,
            self.queues_set_locked,
            self.keep_alive_ms,
        ]

    def check_snapshot(self, data: Any) -> _Values:
        arbitration, sq_alloc, cq_alloc, locked, kato = list_of(data, 5, "features")
        return (
            int_in(arbitration, 0, U32, "arbitration"),
            int_in(sq_alloc, 1, self.max_io_queues, "SQs allocated"),
            int_in(cq_alloc, 1, self.max_io_queues, "CQs allocated"),
            bool(locked),
            int_in(kato, 0, U32, "KATO"),
        )

    def load(self, values: _Values) -> None:
        (self.arbitration, self.sq_allocated, self.cq_allocated, self.queues_set_locked,
         self.keep_alive_ms) = values  # fmt: skip

"""Settable feature values that live in the controller (not in other helpers)."""

from __future__ import annotations

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

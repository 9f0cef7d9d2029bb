"""Catch a device's interrupts on eventfds, as a VMM's irqfds would."""

from __future__ import annotations

import os
import select
import time

from mdevcore.vfio_user.backend import IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD
from mdevcore.vfio_user.client import Client


class Interrupts:
    """``count`` eventfds wired to IRQ ``index`` (0 INTx, 1 MSI, 2 MSI-X) of a device."""

    def __init__(self, client: Client, index: int, count: int = 1) -> None:
        self.client = client
        self.index = index
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
            client.set_irqs(index, flags, 0, count, fds=self.fds)
        except BaseException:
            self.close()
            raise

    def take(self, vector: int = 0) -> int:
        """How many times ``vector`` fired since the last take (0: none)."""
        try:
            return os.eventfd_read(self.fds[vector])
        except BlockingIOError:
            return 0

    def wait(self, vector: int = 0, timeout: float = 5.0) -> int:
        """Block until ``vector`` fires (serving the server's DMA meanwhile); its count.

        Raises TimeoutError when it does not fire in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            fired = self.take(vector)
            if fired:
                return fired
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"IRQ {self.index} vector {vector} did not fire")
            # The device may need the client to answer a DMA request first.
            self.client.poll(0)
            select.select([self.fds[vector]], [], [], min(left, 0.05))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Interrupts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

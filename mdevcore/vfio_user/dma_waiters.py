"""Server-originated DMA requests waiting for the client's replies, by msg_id.

Both I/O modes (trio_client, threaded) send DMA_READ/DMA_WRITE to the
client and park the device's task until the engine sees the matching
reply; this table is that rendezvous.  It is touched from the trio thread
only (the threaded mode hands replies over with run_sync_soon).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from mdevcore.vfio_user.engine import DmaResult


class DmaWaiters:
    def __init__(self) -> None:
        self._waiting: dict[int, tuple[trio.Event, list[DmaResult]]] = {}

    async def wait(self, msg_id: int, send: Callable[[], Awaitable[None]]) -> DmaResult:
        """Send the request ``msg_id`` (``send``), then wait for its reply.

        Raises OSError with the client's errno when the reply is an error.
        """
        event = trio.Event()
        slot: list[DmaResult] = []
        self._waiting[msg_id] = (event, slot)
        try:
            await send()
            await event.wait()
        finally:
            self._waiting.pop(msg_id, None)
        result = slot[0]
        if result.error:
            raise OSError(result.error, f"DMA request failed: {os.strerror(result.error)}")
        return result

    def complete(self, results: Sequence[DmaResult]) -> None:
        """Wake the requests these replies answer (replies nobody waits for are dropped)."""
        for result in results:
            waiter = self._waiting.get(result.msg_id)
            if waiter is not None:
                waiter[1].append(result)
                waiter[0].set()

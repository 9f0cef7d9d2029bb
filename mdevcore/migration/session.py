"""One VMM side (a device connection and its guest memory) and local migration."""

from __future__ import annotations

import os
from collections.abc import Callable

from mdevcore.migration.device import MigrationDevice
from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.migration.links import LocalLink
from mdevcore.migration.receiver import Receiver
from mdevcore.migration.sender import Options, Progress, Report, Sender
from mdevcore.migration.workload import Workload, create
from mdevcore.vfio_user.client import Client

DEFAULT_MEMORY = 64 << 20


class Endpoint:
    """A connected, negotiated device with ``memory`` bytes of guest RAM mapped."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        memory: int = DEFAULT_MEMORY,
        *,
        name: str = "device",
        fdless: int = 0,
        timeout: float = 30.0,
    ) -> None:
        """``fdless``: that many bytes at the top of RAM are mapped without an fd
        (the device reaches them by DMA_READ/DMA_WRITE messages)."""
        self.client = Client(socket_path, timeout=timeout)
        try:
            self.client.negotiate()
            self.dev = MigrationDevice(self.client, name=name)
            self.mem = GuestMemory(memory, fdless=fdless, name=name)
        except BaseException:
            self.client.close()
            raise
        try:
            self.mem.map_into(self.client)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Disconnect (the server drops our mappings and eventfds) and free the RAM."""
        self.client.close()
        self.mem.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrate_local(
    src: Endpoint,
    dst: Endpoint,
    workload: Workload | None,
    *,
    options: Options | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[Report, Receiver]:
    """Migrate ``src`` to ``dst`` in this process (the stream goes in memory)."""
    receiver = Receiver(dst.dev, dst.mem)
    sender = Sender(
        src.dev, src.mem, LocalLink(receiver), workload=workload, options=options, progress=progress
    )
    return sender.migrate(), receiver


def continue_on(receiver: Receiver, dst: Endpoint) -> Workload | None:
    """Rebuild the migrated workload by name on the destination (None if there was none)."""
    if receiver.workload is None:
        return None
    name, data = receiver.workload
    wl = create(name)
    wl.restore(data, dst.client, dst.mem)
    return wl

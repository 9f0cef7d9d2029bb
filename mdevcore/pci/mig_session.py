"""One device's side of VFIO migration v2: its state, arcs and data stream.

The FSM table lives in ``migration``; this module walks it for a device,
calls the device's hooks on each arc (quiesce, save, load), and owns the
bytes behind MIG_DATA_READ / MIG_DATA_WRITE.  A hook that raises OSError
refuses the arc (the device stays where it was); anything else puts the
device in ERROR, which only a reset leaves.
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

from mdevcore.pci.migration import (
    MIGRATION_FLAGS_ALL,
    MIGRATION_STOP_COPY,
    SAVING_STATES,
    MigrationStream,
    MigState,
    next_state,
)

MAX_MIGRATION_BYTES = 256 << 20  # the most a destination accepts in RESUMING


class MigrationHooks(Protocol):
    """What the session needs from the device (PciDevice's migration hooks)."""

    def on_migration_state(self, old: MigState, new: MigState) -> None: ...

    def save_precopy(self) -> bytes: ...

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes) -> None: ...

    def migration_data_size(self) -> int: ...


def check_migration_flags(flags: int) -> None:
    if flags & ~MIGRATION_FLAGS_ALL or not flags & MIGRATION_STOP_COPY:
        raise ValueError(f"migration_flags {flags:#x}: STOP_COPY is mandatory")


class MigrationSession:
    """Migration state of one device offering ``flags`` (VFIO_MIGRATION_*)."""

    def __init__(
        self,
        flags: int,
        hooks: MigrationHooks,
        log: logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> None:
        check_migration_flags(flags)
        self.flags = flags
        self._hooks = hooks
        self._log = log
        self.state = MigState.RUNNING
        self.stream = MigrationStream(MAX_MIGRATION_BYTES)

    def reset(self) -> None:
        self.state = MigState.RUNNING
        self.stream.clear()

    def set_state(self, wanted: int) -> None:
        """Walk the FSM to ``wanted`` one arc at a time (MIG_DEVICE_STATE SET)."""
        try:
            target = MigState(wanted)
        except ValueError:
            raise OSError(errno.EINVAL, f"no migration state {wanted}") from None
        while self.state != target:
            step = next_state(self.flags, self.state, target)
            self._take_arc(self.state, step)

    def _take_arc(self, old: MigState, new: MigState) -> None:
        hooks, stream = self._hooks, self.stream
        try:
            if old == MigState.RESUMING and new == MigState.STOP:
                hooks.load_state(stream.received())
            hooks.on_migration_state(old, new)
            if new in SAVING_STATES and old not in SAVING_STATES:
                stream.start_saving()
                if new != MigState.STOP_COPY:
                    stream.append(hooks.save_precopy())
            if new == MigState.STOP_COPY:
                stream.append(hooks.save_state())
            if old in SAVING_STATES and new not in SAVING_STATES:
                stream.clear()
            if new == MigState.RESUMING:
                stream.start_resuming()
            if old == MigState.RESUMING:
                stream.clear()
        except OSError as exc:
            self._log.warning("migration arc %s -> %s failed: %s", old.name, new.name, exc)
            raise
        except Exception as exc:
            self._log.exception(
                "migration arc %s -> %s crashed; device in ERROR", old.name, new.name
            )
            self.state = MigState.ERROR
            stream.clear()
            raise OSError(errno.EIO, f"migration arc {old.name} -> {new.name} failed") from exc
        self._log.debug("migration %s -> %s", old.name, new.name)
        self.state = new

    def data_size(self) -> int:
        """MIG_DATA_SIZE: what is left to read in STOP_COPY, else the estimate."""
        if self.state == MigState.STOP_COPY:
            return self.stream.pending_bytes()
        return self._hooks.migration_data_size()

    def data_read(self, size: int) -> bytes:
        if self.state not in SAVING_STATES:
            raise OSError(errno.EINVAL, f"no migration data to read in {self.state.name}")
        if size < 0:
            raise OSError(errno.EINVAL, "negative read size")
        return self.stream.read(size)

    def data_write(self, data: bytes) -> None:
        if self.state != MigState.RESUMING:
            raise OSError(errno.EINVAL, f"migration data written in {self.state.name}")
        self.stream.write(data)

"""VFIO migration v2: the device-state FSM and the data stream.

States and arcs are those of the Linux uAPI (include/uapi/linux/vfio.h).
A request for a non-adjacent state is walked one arc at a time along the
path the kernel's vfio_mig_get_next_state() defines: a table of first hops
over the full state graph, where hops into states the device does not
support (per its migration flags) are skipped.  ERROR is never requested;
only a device reset leaves it.

:class:`MigrationStream` is the saving/resuming buffer behind MIG_DATA_READ
and MIG_DATA_WRITE (vfio-user's replacement for the kernel's data_fd).
"""

from __future__ import annotations

import enum
import errno

MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
MIGRATION_FLAGS_ALL = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY


class MigState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


S = MigState

# Flags a state needs from the device to exist at all.
_STATE_NEEDS = {
    S.ERROR: 0,
    S.STOP: MIGRATION_STOP_COPY,
    S.RUNNING: MIGRATION_STOP_COPY,
    S.STOP_COPY: MIGRATION_STOP_COPY,
    S.RESUMING: MIGRATION_STOP_COPY,
    S.RUNNING_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P,
    S.PRE_COPY: MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
    S.PRE_COPY_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY,
}

# First hop from (row) toward (column) on the full graph.  Read a row as
# "from X, to reach Y go to Z first".  Saving states (STOP_COPY, PRE_COPY,
# PRE_COPY_P2P) are only ever path ends, and STOP_COPY -> PRE_COPY* is
# refused (ERROR), as the uAPI specifies.  One letter per state:
_LETTER = {
    "S": S.STOP,
    "R": S.RUNNING,
    "C": S.STOP_COPY,
    "M": S.RESUMING,
    "P": S.RUNNING_P2P,
    "E": S.PRE_COPY,
    "F": S.PRE_COPY_P2P,
    "X": S.ERROR,
}
_COLUMNS = tuple(_LETTER[c] for c in "SRCMPEF")
_FIRST_HOP_ROWS = {
    #            to: SRCMPEF
    S.STOP:         "SPCMPPP",
    S.RUNNING:      "PRPPPEP",
    S.STOP_COPY:    "SSCSSXX",
    S.RESUMING:     "SSSMSSS",
    S.RUNNING_P2P:  "SRSSPRF",
    S.PRE_COPY:     "RRFRREF",
    S.PRE_COPY_P2P: "PPCPPEF",
}  # fmt: skip
_FIRST_HOP = {row: tuple(_LETTER[c] for c in hops) for row, hops in _FIRST_HOP_ROWS.items()}

SAVING_STATES = frozenset({S.STOP_COPY, S.PRE_COPY, S.PRE_COPY_P2P})


def supported(state: MigState, flags: int) -> bool:
    needs = _STATE_NEEDS[state]
    return needs != 0 and flags & needs == needs


def next_state(flags: int, cur: MigState, new: MigState) -> MigState:
    """The next arc's end on the way from ``cur`` to ``new``.

    Raises OSError(EINVAL) for unsupported states, ERROR as a target, from
    ERROR, and for refused arcs (STOP_COPY -> PRE_COPY*).
    """
    if not supported(new, flags):
        raise OSError(errno.EINVAL, f"migration state {new.name} not supported")
    if cur == S.ERROR:
        raise OSError(errno.EINVAL, "device is in ERROR; reset it first")
    if not supported(cur, flags):
        raise OSError(errno.EINVAL, f"current state {cur.name} not supported")
    column = _COLUMNS.index(new)
    hop = _FIRST_HOP[cur][column]
    while hop != S.ERROR and not supported(hop, flags):
        hop = _FIRST_HOP[hop][column]
    if hop == S.ERROR:
        raise OSError(errno.EINVAL, f"no arc from {cur.name} to {new.name}")
    return hop


def path(flags: int, cur: MigState, new: MigState) -> list[MigState]:
    """Every arc end from ``cur`` to ``new`` (empty when already there)."""
    steps: list[MigState] = []
    while cur != new:
        cur = next_state(flags, cur, new)
        steps.append(cur)
        if len(steps) > len(MigState):
            raise AssertionError("migration path does not converge")
    return steps


def arcs(flags: int) -> set[tuple[MigState, MigState]]:
    """The single-step arcs a device with ``flags`` implements."""
    found: set[tuple[MigState, MigState]] = set()
    for cur in MigState:
        for new in MigState:
            if cur == new or not (supported(cur, flags) and supported(new, flags)):
                continue
            try:
                if next_state(flags, cur, new) == new:
                    found.add((cur, new))
            except OSError:
                pass
    return found


class MigrationStream:
    """Bytes flowing out (saving) or in (resuming) of one migration session."""

    def __init__(self, max_resume_bytes: int) -> None:
        self.max_resume_bytes = max_resume_bytes
        self._out = bytearray()
        self._out_pos = 0
        self._in = bytearray()

    def start_saving(self) -> None:
        self._out = bytearray()
        self._out_pos = 0

    def append(self, data: bytes) -> None:
        self._out += data

    def read(self, size: int) -> bytes:
        chunk = bytes(self._out[self._out_pos : self._out_pos + size])
        self._out_pos += len(chunk)
        return chunk

    def pending_bytes(self) -> int:
        return len(self._out) - self._out_pos

    def start_resuming(self) -> None:
        self._in = bytearray()

    def write(self, data: bytes) -> None:
        if len(self._in) + len(data) > self.max_resume_bytes:
            raise OSError(errno.EFBIG, f"migration data beyond {self.max_resume_bytes} bytes")
        self._in += data

    def received(self) -> bytes:
        return bytes(self._in)

    def clear(self) -> None:
        self._out = bytearray()
        self._out_pos = 0
        self._in = bytearray()

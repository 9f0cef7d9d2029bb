"""The VFIO migration v2 state graph as a client sees it, and paths through it.

Written from the uAPI (include/uapi/linux/vfio.h), not from our server:
the arcs a device must implement depend on the flags it reports, and a
client asks for one arc at a time so that it never relies on the device
walking combination transitions for it.

The arcs are the uAPI's lists per flag combination: STOP <-> STOP_COPY
and STOP <-> RESUMING always; RUNNING <-> STOP without P2P, or the four
RUNNING_P2P arcs with it; with PRE_COPY, RUNNING <-> PRE_COPY and either
PRE_COPY -> STOP_COPY (no P2P) or the five PRE_COPY_P2P arcs (15 arcs in
all for STOP_COPY | P2P | PRE_COPY).

Paths never pass through RESUMING, ERROR or STOP_COPY, and pass through a
PRE_COPY state only when they start in one (leaving it then ends or
continues the same saving session); among the shortest such paths, those
through fewer saving states win.
"""

from __future__ import annotations

import heapq

# The uAPI's flag bits and enum vfio_device_mig_state (one definition, in
# mdevcore.pci.migration); the arcs below are the client's own reading.
from mdevcore.pci.migration import (
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
)
from mdevcore.pci.migration import MigState as State

S = State
SAVING = frozenset({S.STOP_COPY, S.PRE_COPY, S.PRE_COPY_P2P})

_MANDATORY = (
    (S.STOP, S.STOP_COPY),
    (S.STOP_COPY, S.STOP),
    (S.STOP, S.RESUMING),
    (S.RESUMING, S.STOP),
)
_NO_P2P = ((S.RUNNING, S.STOP), (S.STOP, S.RUNNING))
_P2P = (
    (S.RUNNING, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.RUNNING),
    (S.RUNNING_P2P, S.STOP),
    (S.STOP, S.RUNNING_P2P),
)
_PRE_COPY = ((S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING))
_PRE_COPY_NO_P2P = ((S.PRE_COPY, S.STOP_COPY),)
_PRE_COPY_P2P = (
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.STOP_COPY),
)


def offered(state: State, flags: int) -> bool:
    """Whether a device reporting ``flags`` has ``state`` at all."""
    if state == S.ERROR or not flags & MIGRATION_STOP_COPY:
        return False
    if state in (S.RUNNING_P2P, S.PRE_COPY_P2P) and not flags & MIGRATION_P2P:
        return False
    return not (state in (S.PRE_COPY, S.PRE_COPY_P2P) and not flags & MIGRATION_PRE_COPY)


def device_arcs(flags: int) -> frozenset[tuple[State, State]]:
    """The single arcs a device with ``flags`` implements, as the uAPI lists them."""
    if not flags & MIGRATION_STOP_COPY:
        return frozenset()
    p2p, pre = bool(flags & MIGRATION_P2P), bool(flags & MIGRATION_PRE_COPY)
    arcs = list(_MANDATORY) + list(_P2P if p2p else _NO_P2P)
    if pre:
        arcs += _PRE_COPY + (_PRE_COPY_P2P if p2p else _PRE_COPY_NO_P2P)
    return frozenset(arcs)


def plan(flags: int, current: State, target: State) -> list[State]:
    """The states to request one by one to get from ``current`` to ``target``.

    Raises ValueError when there is no such path (ERROR at either end, a
    state the device lacks, STOP_COPY -> PRE_COPY*).
    """
    if current == target:
        return []
    if not offered(current, flags) or not offered(target, flags):
        raise ValueError(f"no path {current.name} -> {target.name} with flags {flags:#x}")
    arcs = device_arcs(flags)
    start_saving = current in (S.PRE_COPY, S.PRE_COPY_P2P)

    def may_cross(state: State) -> bool:
        if state in (S.RESUMING, S.STOP_COPY, S.ERROR):
            return False
        return state not in SAVING or start_saving

    # Dijkstra on (arcs, saving states crossed): tiny graph, exact answer.
    best: dict[State, tuple[int, int]] = {current: (0, 0)}
    heap: list[tuple[int, int, list[State]]] = [(0, 0, [current])]
    while heap:
        hops, saving, route = heapq.heappop(heap)
        here = route[-1]
        if here == target:
            return route[1:]
        if here != current and not may_cross(here):
            continue
        for a, b in sorted(arcs):
            if a != here:
                continue
            cost = (hops + 1, saving + (b in SAVING and b != target))
            if b not in best or cost < best[b]:
                best[b] = cost
                heapq.heappush(heap, (*cost, [*route, b]))
    raise ValueError(f"no path {current.name} -> {target.name} with flags {flags:#x}")

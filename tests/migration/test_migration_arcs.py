"""The migration v2 FSM from the client side: the planner, then every arc over a socket.

The planner is checked against the uAPI's arc lists; then each of mtty's 15
arcs is taken with one MIG_DEVICE_STATE SET on a real ``mdevd serve``, and
the requests the uAPI forbids are refused with EINVAL, state unchanged.
"""

from __future__ import annotations

import errno
import itertools
import struct
from collections.abc import Iterator

import pytest
from mig_served import MttyDaemon, connect, new_uuid, short_dir

from mdevcore.migration.arcs import SAVING, State, device_arcs, offered, plan
from mdevcore.migration.device import (
    FEATURE_DMA_LOGGING_REPORT,
    FEATURE_GET,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_SET,
    MigrationDevice,
    MigrationError,
)
from mdevcore.vfio_user.client import Client, VfioUserError

S = State
ALL = 7


@pytest.mark.parametrize(("flags", "count"), [(1, 6), (3, 8), (5, 9), (7, 15)])
def test_arc_counts_follow_the_uapi(flags: int, count: int) -> None:
    arcs = device_arcs(flags)
    assert len(arcs) == count
    assert all(offered(a, flags) and offered(b, flags) for a, b in arcs)
    assert (S.STOP_COPY, S.PRE_COPY) not in arcs and (S.STOP_COPY, S.PRE_COPY_P2P) not in arcs


@pytest.mark.parametrize("flags", [1, 3, 5, 7])
def test_plans_use_arcs_and_never_cross_resuming_or_stop_copy(flags: int) -> None:
    arcs = device_arcs(flags)
    states = [s for s in State if offered(s, flags)]
    for cur, target in itertools.product(states, states):
        route = plan(flags, cur, target)
        hops = list(zip([cur, *route], route, strict=False))
        assert all(h in arcs for h in hops), (cur, target, route)
        for mid in route[:-1]:
            assert mid not in (S.RESUMING, S.STOP_COPY)
            if cur not in (S.PRE_COPY, S.PRE_COPY_P2P):
                assert mid not in SAVING, (cur, target, route)


def test_plans_a_vmm_relies_on() -> None:
    assert plan(ALL, S.RUNNING, S.STOP_COPY) == [S.RUNNING_P2P, S.STOP, S.STOP_COPY]
    assert plan(ALL, S.PRE_COPY, S.STOP_COPY) == [S.PRE_COPY_P2P, S.STOP_COPY]
    assert plan(5, S.PRE_COPY, S.STOP_COPY) == [S.STOP_COPY]
    assert plan(1, S.RUNNING, S.STOP_COPY) == [S.STOP, S.STOP_COPY]
    assert plan(ALL, S.STOP_COPY, S.RUNNING) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    assert plan(3, S.RESUMING, S.RUNNING) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    with pytest.raises(ValueError):
        plan(ALL, S.ERROR, S.RUNNING)
    with pytest.raises(ValueError):
        plan(1, S.RUNNING, S.PRE_COPY)


# --- over the socket ----------------------------------------------------------


@pytest.fixture(scope="module")
def mtty() -> Iterator[tuple[Client, MigrationDevice]]:
    with short_dir() as base:
        daemon = MttyDaemon(base)
        try:
            client, dev = connect(daemon.create(new_uuid()))
            with client:
                yield client, dev
        finally:
            daemon.stop()


def _at(dev: MigrationDevice, state: State) -> None:
    dev.reset()
    assert dev.state() == S.RUNNING
    dev.walk(state, S.RUNNING)
    assert dev.state() == state


def test_mtty_offers_everything(mtty: tuple[Client, MigrationDevice]) -> None:
    assert mtty[1].flags == ALL


@pytest.mark.parametrize(("old", "new"), sorted(device_arcs(ALL)))
def test_every_arc_over_the_socket(
    mtty: tuple[Client, MigrationDevice], old: State, new: State
) -> None:
    _, dev = mtty
    state = _saved(dev) if old == S.RESUMING else b""
    _at(dev, old)
    dev.write(state)  # RESUMING -> STOP loads: it needs a real stream
    dev.set_state(new)
    assert dev.state() == new


def _saved(dev: MigrationDevice) -> bytes:
    """A whole mtty stream (pre-copy then stop-copy parts), from the device itself."""
    _at(dev, S.PRE_COPY)
    data = b"".join(dev.read_available())
    dev.walk(S.STOP_COPY, S.PRE_COPY)
    return data + b"".join(dev.read_to_end(1 << 20))


def test_resuming_refuses_an_empty_stream(mtty: tuple[Client, MigrationDevice]) -> None:
    _, dev = mtty
    _at(dev, S.RESUMING)
    with pytest.raises(MigrationError) as e:
        dev.set_state(S.STOP)
    assert e.value.errno == errno.EINVAL
    dev.reset()
    assert dev.state() == S.RUNNING


def _request(client: Client, value: int) -> int:
    try:
        client.device_feature(
            FEATURE_SET | FEATURE_MIG_DEVICE_STATE, value.to_bytes(4, "little") + b"\xff" * 4
        )
    except VfioUserError as e:
        return e.errno or 0
    return 0


@pytest.mark.parametrize("state", [s for s in State if s != S.ERROR])
def test_forbidden_requests_are_einval(mtty: tuple[Client, MigrationDevice], state: State) -> None:
    client, dev = mtty
    _at(dev, state)
    refused = [S.ERROR, 8, 0xFFFF, 0xFFFFFFFF]
    if state == S.STOP_COPY:
        refused += [S.PRE_COPY, S.PRE_COPY_P2P]  # the uAPI blocks these outright
    for value in refused:
        assert _request(client, int(value)) == errno.EINVAL, (state, value)
        assert dev.state() == state


@pytest.mark.parametrize("state", [S.RUNNING, S.STOP, S.RESUMING, S.RUNNING_P2P])
def test_mig_data_read_outside_saving_is_einval(
    mtty: tuple[Client, MigrationDevice], state: State
) -> None:
    _, dev = mtty
    _at(dev, state)
    with pytest.raises(MigrationError) as e:
        dev.read_chunk(64)
    assert e.value.errno == errno.EINVAL
    assert dev.state() == state


@pytest.mark.parametrize(
    "state", [S.RUNNING, S.STOP, S.STOP_COPY, S.PRE_COPY, S.PRE_COPY_P2P, S.RUNNING_P2P]
)
def test_mig_data_write_outside_resuming_is_einval(
    mtty: tuple[Client, MigrationDevice], state: State
) -> None:
    _, dev = mtty
    _at(dev, state)
    with pytest.raises(MigrationError) as e:
        dev.write(b"\0" * 16)
    assert e.value.errno == errno.EINVAL
    assert dev.state() == state


def test_saving_streams_and_data_size(mtty: tuple[Client, MigrationDevice]) -> None:
    _, dev = mtty
    _at(dev, S.PRE_COPY)
    precopy = b"".join(dev.read_available())
    dev.walk(S.STOP_COPY, S.PRE_COPY)
    size = dev.data_size()
    rest = b"".join(dev.read_to_end(1 << 20))
    assert rest  # the ports travel at STOP_COPY
    assert size is None or size >= len(rest)
    assert dev.read_chunk() == b""  # stays at the end
    dev.walk(S.RUNNING, S.STOP_COPY)
    assert len(precopy + rest) > 0


def test_dma_logging_over_the_socket(mtty: tuple[Client, MigrationDevice]) -> None:
    client, dev = mtty
    dev.reset()
    report = struct.pack("<QQQ", 0, 1 << 20, 4096)
    with pytest.raises(VfioUserError) as e:  # REPORT before START
        client.device_feature(FEATURE_GET | FEATURE_DMA_LOGGING_REPORT, report, argsz=8 + 24 + 64)
    assert e.value.errno == errno.EINVAL
    assert dev.logging_start([(0, 1 << 20)])
    try:
        with pytest.raises(MigrationError) as e2:
            dev.logging_start([(0, 1 << 20)])
        assert e2.value.errno == errno.EBUSY
        assert dev.logging is not None and dev.logging.page_size == 4096
        assert dev.logging_report(0, 1 << 20) == set()  # mtty does no DMA
    finally:
        dev.logging_stop()
    assert dev.logging is None

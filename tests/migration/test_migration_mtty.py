"""mtty live migration between two real ``mdevd serve`` processes.

The workload loops bytes through both UARTs and always leaves some in the
RX FIFOs, so every migration carries bytes in flight inside the device
state; it also logs what it received in guest memory, so the migrated
pages are checked too.  Failures (a refused state, a corrupt, oversize or
truncated stream, the destination daemon killed) must leave the source
RUNNING with nothing lost and the destination reset, RUNNING and usable.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator

import pytest
from mig_served import MttyDaemon, new_uuid, short_dir

from mdevcore.migration import stream
from mdevcore.migration.arcs import State
from mdevcore.migration.links import serve_receiver
from mdevcore.migration.receiver import Receiver
from mdevcore.migration.sender import Options, Progress
from mdevcore.migration.session import Endpoint, continue_on, migrate_local
from mdevcore.migration.workload import create
from mdevcore.migration.workloads.mtty import IIR_FCR, LSR, LSR_DR, RBR_THR, MttyWorkload
from mdevcore.vfio_user.client import Client

MEM = 1 << 20
FAST = Options(max_rounds=3, round_seconds=0.02, dirty_target=0)


def _mtty(ep: Endpoint) -> MttyWorkload:
    wl = create("mtty")
    assert isinstance(wl, MttyWorkload)
    wl.start(ep.client, ep.mem)
    return wl


def _usable(client: Client) -> None:
    """Reset state: nothing pending in the FIFOs, and a byte still loops back."""
    for port in (0, 1):
        assert not client.region_read(port, LSR, 1)[0] & LSR_DR
        client.region_write(port, RBR_THR, b"\x5a")
        assert client.region_read(port, LSR, 1)[0] & LSR_DR
        assert client.region_read(port, RBR_THR, 1) == b"\x5a"


def test_twenty_migrations_back_and_forth_with_bytes_in_flight(
    pair: tuple[MttyDaemon, MttyDaemon],
) -> None:
    a, b = pair
    u = new_uuid()
    paths = [a.create(u), b.create(u)]
    here = Endpoint(paths[0], MEM, name="A")
    wl = _mtty(here)
    wl.run_for(0.05)
    try:
        for i in range(20):
            there = Endpoint(paths[(i + 1) % 2], MEM, name="AB"[(i + 1) % 2])
            report, receiver = migrate_local(here, there, wl, options=FAST)
            assert report.ok, report.error
            assert report.workload["in_flight_at_quiesce"] > 0
            assert report.device_bytes > 0 and report.pages_sent >= MEM // 4096
            assert report.downtime_seconds < report.total_seconds
            assert here.dev.state() == State.STOP  # the source ends stopped
            wl.close()
            here.close()
            restored = continue_on(receiver, there)
            assert isinstance(restored, MttyWorkload)
            wl, here = restored, there
            wl.run_for(0.02)
        wl.verify()
        stats = wl.stats()
        assert stats["restores"] == 20
        assert stats["mismatches"] == 0
        assert stats["verified_bytes"] == stats["writes"] > 1000
    finally:
        wl.close()
        here.close()
        a.remove(u)
        b.remove(u)


def test_refused_state_rolls_the_source_back(pair: tuple[MttyDaemon, MttyDaemon]) -> None:
    """mtty-2 state into an mtty-1: RESUMING -> STOP says EINVAL."""
    a, b = pair
    u = new_uuid()
    src = Endpoint(a.create(u, "mtty-2"), MEM, name="src")
    dst = Endpoint(b.create(u, "mtty-1"), MEM, name="dst")
    wl = _mtty(src)
    try:
        wl.run_for(0.05)
        report, receiver = migrate_local(src, dst, wl, options=FAST)
        assert not report.ok and report.rolled_back
        assert report.errno == errno.EINVAL
        assert src.dev.state() == State.RUNNING and src.dev.logging is None
        assert dst.dev.state() == State.RUNNING
        assert not dst.client.region_read(0, LSR, 1)[0] & LSR_DR  # not half-loaded
        wl.run_for(0.05)
        wl.verify()
        assert wl.stats()["mismatches"] == 0
    finally:
        wl.close()
        src.close()
        dst.close()
        a.remove(u)
        b.remove(u)


def test_workload_copes_with_a_one_byte_fifo(pair: tuple[MttyDaemon, MttyDaemon]) -> None:
    a, _ = pair
    u = new_uuid()
    ep = Endpoint(a.create(u), MEM, name="src")
    wl = _mtty(ep)
    try:
        wl.depth = 1  # what it falls back to when FCR does not enable the FIFOs
        wl.run_for(0.05)
        wl.verify()
        assert wl.stats()["verified_bytes"] == wl.stats()["writes"] > 10
    finally:
        wl.close()
        ep.close()
        a.remove(u)


# --- hostile streams --------------------------------------------------------------


def _device_state(ep: Endpoint) -> bytes:
    """A real mtty stream, with bytes in its FIFOs, from a source device."""
    for port in (0, 1):
        ep.client.region_write(port, IIR_FCR, b"\x07")  # FIFOs on
        ep.client.region_write_multi((port, RBR_THR, bytes([c])) for c in b"abc")
    ep.dev.walk(State.PRE_COPY)
    data = b"".join(ep.dev.read_available())
    ep.dev.walk(State.STOP_COPY)
    data += b"".join(ep.dev.read_to_end(1 << 20))
    ep.dev.walk(State.RUNNING)
    return data


def _meta() -> bytes:
    return stream.meta({"memory_size": MEM, "memory_base": 0, "page_size": 4096})


def _deliver(dst: Endpoint, data: bytes, device_limit: int = 1 << 20) -> tuple[int, str]:
    """Send ``data`` then close, through a UNIX socketpair into a Receiver."""
    receiver = Receiver(dst.dev, dst.mem, device_limit=device_limit)
    ours, theirs = socket.socketpair()
    worker = threading.Thread(target=serve_receiver, args=(theirs, receiver, 10.0))
    ours.settimeout(10.0)
    worker.start()
    try:
        try:
            ours.sendall(data)
            ours.shutdown(socket.SHUT_WR)  # what a sender that dies looks like
        except OSError:
            pass  # refused early: the status says why
        decoder = stream.Decoder(expect_header=False)
        frames: list[stream.Frame] = []
        while not frames:
            chunk = ours.recv(4096)
            assert chunk, "no STATUS from the receiver"
            frames = decoder.feed(chunk)
    finally:
        worker.join(10)
        ours.close()
        theirs.close()
    assert frames[0].type == stream.FrameType.STATUS
    return stream.parse_status(frames[0].payload)


@pytest.fixture
def hostile(pair: tuple[MttyDaemon, MttyDaemon]) -> Iterator[tuple[Endpoint, bytes]]:
    a, b = pair
    u = new_uuid()
    src = Endpoint(a.create(u), MEM, name="src")
    dst = Endpoint(b.create(u), MEM, name="dst")
    try:
        yield dst, _device_state(src)
    finally:
        src.close()
        dst.close()
        a.remove(u)
        b.remove(u)


def _frames(dev: bytes, *, end: tuple[int, int, int] | None = None) -> list[bytes]:
    return [
        stream.header(),
        _meta(),
        *stream.device(dev),
        stream.pages([3], [b"\x77" * 4096]),
        stream.end(*(end or (len(dev), 1, 3))),
    ]


def test_the_crafted_stream_is_accepted_when_intact(hostile: tuple[Endpoint, bytes]) -> None:
    dst, dev = hostile
    assert _deliver(dst, b"".join(_frames(dev))) == (0, "destination running")
    assert dst.dev.state() == State.RUNNING
    assert dst.mem.read(3 * 4096, 4096) == b"\x77" * 4096
    for port in (0, 1):  # the bytes in flight arrived inside the device state
        assert dst.client.region_read(port, RBR_THR, 1) == b"a"


def _corrupt(frames: list[bytes]) -> bytes:
    dev = bytearray(frames[2])
    dev[-1] ^= 0x01
    return b"".join([*frames[:2], bytes(dev), *frames[3:]])


BAD_STREAMS = {
    "corrupt": (_corrupt, errno.EBADMSG),
    "oversize": (
        lambda f: (
            b"".join(f[:2]) + bytes([2, 0, 0, 0]) + (1 << 30).to_bytes(4, "little") + bytes(4)
        ),
        errno.EMSGSIZE,
    ),
    "truncated_mid_frame": (lambda f: b"".join(f[:2]) + f[2][: len(f[2]) // 2], errno.EPIPE),
    "truncated_before_end": (lambda f: b"".join(f[:-1]), errno.EPIPE),
    "bad_version": (lambda f: stream.header(version=9) + b"".join(f[1:]), errno.EPROTONOSUPPORT),
    "unknown_type": (lambda f: b"".join(f[:3]) + stream.frame(42, b"x"), errno.EPROTO),
    "page_out_of_range": (
        lambda f: b"".join(f[:3]) + stream.pages([MEM // 4096], [bytes(4096)]) + f[4],
        errno.ERANGE,
    ),
    "two_workloads": (
        lambda f: (
            b"".join(f[:4])
            + b"".join(stream.workload("a", b"1"))
            + b"".join(stream.workload("b", b"2"))
            + f[4]
        ),
        errno.EPROTO,
    ),
    "wrong_totals": (lambda f: b"".join(f[:4]) + stream.end(1, 1, 3), errno.EBADMSG),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_bad_stream_leaves_the_destination_reset_and_usable(
    hostile: tuple[Endpoint, bytes], case: str
) -> None:
    dst, dev = hostile
    make, want = BAD_STREAMS[case]
    err, text = _deliver(dst, make(_frames(dev)))
    assert err == want, text
    assert dst.dev.state() == State.RUNNING
    _usable(dst.client)  # no byte of the migrated FIFOs is there


def test_device_state_over_the_limit_is_refused(hostile: tuple[Endpoint, bytes]) -> None:
    dst, dev = hostile
    err, text = _deliver(dst, b"".join(_frames(dev)), device_limit=len(dev) - 1)
    assert err == errno.EFBIG, text
    assert dst.dev.state() == State.RUNNING
    _usable(dst.client)


def test_destination_daemon_killed_mid_stream(pair: tuple[MttyDaemon, MttyDaemon]) -> None:
    a, _ = pair
    u = new_uuid()
    with short_dir() as base:
        victim = MttyDaemon(base)
        src = Endpoint(a.create(u), MEM, name="src")
        dst = Endpoint(victim.create(u), MEM, name="dst")
        wl = _mtty(src)
        killed: list[Progress] = []

        def kill_at_first_round(p: Progress) -> None:
            if not killed:
                killed.append(p)
                victim.proc.kill()

        try:
            wl.run_for(0.05)
            report, _ = migrate_local(src, dst, wl, options=FAST, progress=kill_at_first_round)
            assert killed and killed[0].phase == "precopy"
            assert not report.ok and report.rolled_back, report
            assert src.dev.state() == State.RUNNING
            before = wl.stats()["writes"]
            wl.run_for(0.1)
            wl.verify()
            stats = wl.stats()
            assert stats["writes"] > before  # it carried on
            assert stats["mismatches"] == 0 and stats["verified_bytes"] == stats["writes"]
        finally:
            wl.close()
            src.close()
            dst.close()
            a.remove(u)
            victim.stop()

"""virtio-net edge cases, in-process: malformed TX/control chains, drops, feature gating."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from net_guest import CTRL, RX0, TX0, WANTED, frame
from virtio_driver import VirtioDriver
from virtio_guest import GuestRam

from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import DatagramBackend
from mdevcore.virtio.net.control import MAX_MAC_TABLE
from mdevcore.virtio.net.device import NetConfig

MAC = bytes.fromhex("02aa000000aa")
PEER = bytes.fromhex("02bb000000bb")


class Rig:
    """One VF in-process, its wire's far end, and a driver with queues up."""

    def __init__(self, wanted: int = WANTED) -> None:
        near, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wire.setblocking(False)
        self.vf = IfcvfNetVf(NetConfig(mac=MAC, queue_size=64), DatagramBackend(near))
        self.ram = GuestRam()
        self.vf.dma_map(self.ram.mapping())
        self.drv = VirtioDriver(self.vf)
        self.features = self.drv.negotiate(wanted)
        count = 5 if wanted & spec.bit(spec.NET_F_CTRL_VQ) else 2
        self.queues = [self.drv.setup_queue(self.ram, i, 16, vector=i) for i in range(count)]

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.wire.recv(70000))
            except BlockingIOError:
                return out

    def ctrl(self, request: bytes, ack: bool = True) -> tuple[int, list[tuple[int, int]]]:
        q = self.queues[CTRL]
        req, ack_buf = self.ram.alloc(len(request)), self.ram.alloc(1)
        self.ram.write(req, request)
        self.ram.write(ack_buf, b"\xee")
        bufs = [(req, len(request), False)] + ([(ack_buf, 1, True)] if ack else [])
        q.add(bufs)
        self.drv.kick(CTRL)
        return self.ram.read(ack_buf, 1)[0], q.reap()

    def close(self) -> None:
        self.vf.close()
        self.wire.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    r.drv.driver_ok()
    yield r
    r.close()


def test_tx_chains_too_short_or_write_only_are_returned_unsent(rig: Rig) -> None:
    q = rig.queues[TX0]
    buf = rig.ram.alloc(64)
    rig.ram.write(buf, bytes(12) + frame(PEER, MAC, b"ok"))
    heads = [
        q.add([(buf, 11, False)]),  # shorter than the virtio-net header
        q.add([(buf, 64, True)]),  # nothing device-readable
        q.add([(buf, 12, False), (buf + 12, 16, False)]),  # header, then a 16-byte frame
    ]
    rig.drv.kick(TX0)
    assert q.reap() == [(h, 0) for h in heads]
    assert rig.sent() == [frame(PEER, MAC, b"ok")]


def test_tx_only_after_driver_ok() -> None:
    r = Rig()
    try:
        buf = r.ram.alloc(40)
        r.queues[TX0].add([(buf, 40, False)])
        r.drv.kick(TX0)
        assert r.queues[TX0].reap() == [] and r.sent() == []
        r.drv.driver_ok()
        r.drv.kick(TX0)
        assert len(r.queues[TX0].reap()) == 1 and len(r.sent()) == 1
    finally:
        r.close()


def test_control_chain_without_ack_or_oversized(rig: Rig) -> None:
    ack, used = rig.ctrl(bytes([spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, 0]), ack=False)
    assert used[0][1] == 0 and rig.vf.control.filter.promisc  # no ack byte: not executed
    ack, used = rig.ctrl(bytes([spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_TABLE_SET]) + bytes(5000))
    assert (ack, used[0][1]) == (spec.NET_ERR, 1)
    too_many = struct.pack("<I", MAX_MAC_TABLE + 1) + bytes(6 * (MAX_MAC_TABLE + 1))
    table = too_many + struct.pack("<I", 0)
    ack, _ = rig.ctrl(bytes([spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_TABLE_SET]) + table)
    assert ack == spec.NET_ERR
    ack, _ = rig.ctrl(b"\x00")  # no command byte
    assert ack == spec.NET_ERR
    assert rig.vf.driver_ok  # malformed commands are answered, not fatal


def test_commands_need_their_features() -> None:
    r = Rig(WANTED & ~(spec.bit(spec.NET_F_CTRL_RX) | spec.bit(spec.NET_F_MQ)))
    try:
        r.drv.driver_ok()
        rx = bytes([spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, 0])
        mq = bytes([spec.NET_CTRL_MQ, spec.NET_CTRL_MQ_VQ_PAIRS_SET, 2, 0])
        assert r.ctrl(rx)[0] == spec.NET_ERR and r.ctrl(mq)[0] == spec.NET_ERR
        assert r.vf.control.filter.promisc and r.vf.control.pairs == 1
    finally:
        r.close()


def test_rx_drops_before_driver_ok_and_while_link_down() -> None:
    r = Rig()
    try:
        buf = r.ram.alloc(2048)
        r.queues[RX0].add([(buf, 2048, True)])
        r.vf.receive(frame(MAC, PEER, b"early"))
        r.drv.driver_ok()
        r.vf.set_link(False)
        r.vf.receive(frame(MAC, PEER, b"down"))
        assert r.queues[RX0].reap() == [] and r.vf.rx_dropped == 2
        r.vf.set_link(True)
        r.vf.receive(frame(MAC, PEER, b"up"))
        assert r.queues[RX0].reap() == [(0, 12 + 16)]
    finally:
        r.close()


def test_rx_buffer_outside_dma_needs_reset_without_writing(rig: Rig) -> None:
    q = rig.queues[RX0]
    q.add([(rig.ram.base + rig.ram.size - 8, 128, True)])  # runs past the mapping
    rig.drv.kick(RX0)
    snapshot = rig.ram.read(rig.ram.base, rig.ram.size)
    rig.vf.receive(frame(MAC, PEER, b"x" * 40))
    assert rig.drv.status & spec.STATUS_DEVICE_NEEDS_RESET
    assert rig.ram.read(rig.ram.base, rig.ram.size) == snapshot
    assert rig.vf.queues[RX0].broken is not None


def test_device_config_bounds_and_read_only(rig: Rig) -> None:
    assert rig.drv.device_cfg(0, 6) == MAC
    rig.drv.write(0, 4, 0xFFFFFFFF, spec.PCI_CAP_DEVICE_CFG)  # the MAC is read-only
    assert rig.drv.device_cfg(0, 6) == MAC
    assert rig.drv.device_cfg(spec.NET_CFG_SIZE, 4) == bytes(4)  # past the structure


def test_mac_addr_set_then_reset_restores_the_configured_mac(rig: Rig) -> None:
    new = bytes.fromhex("02aa000000ff")
    assert rig.ctrl(bytes([spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_ADDR_SET]) + new)[0] == 0
    assert rig.drv.device_cfg(0, 6) == new
    rig.drv.set_status(0)
    assert rig.drv.device_cfg(0, 6) == MAC


async def test_full_backlog_link_down_up_keeps_receiving() -> None:
    """The RX task parks on a full backlog; a link flap must not leave it parked."""
    import trio
    import trio.testing

    from mdevcore.virtio.net.device import RX_BACKLOG

    r = Rig()
    try:
        r.drv.driver_ok()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.vf.background)
            for i in range(RX_BACKLOG + 5):  # no RX buffers: the backlog fills
                r.wire.send(frame(MAC, PEER, struct.pack(">I", i)))
            await trio.testing.wait_all_tasks_blocked()
            assert len(r.vf.rx_backlog) == RX_BACKLOG
            r.vf.set_link(False)
            await trio.testing.wait_all_tasks_blocked()  # the rest is read and dropped
            r.vf.set_link(True)
            fresh = [frame(MAC, PEER, b"fresh%d" % i) for i in range(3)]
            for f in fresh:
                r.wire.send(f)
            await trio.testing.wait_all_tasks_blocked()
            bufs = [r.ram.alloc(256) for _ in range(3)]
            for buf in bufs:
                r.queues[RX0].add([(buf, 256, True)])
            r.drv.kick(RX0)
            used = r.queues[RX0].reap()
            got = [r.ram.read(bufs[h], n)[12:] for h, n in used]
            assert got == fresh
            nursery.cancel_scope.cancel()
    finally:
        r.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"queue_size": 100},  # not a power of two
        {"max_pairs": 40},  # beyond what the VF supports
        {"mac": b"\x02"},
    ],
)
def test_failed_vf_construction_closes_the_backend(bad: dict[str, object]) -> None:
    import os

    before = len(os.listdir("/proc/self/fd"))
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    config = NetConfig(**{"mac": MAC, **bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IfcvfNetVf(config, DatagramBackend(near))
    assert near.fileno() == -1  # closed by the VF
    far.close()
    assert len(os.listdir("/proc/self/fd")) == before

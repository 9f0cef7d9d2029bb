"""Live migration of an IFCVF VF, driven by hand over vfio-user as a VMM would.

A driver in this process (NetGuest) runs the VF on the source; while
dirty logging is on, a received frame marks its RX buffer and the used
ring.  A TX kick while the source is in RUNNING_P2P is only latched; the
state moves (STOP_COPY -> RESUMING) to a destination VF with a wire of
its own, the guest's RAM (the same memfd) and interrupts are handed to
it, and the frame latched on the source leaves through the destination's
wire.  The driver then carries on there: the same rings, MAC, receive
filter and link.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from mig_by_hand import logging_report, logging_start, read_stream, set_state, write_stream
from net_guest import RX0, VECTORS, NetGuest, frame
from virtio_guest import RW

from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.backend import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PCI_MSIX_IRQ_INDEX,
)
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import DatagramBackend
from mdevcore.virtio.net.device import NetConfig

MAC = bytes.fromhex("021fc0000001")
HOST_MAC = bytes.fromhex("525400123456")  # set by the host before the move
PEER = bytes.fromhex("020000000099")
LISTED = bytes.fromhex("02dd00000004")
PAGE = 4096


@asynccontextmanager
async def vf_pair(
    tmp: Path,
) -> AsyncIterator[tuple[list[IfcvfNetVf], list[str], list[socket.socket]]]:
    """Source and destination VFs, each served, each with its own wire end for the test."""
    vfs, paths, wires = [], [], []
    try:
        async with trio.open_nursery() as nursery:
            for name in ("src", "dst"):
                vf_end, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                wire.settimeout(5)
                vf = IfcvfNetVf(NetConfig(mac=MAC), DatagramBackend(vf_end), name=name)
                path = str(tmp / f"{name}.sock")
                vfs.append(vf)
                paths.append(path)
                wires.append(wire)
                await nursery.start(DeviceServer(vf, path, name=name).serve)
            yield vfs, paths, wires
            nursery.cancel_scope.cancel()
    finally:
        for vf in vfs:
            vf.close()
        for wire in wires:
            wire.close()


def hand_over(g: NetGuest, path: str) -> Client:
    """The VMM's side of the switch: the guest's RAM and interrupts, now on ``path``."""
    client = Client(path)
    client.negotiate()
    client.dma_map(g.ram.base, g.ram.size, RW, fd=g.ram.fd)
    trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
    client.set_irqs(PCI_MSIX_IRQ_INDEX, trigger, 0, VECTORS, fds=g.efds)
    return client


async def test_a_vf_migrates_with_its_rings_filter_and_a_latched_kick(tmp_path: Path) -> None:
    async with vf_pair(tmp_path) as (vfs, paths, wires):
        src_wire, dst_wire = wires

        def session() -> dict[str, object]:
            r: dict[str, object] = {}
            g = NetGuest(paths[0])
            old = g.client
            try:
                g.bring_up()
                g.post_rx(RX0, 8, 2048)
                table = (1).to_bytes(4, "little") + LISTED + (0).to_bytes(4, "little")
                assert g.ctrl(spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_TABLE_SET, table) == 0
                assert g.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, b"\0") == 0
                trio.from_thread.run_sync(vfs[0].set_mac, HOST_MAC)
                # dirty logging over the guest's RAM: a received frame marks its pages
                logging_start(old, [(g.ram.base, g.ram.size)])
                posted = dict(g.rx_buffers[RX0])
                src_wire.send(frame(HOST_MAC, PEER, b"before the move"))
                r["before"] = g.receive(RX0, 1)
                dirty = logging_report(old, g.ram.base, g.ram.size)
                filled = {posted[h] // PAGE for h in posted.keys() - g.rx_buffers[RX0].keys()}
                r["dirty_used"] = g.q(RX0).used // PAGE in dirty
                r["dirty_rx"] = len(filled) == 1 and filled <= dirty
                r["dirty_some"] = len(dirty) < g.ram.size // PAGE  # not simply everything
                # P2P: MMIO still taken, but the kick is only latched (no DMA, no frame)
                set_state(old, MigState.RUNNING_P2P)
                g.send(frame(PEER, HOST_MAC, b"kicked in P2P"))
                r["sent_in_p2p"] = src_wire.recv(64) if _ready(src_wire) else None
                set_state(old, MigState.STOP_COPY)
                stream = read_stream(old)
                new = hand_over(g, paths[1])
                set_state(new, MigState.RESUMING)
                write_stream(new, stream)
                set_state(new, MigState.RUNNING)
                set_state(old, MigState.STOP)
                g.client = new
                g.drv.dev = new
                r["latched"] = dst_wire.recv(2048)
                r["tx_reaped"] = g.reap_tx()
                r["mac"] = g.mac()
                r["status"] = g.net_status()
                dst_wire.send(frame(bytes.fromhex("02cc00000003"), PEER, b"filtered out"))
                dst_wire.send(frame(LISTED, PEER, b"on the MAC table"))
                dst_wire.send(frame(HOST_MAC, PEER, b"after the move"))
                r["after"] = g.receive(RX0, 2)
                r["ctrl_ok"] = g.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, b"\1")
                r["stream"] = stream
            finally:
                g.close()
                old.close()
            return r

        with trio.fail_after(30):
            r = await trio.to_thread.run_sync(session)
        assert r["before"] == [(frame(HOST_MAC, PEER, b"before the move"), 1)]
        assert r["dirty_used"] and r["dirty_rx"] and r["dirty_some"]
        assert r["sent_in_p2p"] is None and vfs[0].backend.stats.tx_frames == 0
        assert r["latched"] == frame(PEER, HOST_MAC, b"kicked in P2P")
        assert r["tx_reaped"] == 1
        assert (r["mac"], r["status"]) == (HOST_MAC, spec.NET_S_LINK_UP)
        assert r["after"] == [
            (frame(LISTED, PEER, b"on the MAC table"), 1),
            (frame(HOST_MAC, PEER, b"after the move"), 1),
        ]
        assert r["ctrl_ok"] == spec.NET_OK
        assert vfs[1].rx_dropped == 1  # the filter moved with the state
        assert vfs[1].net.mac == HOST_MAC

        # what the destination refuses, untouched
        stream = r["stream"]
        assert isinstance(stream, bytes)
        end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        other = IfcvfNetVf(NetConfig(mac=MAC, max_pairs=1), DatagramBackend(end))
        try:
            with pytest.raises(OSError) as info:  # another geometry: one queue pair
                other.load_state(stream)
            assert info.value.errno == errno.EINVAL
        finally:
            other.close()
            peer.close()
        tampered = [
            stream.replace(b'"pairs":1', b'"pairs":9'),
            stream.replace(b'"link_up":true', b'"link_up":1'),
            stream.replace(b'"unicast":["', b'"unicast":[7,"'),
        ]
        assert all(t != stream for t in tampered)
        for bad in [b"garbage", stream[:40], *tampered]:
            with pytest.raises(OSError) as info:
                vfs[1].load_state(bad)
            assert info.value.errno == errno.EINVAL
        assert vfs[1].control.pairs == 1 and vfs[1].link_up  # nothing applied


def _ready(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0.3)[0])

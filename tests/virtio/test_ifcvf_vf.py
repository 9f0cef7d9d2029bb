"""Two IFCVF virtio-net VFs served over real vfio-user sockets, cabled back to back.

Each VF is a DeviceServer in this trio run; their backends are the two
ends of one UNIX datagram socketpair.  A worker thread plays both guests
with blocking vfio-user clients (NetGuest): its own memfd RAM per guest,
MSI-X eventfds, rings in guest memory.  Frames sent on one VF's TX queue
must come out of the other's RX queue.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from net_guest import CONFIG_VECTOR, RX0, RX1, TX0, TX1, WANTED, NetGuest, frame

from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.pci import caps
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import backend_pair
from mdevcore.virtio.net.device import NET_FEATURES, NetConfig

MAC_A = bytes.fromhex("02aa00000001")
MAC_B = bytes.fromhex("02bb00000002")
BCAST = b"\xff" * 6


@contextlib.asynccontextmanager
async def two_vfs(tmp: Path) -> AsyncIterator[tuple[IfcvfNetVf, IfcvfNetVf, str, str]]:
    end_a, end_b = backend_pair()
    vf_a = IfcvfNetVf(NetConfig(mac=MAC_A), end_a, name="vf-a")
    vf_b = IfcvfNetVf(NetConfig(mac=MAC_B), end_b, name="vf-b")
    paths = str(tmp / "a.sock"), str(tmp / "b.sock")
    try:
        async with trio.open_nursery() as nursery:
            for vf, path in zip((vf_a, vf_b), paths, strict=True):
                await nursery.start(DeviceServer(vf, path, name=vf.name).serve)
            yield vf_a, vf_b, paths[0], paths[1]
            nursery.cancel_scope.cancel()
    finally:
        vf_a.close()
        vf_b.close()


async def run_guests(tmp: Path, session: Callable[..., Any]) -> tuple[Any, IfcvfNetVf, IfcvfNetVf]:
    async with two_vfs(tmp) as (vf_a, vf_b, path_a, path_b):

        def both() -> Any:
            a, b = NetGuest(path_a), NetGuest(path_b)
            try:
                return session(a, b, vf_a, vf_b)
            finally:
                a.close()
                b.close()

        with trio.fail_after(30):  # a hang guard; the sessions take well under a second
            result = await trio.to_thread.run_sync(both)
        return result, vf_a, vf_b


async def test_identity_capabilities_and_device_config(tmp_path: Path) -> None:
    def session(a: NetGuest, b: NetGuest, *_: object) -> dict[str, object]:
        c = a.client
        header = c.region_read(PCI_CONFIG_REGION_INDEX, 0, 0x40)
        cap_ids = []
        ptr = header[0x34]
        while ptr:
            cap_id, ptr = c.region_read(PCI_CONFIG_REGION_INDEX, ptr, 2)
            cap_ids.append(cap_id)
        return {
            "ids": struct.unpack_from("<HH", header, 0),
            "subsys": struct.unpack_from("<HH", header, 0x2C),
            "class": int.from_bytes(header[9:12], "little"),
            "revision": header[8],
            "caps": cap_ids,
            "features": a.drv.device_features(),
            "mac": a.mac(),
            "status": a.net_status(),
            "pairs": int.from_bytes(a.drv.device_cfg(spec.NET_CFG_MAX_VQ_PAIRS, 2), "little"),
            "mtu": int.from_bytes(a.drv.device_cfg(spec.NET_CFG_MTU, 2), "little"),
            "numq": a.drv.read(spec.COMMON_NUMQ, 2),
            "bar0": c.region_info(0).size,
        }

    r, _, _ = await run_guests(tmp_path, session)
    assert r["ids"] == (0x1AF4, 0x1041)
    assert r["subsys"] == (0x8086, 0x001A)
    assert r["class"] == 0x020000 and r["revision"] == 1
    assert r["caps"] == [caps.CAP_ID_MSIX] + [caps.CAP_ID_VENDOR] * 4 + [caps.CAP_ID_EXP]
    assert r["features"] == NET_FEATURES
    for feature in (
        spec.F_VERSION_1,
        spec.NET_F_MAC,
        spec.NET_F_STATUS,
        spec.NET_F_MRG_RXBUF,
        spec.NET_F_CTRL_VQ,
        spec.NET_F_CTRL_RX,
        spec.NET_F_MQ,
        spec.F_EVENT_IDX,
    ):
        assert r["features"] & spec.bit(feature), feature  # type: ignore[operator]
    assert (r["mac"], r["status"], r["pairs"], r["mtu"]) == (MAC_A, spec.NET_S_LINK_UP, 2, 1500)
    assert r["numq"] == 5 and r["bar0"] == 0x4000


async def test_frames_pass_vf_to_vf_in_mergeable_buffers(tmp_path: Path) -> None:
    big = frame(MAC_B, MAC_A, os.urandom(1386))  # 1400 bytes: + header = 3 buffers of 512
    small = frame(MAC_B, MAC_A, b"ping")
    back = frame(MAC_A, MAC_B, b"pong" * 10)

    def session(a: NetGuest, b: NetGuest, *_: object) -> dict[str, object]:
        for g in (a, b):
            g.bring_up()
            g.post_rx(RX0, 8, 512)
        a.send(big)
        a.send(small)
        got_b = b.receive(RX0, 2)
        b.send(back)
        got_a = a.receive(RX0, 1)
        # Interrupts wait() consumed plus those still pending on the eventfds.
        irqs = tuple(g.irq_count[v] + g.interrupts(v) for g in (a, b) for v in (RX0, TX0))
        return {"b": got_b, "a": got_a, "tx_done": (a.reap_tx(), b.reap_tx()), "irqs": irqs}

    r, vf_a, vf_b = await run_guests(tmp_path, session)
    assert r["b"] == [(big, 3), (small, 1)]
    assert r["a"] == [(back, 1)]
    assert r["tx_done"] == (2, 1)
    assert all(n > 0 for n in r["irqs"]), r["irqs"]  # type: ignore[attr-defined]
    assert vf_a.backend.stats.tx_frames == 2 and vf_b.backend.stats.rx_frames == 2


async def test_frames_wait_for_rx_buffers(tmp_path: Path) -> None:
    """A frame arriving before the driver posts RX buffers is delivered once it does."""
    sent = [frame(MAC_B, MAC_A, bytes([i]) * 100) for i in range(3)]

    def session(a: NetGuest, b: NetGuest, *_: object) -> object:
        a.bring_up()
        b.bring_up()
        for f in sent:
            a.send(f, TX1)  # the second TX queue works as well
        assert a.reap_tx(TX1) == 3
        b.post_rx(RX0, 2, 2048)  # two buffers, three frames
        first = b.receive(RX0, 2)
        b.post_rx(RX0, 1, 2048)
        return first + b.receive(RX0, 1)

    r, _, vf_b = await run_guests(tmp_path, session)
    assert r == [(f, 1) for f in sent]
    assert vf_b.rx_dropped == 0


async def test_without_mergeable_buffers_a_frame_needs_one_buffer(tmp_path: Path) -> None:
    def session(a: NetGuest, b: NetGuest, *_: object) -> object:
        a.bring_up()
        features = b.bring_up(WANTED & ~spec.bit(spec.NET_F_MRG_RXBUF))
        assert not features & spec.bit(spec.NET_F_MRG_RXBUF)
        b.post_rx(RX0, 1, 256)  # too small for the first frame: it is dropped
        a.send(frame(MAC_B, MAC_A, bytes(400)))
        a.send(frame(MAC_B, MAC_A, b"fits"))
        return b.receive(RX0, 1)

    r, _, vf_b = await run_guests(tmp_path, session)
    assert r == [(frame(MAC_B, MAC_A, b"fits"), 1)]
    assert vf_b.rx_dropped == 1


async def test_control_queue_rx_filter_mac_and_queue_pairs(tmp_path: Path) -> None:
    other = bytes.fromhex("02cc00000003")
    extra = bytes.fromhex("02dd00000004")
    mcast = bytes.fromhex("01005e000001")
    new_mac = bytes.fromhex("02bb000000ff")

    def ipv4(src: int) -> bytes:
        ip = bytes(12) + struct.pack(">II", 0x0A000000 + src, 0x0A0000FE)
        return frame(MAC_B, MAC_A, ip + bytes(30), ethertype=0x0800)

    def session(a: NetGuest, b: NetGuest, _: object, vf_b: IfcvfNetVf) -> dict[str, object]:
        a.bring_up()
        b.bring_up()
        r: dict[str, object] = {}
        b.post_rx(RX0, 32, 2048)
        b.post_rx(RX1, 32, 2048)
        r["promisc_off"] = b.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, b"\0")
        r["bad_rx_len"] = b.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, b"\0\0")
        r["rx_extra"] = b.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_NOBCAST, b"\1")
        table = struct.pack("<I", 1) + extra + struct.pack("<I", 1) + mcast
        r["table"] = b.ctrl(spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_TABLE_SET, table)
        r["bad_table"] = b.ctrl(spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_TABLE_SET, table[:-1])
        for dst in (other, MAC_B, extra, BCAST, mcast, bytes.fromhex("01005e000002")):
            a.send(frame(dst, MAC_A, b"filter"))
        r["filtered"] = [f[:6] for f, _ in b.receive(RX0, 4)]
        r["pairs3"] = b.ctrl(spec.NET_CTRL_MQ, spec.NET_CTRL_MQ_VQ_PAIRS_SET, b"\3\0")
        r["pairs0"] = b.ctrl(spec.NET_CTRL_MQ, spec.NET_CTRL_MQ_VQ_PAIRS_SET, b"\0\0")
        r["pairs2"] = b.ctrl(spec.NET_CTRL_MQ, spec.NET_CTRL_MQ_VQ_PAIRS_SET, b"\2\0")
        flows = [ipv4(src) for src in range(8)]
        for f in flows + flows:  # each flow twice: it must stay on its queue
            a.send(f)
        # The device's own steering (its state is settled: VQ_PAIRS_SET was acked).
        want0 = 2 * sum(1 for f in flows if _pair_of(vf_b, f) == 0)
        got: dict[int, list[bytes]] = {RX0: [], RX1: []}
        if want0:
            got[RX0] = [f for f, _ in b.receive(RX0, want0)]
        if want0 < 16:
            got[RX1] = [f for f, _ in b.receive(RX1, 16 - want0)]
        r["steered"] = got
        r["addr_set"] = b.ctrl(spec.NET_CTRL_MAC, spec.NET_CTRL_MAC_ADDR_SET, new_mac)
        r["mac"] = b.mac()
        r["unknown"] = b.ctrl(0x7F, 0)
        return r

    r, _, vf_b = await run_guests(tmp_path, session)
    ok, err = spec.NET_OK, spec.NET_ERR
    assert (r["promisc_off"], r["bad_rx_len"], r["rx_extra"]) == (ok, err, err)
    assert (r["table"], r["bad_table"]) == (ok, err)
    assert r["filtered"] == [MAC_B, extra, BCAST, mcast]
    assert (r["pairs3"], r["pairs0"], r["pairs2"]) == (err, err, ok)
    steered: dict[int, list[bytes]] = r["steered"]  # type: ignore[assignment]
    assert steered[RX0] and steered[RX1], "8 flows over 2 pairs all landed on one queue"
    for queue, frames in steered.items():
        assert all(_pair_of(vf_b, f) == queue // 2 for f in frames)
        assert all(frames.count(f) == 2 for f in frames)  # both copies of a flow together
    assert (r["addr_set"], r["mac"], r["unknown"]) == (ok, new_mac, err)


def _pair_of(vf: IfcvfNetVf, f: bytes) -> int:
    return vf.rx_queue_for(f).index // 2


async def test_link_change_raises_a_config_interrupt(tmp_path: Path) -> None:
    def session(a: NetGuest, b: NetGuest, vf_a: IfcvfNetVf, _: IfcvfNetVf) -> dict[str, object]:
        a.bring_up()
        gen = a.drv.read(spec.COMMON_CFGGENERATION, 1)
        trio.from_thread.run_sync(vf_a.set_link, False)
        r: dict[str, object] = {"irq": a.wait(CONFIG_VECTOR, 5.0), "status": a.net_status()}
        r["gen_moved"] = a.drv.read(spec.COMMON_CFGGENERATION, 1) != gen
        a.send(frame(MAC_B, MAC_A, b"link down"))  # not sent while the link is down
        trio.from_thread.run_sync(vf_a.set_link, True)
        r["irq_up"] = a.wait(CONFIG_VECTOR, 5.0)
        r["status_up"] = a.net_status()
        return r

    r, vf_a, _ = await run_guests(tmp_path, session)
    assert r == {"irq": True, "status": 0, "gen_moved": True, "irq_up": True, "status_up": 1}
    assert vf_a.backend.stats.tx_frames == 0


async def test_bad_rx_chain_needs_reset_and_a_reset_recovers(tmp_path: Path) -> None:
    def session(a: NetGuest, b: NetGuest, *_: object) -> dict[str, object]:
        a.bring_up()
        b.bring_up()
        q = b.q(RX0)
        buf = b.ram.alloc(64)
        q.add([(buf, 16, False), (buf + 16, 48, True)])  # RX chains must be write-only
        b.drv.kick(RX0)
        a.send(frame(MAC_B, MAC_A, b"x"))
        r: dict[str, object] = {"irq": b.wait(CONFIG_VECTOR, 5.0)}
        r["needs_reset"] = bool(b.drv.status & spec.STATUS_DEVICE_NEEDS_RESET)
        r["untouched"] = b.ram.read(buf, 64) == bytes(64)
        b.bring_up()  # status 0, then the whole handshake again
        r["status"] = b.drv.status
        b.post_rx(RX0, 2, 2048)
        a.send(frame(MAC_B, MAC_A, b"after reset"))
        r["got"] = b.receive(RX0, 1)
        return r

    r, _, _ = await run_guests(tmp_path, session)
    assert r["irq"] is True and r["needs_reset"] is True and r["untouched"] is True
    assert r["status"] == 0x0F
    assert r["got"] == [(frame(MAC_B, MAC_A, b"after reset"), 1)]


@pytest.mark.parametrize(
    "features",
    [
        WANTED & ~spec.bit(spec.NET_F_CTRL_VQ),
        spec.bit(spec.F_VERSION_1) | spec.bit(spec.NET_F_MQ),
        spec.bit(spec.F_VERSION_1) | spec.bit(spec.NET_F_CTRL_MAC_ADDR),
    ],
)
async def test_features_needing_the_control_queue_are_refused(
    tmp_path: Path, features: int
) -> None:
    def session(a: NetGuest, b: NetGuest, *_: object) -> int:
        d = a.drv
        d.set_status(0)
        d.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
        d.write_features(features)
        d.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_FEATURES_OK)
        return d.status

    r, _, _ = await run_guests(tmp_path, session)
    assert r == spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER

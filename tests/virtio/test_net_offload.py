"""Offload rules, in-process: what is offered with which backend, header checks, checksums."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from net_guest import WANTED
from virtio_driver import VirtioDriver
from virtio_guest import GuestRam

from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.testing.netns import needs_netns, netns
from mdevcore.virtio import spec
from mdevcore.virtio.net import offload
from mdevcore.virtio.net.backend import DatagramBackend
from mdevcore.virtio.net.device import NetConfig
from mdevcore.virtio.net.tap import TapBackend

MAC = bytes.fromhex("02aa000000aa")
CSUM, TSO4 = spec.bit(spec.NET_F_CSUM), spec.bit(spec.NET_F_HOST_TSO4)
NEEDS = spec.NET_HDR_F_NEEDS_CSUM


def hdr(flags: int = 0, gso: int = 0, gso_size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return spec.NET_HDR.pack(flags, gso, 0, gso_size, start, off, 0)


def test_loopback_offers_no_offload() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    vf = IfcvfNetVf(NetConfig(mac=MAC), DatagramBackend(a))
    try:
        assert vf.common.device_features & offload.OFFLOAD_FEATURES == 0
    finally:
        vf.close()
        b.close()


@needs_netns
def test_a_tap_vf_offers_offloads_and_refuses_inconsistent_sets() -> None:
    with netns("ifcf") as ns:
        vf = IfcvfNetVf(NetConfig(mac=MAC), TapBackend("ifcf0", ns))
        try:
            offered = vf.common.device_features
            assert offered & offload.OFFLOAD_FEATURES == offload.OFFLOAD_FEATURES
            drv = VirtioDriver(vf)
            drv.set_status(0)
            drv.set_status(spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
            drv.write_features(WANTED | TSO4)  # TSO without CSUM (5.1.3.1)
            drv.set_status(drv.status | spec.STATUS_FEATURES_OK)
            assert not drv.status & spec.STATUS_FEATURES_OK
            assert drv.negotiate(WANTED | TSO4 | CSUM) & (TSO4 | CSUM) == TSO4 | CSUM
        finally:
            vf.close()


@pytest.mark.parametrize(
    ("header", "features", "ok"),
    [
        (hdr(), 0, True),
        (hdr(NEEDS, start=34, off=6), 0, False),  # CSUM not negotiated
        (hdr(NEEDS, start=34, off=6), CSUM, True),
        (hdr(NEEDS, start=99, off=6), CSUM, False),  # beyond the 100-byte frame
        (hdr(spec.NET_HDR_F_DATA_VALID), CSUM, False),  # the device's flag, not the driver's
        (hdr(NEEDS, offload.GSO_TCPV4, 1000, 34, 16), CSUM, False),  # no HOST_TSO4
        (hdr(NEEDS, offload.GSO_TCPV4, 1000, 34, 16), CSUM | TSO4, True),
        (hdr(NEEDS, offload.GSO_TCPV4, 0, 34, 16), CSUM | TSO4, False),  # gso_size 0
        (hdr(0, offload.GSO_TCPV4, 1000), CSUM | TSO4, False),  # GSO without NEEDS_CSUM
        (hdr(NEEDS, offload.GSO_TCPV4 | offload.GSO_ECN, 1000, 34, 16), CSUM | TSO4, False),
        (hdr(NEEDS, offload.GSO_UDP, 1000, 34, 6), CSUM | TSO4, False),  # UFO: never offered
    ],
)
def test_tx_header_checks(header: bytes, features: int, ok: bool) -> None:
    assert offload.tx_header_ok(header, 100, features) is ok


def test_rx_header_fits_the_driver() -> None:
    # An unfinished UDP checksum for a driver without GUEST_CSUM: finished here.
    payload = b"abc" * 11
    udp = bytearray(struct.pack(">HHHH", 1, 2, 8 + len(payload), 0x1234) + payload)
    frame = bytes(34) + bytes(udp)
    fitted = offload.fit_rx_header(hdr(NEEDS, start=34, off=6), frame, 0)
    assert fitted is not None
    header, out = fitted
    assert header == bytes(10)
    check = struct.unpack(">H", out[40:42])[0]
    assert check != 0x1234
    # 0x1234 stood for the pseudo-header's sum: with it in front, the sum verifies.
    assert offload.internet_checksum(b"\x12\x34" + out[34:]) == 0
    # With GUEST_CSUM it stays for the driver; GSO needs GUEST_TSO4.
    guest = spec.bit(spec.NET_F_GUEST_CSUM)
    kept = offload.fit_rx_header(hdr(NEEDS, start=34, off=6), frame, guest)
    assert kept is not None and kept[0][0] == NEEDS and kept[1] == frame
    gso = hdr(NEEDS, offload.GSO_TCPV4, 1448, 34, 16)
    assert offload.fit_rx_header(gso, frame, guest) is None
    tso = guest | spec.bit(spec.NET_F_GUEST_TSO4)
    assert offload.fit_rx_header(gso, frame, tso) is not None
    assert offload.tun_offload_flags(tso) == offload.TUN_F_CSUM | offload.TUN_F_TSO4
    assert offload.tun_offload_flags(spec.bit(spec.NET_F_GUEST_TSO4)) == 0


def test_internet_checksum_matches_rfc1071() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")  # RFC 1071's example: sum 0xddf2
    assert offload.internet_checksum(data) == ~0xDDF2 & 0xFFFF
    assert offload.internet_checksum(b"\xff\xff") == 0
    assert offload.internet_checksum(bytes(4)) == 0xFFFF


@needs_netns
def test_a_migrated_driver_s_offloads_reach_the_destination_tap() -> None:
    """load_state tells the destination's TAP what the driver takes (TUNSETOFFLOAD)."""
    guest = spec.bit(spec.NET_F_GUEST_CSUM) | spec.bit(spec.NET_F_GUEST_TSO4)
    with netns("ifcm") as ns:
        src = IfcvfNetVf(NetConfig(mac=MAC), TapBackend("ifcm0", ns))
        dst = IfcvfNetVf(NetConfig(mac=MAC), TapBackend("ifcm1", ns))
        ram = GuestRam()
        try:
            src.dma_map(ram.mapping())
            drv = VirtioDriver(src)
            drv.negotiate(WANTED | guest)
            for index in range(5):
                drv.setup_queue(ram, index, 16, vector=index)
            drv.driver_ok()
            assert isinstance(src.backend, TapBackend) and isinstance(dst.backend, TapBackend)
            assert src.backend.tun_offload == offload.TUN_F_CSUM | offload.TUN_F_TSO4
            assert dst.backend.tun_offload == 0
            dst.load_state(src.save_state())
            assert dst.backend.tun_offload == offload.TUN_F_CSUM | offload.TUN_F_TSO4
            # What the driver switched with CTRL_GUEST_OFFLOADS travels too (as if SET ran).
            src.control.guest_offloads = spec.bit(spec.NET_F_GUEST_CSUM)
            dst.load_state(src.save_state())
            assert dst.control.guest_offloads == spec.bit(spec.NET_F_GUEST_CSUM)
            assert dst.backend.tun_offload == offload.TUN_F_CSUM
            src.control.guest_offloads = 1 << 40  # not a GUEST_* offload: refused
            with pytest.raises(OSError) as info:
                dst.load_state(src.save_state())
            assert info.value.errno == errno.EINVAL
            drv.set_status(0)  # a device reset takes them back
            assert src.backend.tun_offload == 0
        finally:
            src.close()
            dst.close()
            ram.close()

"""The virtio-net control virtqueue (5.1.6.5) and the receive filter it programs.

A command is one chain: device-readable ``class, command, data...`` and a
device-writable ack byte.  Every length is checked against what the
command needs; a command the device does not know, or that needs a
feature the driver did not negotiate, or with a bad length, is answered
VIRTIO_NET_ERR and changes nothing.
"""

from __future__ import annotations

import dataclasses
import struct

from mdevcore.virtio import spec
from mdevcore.virtio.net import offload

BROADCAST = b"\xff" * 6
MAX_MAC_TABLE = 64  # entries per table; more is refused (the driver falls back)


@dataclasses.dataclass(slots=True)
class RxFilter:
    """What the driver asked to receive (5.1.6.5.1, 5.1.6.5.2)."""

    mac: bytes
    # Promiscuous until the driver says otherwise: a driver without CTRL_RX
    # must still receive (QEMU's virtio-net starts the same way).
    promisc: bool = True
    allmulti: bool = False
    unicast: list[bytes] = dataclasses.field(default_factory=list)
    multicast: list[bytes] = dataclasses.field(default_factory=list)

    def accepts(self, frame: bytes) -> bool:
        if len(frame) < 14:
            return False
        dst = frame[:6]
        if self.promisc or dst == BROADCAST:
            return True
        if dst[0] & 1:
            return self.allmulti or dst in self.multicast
        return dst == self.mac or dst in self.unicast


@dataclasses.dataclass(slots=True)
class NetControl:
    """Control state of one device: the receive filter and the active queue pairs."""

    filter: RxFilter
    max_pairs: int
    pairs: int = 1
    # GUEST_* offloads the driver set with CTRL_GUEST_OFFLOADS_SET; None: as
    # negotiated (every negotiated offload is on until the driver says, 5.1.6.5.6.2).
    guest_offloads: int | None = None

    def rx_features(self, negotiated: int) -> int:
        """``negotiated`` with the GUEST_* bits the driver has switched on now."""
        if self.guest_offloads is None:
            return negotiated
        # (masked again: a migration stream's value is checked for its bits only)
        return negotiated & ~offload.GUEST_OFFLOADS | self.guest_offloads & negotiated

    def execute(self, request: bytes, features: int) -> int:
        """Run one command; returns NET_OK or NET_ERR."""
        if len(request) < 2:
            return spec.NET_ERR
        cls, cmd, data = request[0], request[1], request[2:]

        def has(bit: int) -> bool:
            return bool(features & spec.bit(bit))

        if cls == spec.NET_CTRL_RX and has(spec.NET_F_CTRL_RX):
            return self._rx_mode(cmd, data)
        if cls == spec.NET_CTRL_MAC:
            if cmd == spec.NET_CTRL_MAC_TABLE_SET and has(spec.NET_F_CTRL_RX):
                return self._mac_table(data)
            if cmd == spec.NET_CTRL_MAC_ADDR_SET and has(spec.NET_F_CTRL_MAC_ADDR):
                if len(data) != 6:
                    return spec.NET_ERR
                self.filter.mac = bytes(data)
                return spec.NET_OK
            return spec.NET_ERR
        if cls == spec.NET_CTRL_MQ and cmd == spec.NET_CTRL_MQ_VQ_PAIRS_SET and has(spec.NET_F_MQ):
            if len(data) != 2:
                return spec.NET_ERR
            (pairs,) = struct.unpack("<H", data)
            if not spec.NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.max_pairs:
                return spec.NET_ERR
            self.pairs = pairs
            return spec.NET_OK
        if (
            cls == spec.NET_CTRL_GUEST_OFFLOADS
            and cmd == spec.NET_CTRL_GUEST_OFFLOADS_SET
            and has(spec.NET_F_CTRL_GUEST_OFFLOADS)
        ):
            return self._guest_offloads(data, features)
        return spec.NET_ERR

    def _guest_offloads(self, data: bytes, features: int) -> int:
        if len(data) != 8:
            return spec.NET_ERR
        (wanted,) = struct.unpack("<Q", data)
        # Only offloads negotiated (5.1.6.5.6.1), and a set that holds
        # together (TSO needs the checksum offload it builds on).
        if wanted & ~(features & offload.GUEST_OFFLOADS) or offload.features_problem(wanted):
            return spec.NET_ERR
        self.guest_offloads = wanted
        return spec.NET_OK

    def _rx_mode(self, cmd: int, data: bytes) -> int:
        # ALLUNI/NOMULTI/NOUNI/NOBCAST need CTRL_RX_EXTRA, which is not offered.
        if cmd not in (spec.NET_CTRL_RX_PROMISC, spec.NET_CTRL_RX_ALLMULTI) or len(data) != 1:
            return spec.NET_ERR
        if data[0] > 1:
            return spec.NET_ERR
        if cmd == spec.NET_CTRL_RX_PROMISC:
            self.filter.promisc = bool(data[0])
        else:
            self.filter.allmulti = bool(data[0])
        return spec.NET_OK

    def _mac_table(self, data: bytes) -> int:
        tables: list[list[bytes]] = []
        pos = 0
        for _ in range(2):  # unicast, then multicast
            if pos + 4 > len(data):
                return spec.NET_ERR
            (entries,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if entries > MAX_MAC_TABLE or pos + 6 * entries > len(data):
                return spec.NET_ERR
            tables.append([bytes(data[pos + 6 * i : pos + 6 * i + 6]) for i in range(entries)])
            pos += 6 * entries
        if pos != len(data):
            return spec.NET_ERR
        self.filter.unicast, self.filter.multicast = tables
        return spec.NET_OK

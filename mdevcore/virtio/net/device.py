"""VirtioNetDevice: a modern virtio-net function on the virtio PCI transport.

Queues: receiveq1, transmitq1, ..., receiveqN, transmitqN, then controlq
(5.1.2), N = ``max_pairs``.  TX is served right inside the notify write
(no scheduler hop); RX is fed by the ``background`` task reading the backend.
Frames arriving while the driver has no RX buffers wait in a short queue
(``RX_BACKLOG``); while it is full the task stops reading, so the backend
socket's own buffer holds the rest and then drops, as a wire would.
Frames arriving before DRIVER_OK, while the link is down or not matching
the receive filter are dropped.

Checksum and TSO offloads are offered only when the backend passes the
virtio_net_hdr through (a TAP with IFF_VNET_HDR, ``backend.vnet_hdr``):
the host kernel then finishes checksums and cuts segments.  Each guest TX
header is checked against the negotiated features first, and each RX
header is made to fit them (offload.py); the backend is told the
negotiated features at DRIVER_OK (and none at reset) so it hands over
only what the driver takes.

With several pairs active (MQ VQ_PAIRS_SET), receive steering keeps a
flow on one queue: IPv4/IPv6 frames are spread by a hash of their
addresses, everything else uses the first pair.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import zlib

import trio

from mdevcore.pci.device import PciIdentity
from mdevcore.virtio import spec
from mdevcore.virtio.chain import VirtqError, gather, scatter
from mdevcore.virtio.net import offload, state
from mdevcore.virtio.net.backend import FrameBackend
from mdevcore.virtio.net.control import NetControl, RxFilter
from mdevcore.virtio.net.datapath import NO_OFFLOAD, drain_tx, place_rx
from mdevcore.virtio.transport import VirtioPciDevice
from mdevcore.virtio.virtqueue import SplitQueue

RX_BACKLOG = 64
MAX_CTRL_REQUEST = 4096

NET_FEATURES = (
    spec.bit(spec.F_VERSION_1)
    | spec.bit(spec.F_INDIRECT_DESC)
    | spec.bit(spec.F_EVENT_IDX)
    | spec.bit(spec.F_RING_RESET)
    | spec.bit(spec.NET_F_MAC)
    | spec.bit(spec.NET_F_MTU)
    | spec.bit(spec.NET_F_STATUS)
    | spec.bit(spec.NET_F_MRG_RXBUF)
    | spec.bit(spec.NET_F_CTRL_VQ)
    | spec.bit(spec.NET_F_CTRL_RX)
    | spec.bit(spec.NET_F_MQ)
    | spec.bit(spec.NET_F_CTRL_MAC_ADDR)
)
# Features that only make sense with a control queue (5.1.3.1).
_NEEDS_CTRL_VQ = (
    spec.NET_F_CTRL_RX,
    spec.NET_F_MQ,
    spec.NET_F_CTRL_MAC_ADDR,
    spec.NET_F_CTRL_GUEST_OFFLOADS,
)


@dataclasses.dataclass(slots=True)
class OffloadStats:
    """What the offloads did, for logs and tests."""

    tx_gso: int = 0  # guest TX packets handed on whole for the host to segment
    tx_csum: int = 0  # ... with a checksum for the host to finish
    tx_refused: int = 0  # TX headers asking for what was not negotiated: dropped
    rx_gso: int = 0  # RX packets given to the driver as one large segment
    rx_csum_partial: int = 0  # ... with a checksum for the driver to finish (NEEDS_CSUM)
    rx_csum_finished: int = 0  # checksums finished here for a driver without GUEST_CSUM
    rx_refused: int = 0  # GSO packets for a driver that cannot take them: dropped


@dataclasses.dataclass(frozen=True, slots=True)
class NetConfig:
    mac: bytes
    max_pairs: int = 2
    mtu: int = 1500
    queue_size: int = 256
    link_up: bool = True


class VirtioNetDevice(VirtioPciDevice):
    def __init__(self, identity: PciIdentity, net: NetConfig, backend: FrameBackend) -> None:
        if len(net.mac) != 6 or not 1 <= net.max_pairs <= 16:
            raise ValueError("a MAC is 6 bytes; 1-16 queue pairs")
        num_queues = 2 * net.max_pairs + 1
        self.backend = backend  # before the transport: a failed build closes it (on_close)
        offloads = backend.offloads & offload.OFFLOAD_FEATURES if backend.vnet_hdr else 0
        super().__init__(
            identity,
            device_features=NET_FEATURES | offloads,
            num_queues=num_queues,
            queue_size=net.queue_size,
            msix_vectors=num_queues + 1,  # one per queue and one for config changes
            device_cfg_size=spec.NET_CFG_SIZE,
        )
        self.net = net
        self.link_up = net.link_up
        self.control = NetControl(RxFilter(net.mac), net.max_pairs)
        self.ctrl_queue = self.queues[-1]
        # (first 10 header bytes, frame): num_buffers is known only once placed
        self.rx_backlog: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._rx_room = trio.Event()
        self.rx_dropped = 0
        self.offload_stats = OffloadStats()

    # --- features and config --------------------------------------------------------

    def validate_features(self, features: int) -> str | None:
        if not features & spec.bit(spec.NET_F_CTRL_VQ):
            for needed in _NEEDS_CTRL_VQ:
                if features & spec.bit(needed):
                    return f"feature {needed} needs CTRL_VQ"
        return offload.features_problem(features)

    def device_config_read(self, offset: int, size: int) -> bytes:
        status = spec.NET_S_LINK_UP if self.link_up else 0
        image = self.control.filter.mac + struct.pack(
            "<HHH", status, self.net.max_pairs, self.net.mtu
        )
        return image[offset : offset + size]

    def set_link(self, up: bool) -> None:
        """Host-side link state: the driver hears of it through a config interrupt."""
        if up == self.link_up:
            return
        self.link_up = up
        if not up:
            self.rx_backlog.clear()
            self._rx_room.set()  # background() may be parked on a full backlog
        self.config_changed()

    def set_mac(self, mac: bytes) -> None:
        """Host-side MAC (e.g. ip link set PF vf N mac): config and RX filter follow.

        It also survives a device reset, unlike a MAC the driver set with
        CTRL_MAC_ADDR_SET.
        """
        if len(mac) != 6:
            raise ValueError("a MAC is 6 bytes")
        self.net = dataclasses.replace(self.net, mac=mac)
        self.control.filter.mac = mac
        self.config_changed()

    def on_virtio_reset(self) -> None:
        self.control = NetControl(RxFilter(self.net.mac), self.net.max_pairs)
        self.rx_backlog.clear()
        self._rx_room.set()
        self.backend.set_offload(0)

    def rx_features(self) -> int:
        """The negotiated features with the driver's current GUEST_* offloads."""
        return self.control.rx_features(self.common.negotiated)

    def on_driver_ok(self) -> None:
        self.backend.set_offload(self.rx_features())
        self.deliver_rx()

    def on_resume(self) -> None:
        self.deliver_rx()

    # --- queues ----------------------------------------------------------------------

    def queue_notified(self, queue: SplitQueue) -> None:
        if queue is self.ctrl_queue:
            if self.has(spec.NET_F_CTRL_VQ):
                self.run_queue_safely(queue, self._serve_control)
        elif queue.index % 2:
            self.run_queue_safely(queue, self._serve_tx)
        else:
            self.deliver_rx()

    def _serve_tx(self, queue: SplitQueue) -> None:
        if drain_tx(self.dma, queue, self._transmit):
            self.notify_used(queue)

    def _transmit(self, packet: bytes) -> None:
        """One guest packet (virtio_net_hdr + frame) to the wire."""
        if not self.link_up:
            return
        if not self.backend.vnet_hdr:
            # No offload was offered: the header holds nothing the wire needs.
            self.backend.send(packet[spec.NET_HDR_SIZE :])
            return
        header = packet[: spec.NET_HDR_SIZE]
        if header != bytes(spec.NET_HDR_SIZE):
            stats = self.offload_stats
            if not offload.tx_header_ok(
                header, len(packet) - spec.NET_HDR_SIZE, self.common.negotiated
            ):
                stats.tx_refused += 1
                return
            stats.tx_csum += header[0] & spec.NET_HDR_F_NEEDS_CSUM
            stats.tx_gso += header[1] != spec.NET_HDR_GSO_NONE
        self.backend.send(packet)

    def _serve_control(self, queue: SplitQueue) -> None:
        served = False
        while (chain := queue.pop()) is not None:
            written = 0
            # Without an ack byte the driver could not learn the outcome: not executed.
            if chain.writable:
                ack = spec.NET_ERR
                if 2 <= chain.readable_len <= MAX_CTRL_REQUEST:
                    request = gather(self.dma, chain, MAX_CTRL_REQUEST)
                    ack = self.control.execute(request, self.common.negotiated)
                written = scatter(self.dma, chain, bytes([ack]))
            queue.push([(chain.head, written)])
            served = True
        if served:
            self.backend.set_offload(self.rx_features())  # CTRL_GUEST_OFFLOADS_SET may have moved
            self.notify_used(queue)

    # --- receive ---------------------------------------------------------------------

    def rx_queue_for(self, frame: bytes) -> SplitQueue:
        pairs = self.control.pairs if self.has(spec.NET_F_MQ) else 1
        if pairs == 1 or len(frame) < 14:
            return self.queues[0]
        ethertype = frame[12:14]
        if ethertype == b"\x08\x00" and len(frame) >= 34:
            key = frame[26:34]  # IPv4 source and destination
        elif ethertype == b"\x86\xdd" and len(frame) >= 54:
            key = frame[22:54]  # IPv6 source and destination
        else:
            return self.queues[0]
        h = zlib.crc32(key)
        h ^= h >> 16  # CRC low bits alone barely depend on the last bytes: fold
        h ^= h >> 8
        return self.queues[2 * (h % pairs)]

    def receive(self, packet: bytes) -> None:
        """A frame from the wire (behind its header, with vnet_hdr): filter it, queue it."""
        header, frame = NO_OFFLOAD, packet
        if self.backend.vnet_hdr:
            header, frame = packet[: spec.NET_HDR_SIZE], packet[spec.NET_HDR_SIZE :]
        if not self.driver_ok or not self.link_up or not self.control.filter.accepts(frame):
            self.rx_dropped += 1
            return
        if self.backend.vnet_hdr:
            fitted = self._fit_rx(header, frame)
            if fitted is None:
                self.rx_dropped += 1
                return
            header, frame = fitted
        self.rx_backlog.append((header, frame))
        self.deliver_rx()

    def _fit_rx(self, header: bytes, frame: bytes) -> tuple[bytes, bytes] | None:
        stats = self.offload_stats
        needs_csum = bool(header[0] & spec.NET_HDR_F_NEEDS_CSUM)
        fitted = offload.fit_rx_header(header, frame, self.rx_features())
        if fitted is None:
            stats.rx_refused += 1
            return None
        if fitted[0][1] != spec.NET_HDR_GSO_NONE:
            stats.rx_gso += 1
        if fitted[0][0] & spec.NET_HDR_F_NEEDS_CSUM:
            stats.rx_csum_partial += 1
        elif needs_csum:
            stats.rx_csum_finished += 1
        return fitted

    def deliver_rx(self) -> None:
        """Move backlog frames into RX buffers while there are some."""
        if not self.executing:
            return  # stopped for migration: frames wait (on_resume delivers them)
        mergeable = self.has(spec.NET_F_MRG_RXBUF)
        notify: set[int] = set()
        while self.rx_backlog and self.driver_ok:
            header, frame = self.rx_backlog[0]
            queue = self.rx_queue_for(frame)
            if not queue.enabled or queue.broken is not None:
                self.rx_backlog.popleft()
                self.rx_dropped += 1
                continue
            try:
                placed = place_rx(self.dma, queue, frame, mergeable, header)
            except VirtqError as exc:
                self.queue_failed(queue, queue.fail(exc))
                break
            if placed is None:
                break  # wait for the driver to add buffers (it kicks the RX queue)
            self.rx_backlog.popleft()
            if placed:
                notify.add(queue.index)
            else:
                self.rx_dropped += 1
        for index in sorted(notify):
            self.notify_used(self.queues[index])
        if len(self.rx_backlog) < RX_BACKLOG:
            self._rx_room.set()

    async def background(self) -> None:
        """Feed frames from the backend, pausing while the backlog is full."""
        while True:
            while len(self.rx_backlog) >= RX_BACKLOG:
                self._rx_room = trio.Event()
                await self._rx_room.wait()
            frame = await self.backend.receive()
            self.receive(frame)

    # --- migration (for a device type that sets migration_flags) --------------------

    def save_state(self) -> bytes:
        return state.save(self)

    def load_state(self, data: bytes) -> None:
        state.load(self, data)
        if self.driver_ok:  # the backend hands over what the migrated driver takes
            self.backend.set_offload(self.rx_features())

    def on_close(self) -> None:
        self.backend.close()

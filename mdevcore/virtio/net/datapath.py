"""The virtio-net datapath: TX chains to frames, frames into RX buffers.

TX (5.1.6.2): each chain is a virtio_net_hdr followed by the frame, all
device-readable.  The whole packet, header included, goes to ``send``
(the device decides whether the header travels on: offload.py); a chain
shorter than the header, or longer than a 64 KiB frame, is dropped
(returned unused) rather than sent.

RX (5.1.6.3, 5.1.6.4): the frame, prefixed by a header whose num_buffers
says how many chains it took.  With VIRTIO_NET_F_MRG_RXBUF a frame spans
as many chains as it needs, each filled before the next; without it one
chain must hold it all.  Every chain of a frame is published with one used
idx update, so the driver never sees part of a frame.  RX chains must be
device-writable only; anything else is a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable

from mdevcore.virtio import spec
from mdevcore.virtio.chain import Chain, GuestMemory, VirtqError, gather, scatter
from mdevcore.virtio.virtqueue import SplitQueue

MAX_TX_FRAME = 65535 + 18


def drain_tx(mem: GuestMemory, queue: SplitQueue, send: Callable[[bytes], None]) -> int:
    """Send every frame the driver queued on ``queue``; returns how many chains were used."""
    used = 0
    while (chain := queue.pop()) is not None:
        length = chain.readable_len
        if spec.NET_HDR_SIZE <= length <= spec.NET_HDR_SIZE + MAX_TX_FRAME:
            send(gather(mem, chain, spec.NET_HDR_SIZE + MAX_TX_FRAME))
        queue.push([(chain.head, 0)])
        used += 1
    return used


NO_OFFLOAD = bytes(spec.NET_HDR_SIZE - 2)  # flags 0, GSO_NONE: a plain frame


def rx_header(num_buffers: int, base: bytes = NO_OFFLOAD) -> bytes:
    """``base`` (the header's first 10 bytes) with num_buffers."""
    return base + num_buffers.to_bytes(2, "little")


def _rx_chain(queue: SplitQueue) -> Chain | None:
    chain = queue.pop()
    if chain is not None and (chain.readable or not chain.writable):
        raise VirtqError(f"rx queue {queue.index}: chain {chain.head} is not device-writable")
    return chain


def place_rx(
    mem: GuestMemory, queue: SplitQueue, frame: bytes, mergeable: bool, header: bytes = NO_OFFLOAD
) -> bool | None:
    """Put ``frame`` into ``queue``'s buffers, behind ``header`` (10 bytes) + num_buffers.

    True: delivered.  None: not enough buffers yet (nothing consumed; try
    again after the driver adds some).  False: it can never fit (without
    MRG_RXBUF, the next buffer is too small): the caller drops the frame.
    """
    need = spec.NET_HDR_SIZE + len(frame)
    chains: list[Chain] = []
    room = 0
    while room < need:
        chain = _rx_chain(queue)
        if chain is None:
            queue.unpop(len(chains))
            return None
        chains.append(chain)
        room += chain.writable_len
        if not mergeable and room < need:
            queue.unpop(len(chains))
            return False
    data = rx_header(len(chains), header) + frame
    used = []
    offset = 0
    for chain in chains:
        written = scatter(mem, chain, memoryview(data)[offset:])
        used.append((chain.head, written))
        offset += written
    queue.push(used)
    return True

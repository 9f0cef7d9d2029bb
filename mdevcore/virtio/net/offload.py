"""Checksum and segmentation offloads: which features go together, and the header checks.

With offloads, the virtio_net_hdr in front of each frame means something
(5.1.6.2, 5.1.6.4): on TX the driver may leave the L4 checksum to the
device (NEEDS_CSUM: csum_start/csum_offset) and hand over one large TCP
segment to be cut into ``gso_size`` pieces; on RX the device may do the
same towards the driver.  A backend that passes the header through (a
TAP with IFF_VNET_HDR) lets the host kernel do the work, so the device
offers these features only with such a backend.

A driver that negotiated CTRL_GUEST_OFFLOADS may switch its GUEST_*
offloads off and on again (control.py); the RX side then follows the
current set, not the negotiated one.

Everything here is pure: the device checks each TX header from the guest
against what was negotiated (a header the device could not honour is
refused, the frame dropped), and makes each RX header fit what the
driver accepted (a checksum the driver did not offer to finish is
finished here; a GSO frame it cannot take is refused).
"""

from __future__ import annotations

from mdevcore.virtio import spec

GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

# Feature -> what it needs (5.1.3.1 "Feature bit requirements").
REQUIRES: dict[int, tuple[int, ...]] = {
    spec.NET_F_GUEST_TSO4: (spec.NET_F_GUEST_CSUM,),
    spec.NET_F_GUEST_TSO6: (spec.NET_F_GUEST_CSUM,),
    spec.NET_F_GUEST_ECN: (spec.NET_F_GUEST_TSO4, spec.NET_F_GUEST_TSO6),  # either
    spec.NET_F_HOST_TSO4: (spec.NET_F_CSUM,),
    spec.NET_F_HOST_TSO6: (spec.NET_F_CSUM,),
    spec.NET_F_HOST_ECN: (spec.NET_F_HOST_TSO4, spec.NET_F_HOST_TSO6),  # either
}

# The offloads a driver may switch at run time (CTRL_GUEST_OFFLOADS, 5.1.6.5.6).
GUEST_OFFLOADS = (
    spec.bit(spec.NET_F_GUEST_CSUM)
    | spec.bit(spec.NET_F_GUEST_TSO4)
    | spec.bit(spec.NET_F_GUEST_TSO6)
    | spec.bit(spec.NET_F_GUEST_ECN)
    | spec.bit(spec.NET_F_GUEST_UFO)
)

OFFLOAD_FEATURES = (
    spec.bit(spec.NET_F_CSUM)
    | spec.bit(spec.NET_F_CTRL_GUEST_OFFLOADS)
    | spec.bit(spec.NET_F_GUEST_CSUM)
    | spec.bit(spec.NET_F_HOST_TSO4)
    | spec.bit(spec.NET_F_HOST_TSO6)
    | spec.bit(spec.NET_F_HOST_ECN)
    | spec.bit(spec.NET_F_GUEST_TSO4)
    | spec.bit(spec.NET_F_GUEST_TSO6)
    | spec.bit(spec.NET_F_GUEST_ECN)
)


def features_problem(features: int) -> str | None:
    """Why ``features`` is not a consistent offload set (None: it is)."""
    for feature, needs in REQUIRES.items():
        if features & spec.bit(feature) and not any(features & spec.bit(n) for n in needs):
            return f"feature {feature} needs one of {list(needs)}"
    return None


def _has(features: int, feature: int) -> bool:
    return bool(features & spec.bit(feature))


def _gso_allowed(gso_type: int, features: int, tso4: int, tso6: int, ecn: int) -> bool:
    """Whether a header's gso_type is one the negotiated features allow."""
    base = gso_type & ~GSO_ECN
    if gso_type & GSO_ECN and not _has(features, ecn):
        return False
    if base == GSO_TCPV4:
        return _has(features, tso4)
    if base == GSO_TCPV6:
        return _has(features, tso6)
    return False  # UFO/USO: never offered


def tx_header_ok(header: bytes, frame_len: int, features: int) -> bool:
    """May the device pass this guest TX header on?  (Untrusted: every field checked.)"""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset, _ = spec.NET_HDR.unpack(header)
    if flags & ~spec.NET_HDR_F_NEEDS_CSUM:
        return False  # DATA_VALID/RSC_INFO are the device's to set, never the driver's
    if flags & spec.NET_HDR_F_NEEDS_CSUM:
        if not _has(features, spec.NET_F_CSUM) or csum_start + csum_offset + 2 > frame_len:
            return False
    if gso_type == spec.NET_HDR_GSO_NONE:
        return True
    if not flags & spec.NET_HDR_F_NEEDS_CSUM or gso_size == 0:
        return False  # a segment the device must cut always has its checksum to finish
    return _gso_allowed(
        gso_type, features, spec.NET_F_HOST_TSO4, spec.NET_F_HOST_TSO6, spec.NET_F_HOST_ECN
    )


def internet_checksum(data: bytes | memoryview) -> int:
    """RFC 1071: the complement of the ones'-complement sum of ``data``'s 16-bit words.

    2**16 is 1 modulo 0xFFFF, so the sum of the big-endian words is the
    whole buffer as one number modulo 0xFFFF (0 stands for 0xFFFF unless
    every byte is zero).
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    total = int.from_bytes(raw, "big") % 0xFFFF
    if total == 0 and any(raw):
        total = 0xFFFF
    return ~total & 0xFFFF


def finish_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> bool:
    """Do what NEEDS_CSUM asked: sum from csum_start, store at csum_start + csum_offset.

    The field holds the pseudo-header sum already (as the sender left it).
    False when the offsets do not fit the frame.
    """
    at = csum_start + csum_offset
    if at + 2 > len(frame) or csum_start >= len(frame):
        return False
    value = internet_checksum(memoryview(frame)[csum_start:])
    frame[at : at + 2] = value.to_bytes(2, "big")
    return True


def fit_rx_header(header: bytes, frame: bytes, features: int) -> tuple[bytes, bytes] | None:
    """An RX header (10 or 12 bytes, from the backend) made to fit ``features``.

    Returns (10-byte header, frame), the frame with its checksum finished
    if the driver did not take GUEST_CSUM; None when the frame cannot be
    given to this driver at all (GSO it did not negotiate).
    """
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = spec.NET_HDR.unpack(
        header[: spec.NET_HDR_SIZE].ljust(spec.NET_HDR_SIZE, b"\0")
    )
    guest_csum = _has(features, spec.NET_F_GUEST_CSUM)
    if gso_type != spec.NET_HDR_GSO_NONE and not _gso_allowed(
        gso_type, features, spec.NET_F_GUEST_TSO4, spec.NET_F_GUEST_TSO6, spec.NET_F_GUEST_ECN
    ):
        return None
    if not guest_csum:
        # Without GUEST_CSUM the device MUST set flags to zero (5.1.6.4.1).
        if flags & spec.NET_HDR_F_NEEDS_CSUM:
            finished = bytearray(frame)
            if not finish_checksum(finished, csum_start, csum_offset):
                return None
            frame = bytes(finished)
        flags, csum_start, csum_offset = 0, 0, 0
    flags &= spec.NET_HDR_F_NEEDS_CSUM | spec.NET_HDR_F_DATA_VALID
    if not flags & spec.NET_HDR_F_NEEDS_CSUM:
        csum_start = csum_offset = 0
    if gso_type == spec.NET_HDR_GSO_NONE:
        hdr_len = gso_size = 0
    out = spec.NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
    return out[: spec.NET_HDR_SIZE - 2], frame


def tun_offload_flags(features: int) -> int:
    """TUNSETOFFLOAD bits for what the driver takes on RX (GUEST_*), as QEMU's tap does."""
    if not _has(features, spec.NET_F_GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if _has(features, spec.NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if _has(features, spec.NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and _has(features, spec.NET_F_GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    return flags


# <linux/if_tun.h>
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

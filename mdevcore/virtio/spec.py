"""Virtio 1.x constants: status bits, feature bits, ring layout, PCI structures.

Numbers come from the virtio specification (OASIS virtio v1.2); names follow
it with the ``VIRTIO_``/``VIRTQ_`` prefixes dropped where the module says it.
"""

from __future__ import annotations

import struct

# --- device status (2.1) ---------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# --- device-independent feature bits (6) -----------------------------------
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40


def bit(feature: int) -> int:
    """The feature word mask of feature number ``feature``."""
    return 1 << feature


# --- split virtqueue layout (2.7) ------------------------------------------
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16  # le64 addr, le32 len, le16 flags, le16 next
DESC = struct.Struct("<QIHH")

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")  # le32 id, le32 len

# Alignment the driver must give each area (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
QUEUE_SIZE_MAX = 32768


def avail_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_bytes(size: int) -> int:
    """flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


# --- PCI transport (4.1) ----------------------------------------------------
PCI_VENDOR_ID = 0x1AF4
PCI_DEVICE_ID_MODERN_BASE = 0x1040  # + device type

PCI_CAP_COMMON_CFG = 1
PCI_CAP_NOTIFY_CFG = 2
PCI_CAP_ISR_CFG = 3
PCI_CAP_DEVICE_CFG = 4
PCI_CAP_PCI_CFG = 5
PCI_CAP_LEN = 16  # cap_vndr, cap_next, cap_len, cfg_type, bar, id, pad[2], offset, length
PCI_NOTIFY_CAP_LEN = 20  # + notify_off_multiplier

# struct virtio_pci_common_cfg offsets.
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34
COMMON_Q_NDATA = 0x38
COMMON_Q_RESET = 0x3A
COMMON_CFG_SIZE = 0x3C

ISR_QUEUE = 1
ISR_CONFIG = 2
MSI_NO_VECTOR = 0xFFFF

# --- virtio-net (5.1) ------------------------------------------------------
NET_DEVICE_TYPE = 1

NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_CTRL_GUEST_OFFLOADS = 2
NET_F_MTU = 3
NET_F_MAC = 5
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_GUEST_ECN = 9
NET_F_GUEST_UFO = 10
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_HOST_ECN = 13
NET_F_HOST_UFO = 14
NET_F_MRG_RXBUF = 15
NET_F_STATUS = 16
NET_F_CTRL_VQ = 17
NET_F_CTRL_RX = 18
NET_F_CTRL_VLAN = 19
NET_F_CTRL_RX_EXTRA = 20
NET_F_GUEST_ANNOUNCE = 21
NET_F_MQ = 22
NET_F_CTRL_MAC_ADDR = 23

# struct virtio_net_config offsets.
NET_CFG_MAC = 0
NET_CFG_STATUS = 6
NET_CFG_MAX_VQ_PAIRS = 8
NET_CFG_MTU = 10
NET_CFG_SIZE = 12
NET_S_LINK_UP = 1
NET_S_ANNOUNCE = 2

# struct virtio_net_hdr (with num_buffers: always present under VERSION_1).
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset, nbuf
NET_HDR_SIZE = NET_HDR.size  # 12
NET_HDR_F_NEEDS_CSUM = 1
NET_HDR_F_DATA_VALID = 2
NET_HDR_GSO_NONE = 0

# Control virtqueue (5.1.6.5): class, command, data..., ack (device-writable u8).
NET_OK = 0
NET_ERR = 1
NET_CTRL_RX = 0
NET_CTRL_RX_PROMISC = 0
NET_CTRL_RX_ALLMULTI = 1
NET_CTRL_RX_ALLUNI = 2
NET_CTRL_RX_NOMULTI = 3
NET_CTRL_RX_NOUNI = 4
NET_CTRL_RX_NOBCAST = 5
NET_CTRL_MAC = 1
NET_CTRL_MAC_TABLE_SET = 0
NET_CTRL_MAC_ADDR_SET = 1
NET_CTRL_VLAN = 2
NET_CTRL_ANNOUNCE = 3
NET_CTRL_ANNOUNCE_ACK = 0
NET_CTRL_MQ = 4
NET_CTRL_MQ_VQ_PAIRS_SET = 0
NET_CTRL_MQ_VQ_PAIRS_MIN = 1
NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
NET_CTRL_GUEST_OFFLOADS = 5
NET_CTRL_GUEST_OFFLOADS_SET = 0

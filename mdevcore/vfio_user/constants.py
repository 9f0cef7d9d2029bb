"""vfio-user protocol numbers (QEMU docs/interop/vfio-user.rst).

The VFIO flag values shared with devices live in ``backend.py``; this module
holds what only the wire needs: command numbers, header flags, limits.
"""

from __future__ import annotations

import enum


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags: bits 0-3 are the message type.
FLAG_TYPE_MASK = 0xF
FLAG_COMMAND = 0x0
FLAG_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

HEADER_SIZE = 16

# Protocol version this server speaks.  Major must match; the reply carries
# min(client minor, ours), as libvfio-user does.
VERSION_MAJOR = 0
VERSION_MINOR = 2

# What the server offers in its VERSION reply.
SERVER_MAX_MSG_FDS = 8
SERVER_MAX_DATA_XFER_SIZE = 1 << 20
SERVER_PGSIZES = 4096
SERVER_MAX_DMA_MAPS = 65535

# Defaults a peer must assume when the capability is absent.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
# libvfio-user refuses clients announcing more fds per message than this.
CLIENT_MAX_MSG_FDS_LIMIT = 1024

# REGION_WRITE_MULTI: entries carry at most 8 bytes; QEMU sends <= 200.
WRITE_MULTI_DATA_SIZE = 8
WRITE_MULTI_MAX = 200

# Slack above max_data_xfer_size for the largest fixed part of any message
# (REGION_WRITE header + body is 32 bytes; WRITE_MULTI is 8 + 200 * 24).
MSG_SIZE_SLACK = 8192

# vfio_info_cap_header ids for region info
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_CAP_TYPE = 2

# DMA_MAP flags beyond READ/WRITE that libvfio-user defines (accepted).
DMA_MAP_FLAG_MMAP = 1 << 2
DMA_MAP_FLAG_FILE_IO = 1 << 3

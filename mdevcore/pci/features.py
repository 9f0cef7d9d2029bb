"""DEVICE_FEATURE for a PCI device: migration and DMA dirty logging.

The engine has checked the request's structure (known flag bits, exactly
one of GET/SET unless PROBE); this module knows which features the device
offers, which operations each supports, and parses their payloads
(include/uapi/linux/vfio.h: vfio_device_feature_migration,
_mig_state, _dma_logging_control/_range/_report).
"""

from __future__ import annotations

import errno
import struct

from mdevcore.pci.dma import DirtyLog, DmaTable
from mdevcore.pci.mig_session import MigrationSession
from mdevcore.vfio_user import backend as vfio

DEVICE_FEATURE_MIG_DATA_SIZE = 9
_GET, _SET = vfio.DEVICE_FEATURE_GET, vfio.DEVICE_FEATURE_SET
_MAX_BITMAP_BYTES = 256 << 20
_MAX_LOG_RANGES = 1 << 16
_MAX_PAGE_SIZE = 1 << 30
_MIN_LOG_PAGE = 4096  # the device logs at least at this granularity

# Offered features -> the GET/SET operations each supports (migratable devices).
_MIGRATION_FEATURES = {
    vfio.DEVICE_FEATURE_MIGRATION: _GET,
    vfio.DEVICE_FEATURE_MIG_DEVICE_STATE: _GET | _SET,
    DEVICE_FEATURE_MIG_DATA_SIZE: _GET,
    vfio.DEVICE_FEATURE_DMA_LOGGING_START: _SET,
    vfio.DEVICE_FEATURE_DMA_LOGGING_STOP: _SET,
    vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT: _GET,
}


def device_feature(
    session: MigrationSession | None, dma: DmaTable, flags: int, data: bytes
) -> bytes:
    """The reply payload (after argsz/flags) for one DEVICE_FEATURE request."""
    feature = flags & vfio.DEVICE_FEATURE_MASK
    ops = flags & (_GET | _SET)
    offered = _MIGRATION_FEATURES if session is not None else {}
    if feature not in offered:
        raise OSError(errno.ENOTTY, f"feature {feature} not offered")
    if ops & ~offered[feature]:
        raise OSError(errno.EINVAL, f"feature {feature} does not support {ops:#x}")
    if flags & vfio.DEVICE_FEATURE_PROBE:
        return b""
    assert session is not None
    if feature == vfio.DEVICE_FEATURE_MIGRATION:
        return struct.pack("<Q", session.flags)
    if feature == vfio.DEVICE_FEATURE_MIG_DEVICE_STATE:
        if ops == _SET:
            if len(data) < 4:
                raise OSError(errno.EINVAL, "MIG_DEVICE_STATE needs a device_state")
            (wanted,) = struct.unpack_from("<I", data)
            session.set_state(wanted)
        return struct.pack("<Ii", session.state, -1)  # no data_fd over vfio-user
    if feature == DEVICE_FEATURE_MIG_DATA_SIZE:
        return struct.pack("<Q", session.data_size())
    if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_START:
        return _logging_start(dma, data)
    if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_STOP:
        dma.dirty = None
        return b""
    return _logging_report(dma, data)


def _is_page_size(size: int) -> bool:
    return 0 < size <= _MAX_PAGE_SIZE and not size & (size - 1)


def _logging_start(dma: DmaTable, data: bytes) -> bytes:
    if len(data) < 16:
        raise OSError(errno.EINVAL, "DMA_LOGGING_START payload too short")
    page_size, num_ranges, _reserved = struct.unpack_from("<QII", data)
    if num_ranges > _MAX_LOG_RANGES or len(data) != 16 + 16 * num_ranges:
        raise OSError(errno.EINVAL, f"DMA_LOGGING_START with {num_ranges} ranges")
    if not _is_page_size(page_size):
        raise OSError(errno.EINVAL, f"bad dirty page size {page_size}")
    page_size = max(page_size, _MIN_LOG_PAGE)  # the device may raise it; the reply says so
    ranges: list[tuple[int, int]] = []
    for i in range(num_ranges):
        iova, length = struct.unpack_from("<QQ", data, 16 + 16 * i)
        if length == 0 or iova + length > 1 << 64:
            raise OSError(errno.EINVAL, f"bad logging range {iova:#x}+{length:#x}")
        ranges.append((iova, length))
    ranges.sort()
    for (a, alen), (b, _) in zip(ranges, ranges[1:], strict=False):
        if a + alen > b:
            raise OSError(errno.EINVAL, "overlapping logging ranges")
    if dma.dirty is not None:
        raise OSError(errno.EBUSY, "DMA logging already started")
    dma.dirty = DirtyLog(page_size, ranges)
    return struct.pack("<QII", page_size, num_ranges, 0) + data[16:]


def _logging_report(dma: DmaTable, data: bytes) -> bytes:
    if len(data) < 24:
        raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT payload too short")
    iova, length, page_size = struct.unpack_from("<QQQ", data)
    log = dma.dirty
    if log is None:
        raise OSError(errno.EINVAL, "DMA logging not started")
    # Any power-of-two page size: the log's bits are spread or merged to it.
    if not _is_page_size(page_size) or iova % page_size or length % page_size or not length:
        raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT range/page size mismatch")
    if iova + length > 1 << 64 or length // page_size > _MAX_BITMAP_BYTES * 8:
        raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT range too large")
    return struct.pack("<QQQ", iova, length, page_size) + log.report(iova, length, page_size)

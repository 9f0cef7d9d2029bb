"""The DMA table: guest memory the client mapped for the device.

The analogue of the kernel's vfio_pin_pages: DMA_MAP records an IOVA range
(mmapping the client's fd when one came along), DMA_UNMAP forgets it, and
:meth:`DmaTable.translate` turns an IOVA range into a memoryview of guest
memory, strictly inside one mapping and with the right permission.

Lifetime: a view handed out by translate() keeps its mmap alive.  Unmapping
while a view exists never crashes: the table drops its reference and tries
to close the mmap; if views still export it, the mapping lingers until the
last view is released (Python unmaps it then).  Devices should therefore
hold views only for the duration of one access.

Dirty logging (DMA_LOGGING_START/REPORT) records the pages a device wrote
through translate(write=True) or PciDevice.dma_write.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import logging
import mmap

from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DmaMapping

log = logging.getLogger(__name__)

MAX_IOVA = 1 << 64
DEFAULT_MAX_DMA_MAPS = 65535


@dataclasses.dataclass(slots=True)
class DmaRegion:
    """One DMA_MAP'ed range; ``memory`` is None for message-based DMA."""

    iova: int
    size: int
    flags: int
    memory: memoryview | None
    _mmap: mmap.mmap | None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & vfio.DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & vfio.DMA_MAP_FLAG_WRITE)

    def release(self, owner: str = "") -> None:
        view, self.memory = self.memory, None
        if view is not None:
            view.release()
        region, self._mmap = self._mmap, None
        if region is None:
            return
        try:
            region.close()
        except BufferError:
            # A device still holds a view; the mmap goes away with it.
            log.debug(
                "[%s] DMA %#x+%#x unmapped while a view is alive", owner, self.iova, self.size
            )


class DirtyLog:
    """Pages written by the device since the last report, per page size."""

    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        self.page_size = page_size
        self.ranges = ranges  # sorted, non-overlapping; empty: log everything
        self.pages: set[int] = set()

    def mark(self, iova: int, length: int) -> None:
        """Record a device write, only where the client asked for logging."""
        if length <= 0:
            return
        if not self.ranges:
            self._mark_pages(iova, iova + length)
            return
        end = iova + length
        for start, size in self.ranges:
            lo, hi = max(start, iova), min(start + size, end)
            if lo < hi:
                self._mark_pages(lo, hi)

    def _mark_pages(self, start: int, end: int) -> None:
        first = start // self.page_size
        last = (end - 1) // self.page_size
        self.pages.update(range(first, last + 1))

    def report(self, iova: int, length: int, page_size: int | None = None) -> bytes:
        """Bitmap (u64 words) of dirty ``page_size`` pages in [iova, iova+length).

        The client may ask for any page size, not only the one logging runs
        at: each logged page sets every requested page it overlaps.  Logged
        pages wholly inside the range are cleared; one that straddles an end
        of the range stays dirty for the report that covers its other part
        (reporting a page twice is safe, missing one is not).
        """
        page_size = page_size or self.page_size
        lps = self.page_size
        end = iova + length
        first, last = iova // lps, (end - 1) // lps
        if len(self.pages) < last - first + 1:
            hits = sorted(p for p in self.pages if first <= p <= last)
        else:
            hits = [p for p in range(first, last + 1) if p in self.pages]
        npages = length // page_size
        bitmap = bytearray(((npages + 63) // 64) * 8)
        for page in hits:
            start, stop = page * lps, (page + 1) * lps
            if iova <= start and stop <= end:
                self.pages.discard(page)
            lo = (max(start, iova) - iova) // page_size
            hi = (min(stop, end) - 1 - iova) // page_size
            for bit in range(lo, hi + 1):
                bitmap[bit >> 3] |= 1 << (bit & 7)
        return bytes(bitmap)


class DmaTable:
    """IOVA -> guest memory mappings of one client (sorted, non-overlapping)."""

    def __init__(self, max_maps: int = DEFAULT_MAX_DMA_MAPS) -> None:
        self.max_maps = max_maps
        self.owner = ""  # the device's name, for logs
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self.dirty: DirtyLog | None = None

    def __len__(self) -> int:
        return len(self._regions)

    def regions(self) -> list[DmaRegion]:
        return list(self._regions)

    # --- DMA_MAP / DMA_UNMAP ---------------------------------------------

    def map(self, mapping: DmaMapping) -> None:
        iova, size, flags = mapping.address, mapping.size, mapping.flags
        if size <= 0 or iova < 0 or iova + size > MAX_IOVA:
            raise OSError(errno.EINVAL, f"bad DMA range {iova:#x}+{size:#x}")
        if flags & ~(vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE) or not flags:
            raise OSError(errno.EINVAL, f"bad DMA_MAP flags {flags:#x}")
        if mapping.offset < 0:
            raise OSError(errno.EINVAL, "negative DMA file offset")
        pos = bisect.bisect_right(self._starts, iova)
        if pos > 0 and self._regions[pos - 1].end > iova:
            raise OSError(errno.EEXIST, f"DMA {iova:#x}+{size:#x} overlaps a mapping")
        if pos < len(self._regions) and self._regions[pos].iova < iova + size:
            raise OSError(errno.EEXIST, f"DMA {iova:#x}+{size:#x} overlaps a mapping")
        if len(self._regions) >= self.max_maps:
            raise OSError(errno.ENOSPC, f"more than {self.max_maps} DMA mappings")
        memory: memoryview | None = None
        region_map: mmap.mmap | None = None
        if mapping.fd is not None:
            region_map, memory = _map_fd(mapping.fd, mapping.offset, size, flags)
        region = DmaRegion(iova, size, flags, memory, region_map)
        self._starts.insert(pos, iova)
        self._regions.insert(pos, region)
        kind = "fd" if memory else "message"
        log.debug("[%s] DMA map %#x+%#x flags=%#x %s", self.owner, iova, size, flags, kind)

    def unmap(self, iova: int, size: int, flags: int) -> None:
        if flags & vfio.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise OSError(errno.EINVAL, "DMA_UNMAP dirty bitmaps (migration v1) unsupported")
        if flags & ~vfio.DMA_UNMAP_FLAG_ALL:
            raise OSError(errno.EINVAL, f"bad DMA_UNMAP flags {flags:#x}")
        if flags & vfio.DMA_UNMAP_FLAG_ALL:
            if iova or size:
                raise OSError(errno.EINVAL, "DMA_UNMAP_FLAG_ALL with an address or size")
            self.clear()
            return
        pos = bisect.bisect_left(self._starts, iova)
        if pos == len(self._regions) or self._regions[pos].iova != iova:
            raise OSError(errno.ENOENT, f"no DMA mapping at {iova:#x}")
        region = self._regions[pos]
        if region.size != size:
            raise OSError(errno.ENOENT, f"DMA {iova:#x}+{size:#x} matches no mapping exactly")
        del self._starts[pos]
        del self._regions[pos]
        region.release(self.owner)
        log.debug("[%s] DMA unmap %#x+%#x", self.owner, iova, size)

    def clear(self) -> None:
        regions, self._regions, self._starts = self._regions, [], []
        for region in regions:
            region.release(self.owner)

    # --- lookups -------------------------------------------------------------

    def find(self, iova: int, length: int, write: bool) -> DmaRegion:
        """The mapping holding all of [iova, iova+length) with the permission."""
        if length <= 0 or iova < 0:
            raise OSError(errno.EFAULT, f"bad DMA access {iova:#x}+{length}")
        pos = bisect.bisect_right(self._starts, iova) - 1
        if pos < 0:
            raise OSError(errno.EFAULT, f"DMA {iova:#x}+{length:#x} is not mapped")
        region = self._regions[pos]
        if iova + length > region.end:
            raise OSError(errno.EFAULT, f"DMA {iova:#x}+{length:#x} is not inside one mapping")
        if write and not region.writable or not write and not region.readable:
            kind = "write" if write else "read"
            raise OSError(errno.EFAULT, f"DMA {kind} at {iova:#x}: mapping does not allow it")
        return region

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        """Guest memory for [iova, iova+length); OSError(EFAULT) otherwise.

        Message-based mappings (no fd) cannot be translated (EFAULT); use
        PciDevice.dma_read/dma_write, which fall back to DMA messages.
        """
        region = self.find(iova, length, write)
        if region.memory is None:
            raise OSError(errno.EFAULT, f"DMA {iova:#x} is mapped without an fd")
        if write:
            self.mark_dirty(iova, length)
        start = iova - region.iova
        view = region.memory[start : start + length]
        return view if write else view.toreadonly()

    def mark_dirty(self, iova: int, length: int) -> None:
        if self.dirty is not None:
            self.dirty.mark(iova, length)


def _map_fd(fd: int, offset: int, size: int, flags: int) -> tuple[mmap.mmap, memoryview]:
    """mmap ``size`` bytes of ``fd`` at ``offset`` (any alignment), shared."""
    prot = mmap.PROT_READ
    if flags & vfio.DMA_MAP_FLAG_WRITE:
        prot |= mmap.PROT_WRITE
    page = mmap.ALLOCATIONGRANULARITY
    base = offset - offset % page
    skip = offset - base
    try:
        region = mmap.mmap(fd, skip + size, flags=mmap.MAP_SHARED, prot=prot, offset=base)
    except (ValueError, OverflowError) as exc:  # beyond the file, or absurd sizes
        raise OSError(errno.EINVAL, f"cannot map DMA fd: {exc}") from exc
    except OSError as exc:
        raise OSError(exc.errno or errno.EINVAL, f"cannot map DMA fd: {exc.strerror}") from exc
    return region, memoryview(region)[skip : skip + size]

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
from collections.abc import Callable

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
    def mapping(self) -> mmap.mmap | None:
        """The mmap behind ``memory`` (native code pins it; see mdevcore.nvme.fastio)."""
        return self._mmap

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


# Ranges up to this many pages get a bitmap (1 TiB at 4 KiB pages: 32 MiB of
# bits); larger ones, which only a hostile client asks for, log into a set
# whose size follows what the device actually writes.
_MAX_BITMAP_PAGES = 1 << 28


class _RangeBitmap:
    """Dirty bits of the pages [first, first + npages)."""

    __slots__ = ("first", "npages", "bits")

    def __init__(self, first: int, npages: int) -> None:
        self.first = first
        self.npages = npages
        self.bits = bytearray((npages + 7) // 8)

    def mark(self, p0: int, p1: int) -> None:
        """Pages p0..p1 (inclusive, already inside the range)."""
        bits = self.bits
        lo, hi = p0 - self.first, p1 - self.first
        if hi - lo < 64:
            for bit in range(lo, hi + 1):
                bits[bit >> 3] |= 1 << (bit & 7)
            return
        head, tail = (lo + 7) >> 3, (hi + 1) >> 3  # whole bytes in between
        for bit in range(lo, min(head << 3, hi + 1)):
            bits[bit >> 3] |= 1 << (bit & 7)
        bits[head:tail] = b"\xff" * (tail - head)
        for bit in range(max(tail << 3, lo), hi + 1):
            bits[bit >> 3] |= 1 << (bit & 7)

    def take(self, p0: int, p1: int) -> int:
        """The bits of pages p0..p1 as an int (bit 0 = p0), clearing them."""
        lo, n = p0 - self.first, p1 - p0 + 1
        byte0, byte1 = lo >> 3, (lo + n + 7) >> 3
        word = int.from_bytes(self.bits[byte0:byte1], "little")
        shift = lo & 7
        mask = (1 << n) - 1
        taken = (word >> shift) & mask
        if taken:
            word &= ~(mask << shift)
            self.bits[byte0:byte1] = word.to_bytes(byte1 - byte0, "little")
        return taken


class DirtyLog:
    """Pages written by the device since the last report, at ``page_size``.

    ``ranges`` (sorted, non-overlapping) are where the client asked for
    logging; empty means everywhere.
    """

    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        self.page_size = page_size
        self.ranges = ranges
        self.pages: set[int] = set()  # pages outside any bitmap (unbounded ranges)
        # Each range with its bitmap (None: too large, it logs into pages).
        self._logged: list[tuple[int, int, _RangeBitmap | None]] = []
        for start, size in ranges:
            first, last = start // page_size, (start + size - 1) // page_size
            small = last - first < _MAX_BITMAP_PAGES
            bitmap = _RangeBitmap(first, last - first + 1) if small else None
            self._logged.append((start, size, bitmap))
        self._maps = [b for _, _, b in self._logged if b is not None]
        self._starts = [start for start, _, _ in self._logged]

    def mark(self, iova: int, length: int) -> None:
        """Record a device write, only where the client asked for logging."""
        if length <= 0:
            return
        ps = self.page_size
        if not self.ranges:
            self.pages.update(range(iova // ps, (iova + length - 1) // ps + 1))
            return
        end = iova + length
        # Ranges are sorted and disjoint: start at the last one beginning at
        # or before iova (a client may log thousands of ranges).
        first = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        for start, size, bitmap in self._logged[first:]:
            if start >= end:
                break
            lo, hi = max(start, iova), min(start + size, end)
            if lo >= hi:
                continue
            p0, p1 = lo // ps, (hi - 1) // ps
            if bitmap is not None:
                bitmap.mark(p0, p1)
            else:
                self.pages.update(range(p0, p1 + 1))

    def _whole_bitmap(self, first: int, last: int) -> bytes | None:
        """A report of exactly one bitmap's pages, from a byte boundary: copy and clear."""
        if self.pages or len(self._maps) != 1:
            return None
        bitmap = self._maps[0]
        if first != bitmap.first or last != bitmap.first + bitmap.npages - 1:
            return None
        out = bytes(bitmap.bits)
        bitmap.bits[:] = bytes(len(bitmap.bits))
        return out

    def _take(self, first: int, last: int) -> int:
        """Dirty pages first..last as an int (bit 0 = first), clearing them."""
        found = 0
        for bitmap in self._maps:
            lo, hi = max(first, bitmap.first), min(last, bitmap.first + bitmap.npages - 1)
            if lo <= hi:
                found |= bitmap.take(lo, hi) << (lo - first)
        if self.pages:
            span = last - first + 1
            if len(self.pages) < span:
                hits = [p for p in self.pages if first <= p <= last]
            else:
                hits = [p for p in range(first, last + 1) if p in self.pages]
            for page in hits:
                found |= 1 << (page - first)
                self.pages.discard(page)
        return found

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
        nbytes = ((length // page_size + 63) // 64) * 8
        first, last = iova // lps, (end - 1) // lps
        if page_size == lps and iova % lps == 0:
            # The common case: the bits are the answer.
            whole = self._whole_bitmap(first, last)
            if whole is not None:
                return whole.ljust(nbytes, b"\0")
            return self._take(first, last).to_bytes(nbytes, "little")
        taken = self._take(first, last)
        out = 0
        keep = 0
        while taken:
            low = taken & -taken
            page = first + low.bit_length() - 1
            taken ^= low
            start, stop = page * lps, (page + 1) * lps
            if not (iova <= start and stop <= end):
                keep |= 1 << (page - first)
            lo = (max(start, iova) - iova) // page_size
            hi = (min(stop, end) - 1 - iova) // page_size
            out |= ((1 << (hi - lo + 1)) - 1) << lo
        if keep:
            self._restore(first, keep)
        return out.to_bytes(nbytes, "little")

    def _restore(self, first: int, bits: int) -> None:
        """Mark again pages a report read but could not clear."""
        while bits:
            low = bits & -bits
            page = first + low.bit_length() - 1
            bits ^= low
            self.mark(page * self.page_size, 1)

    def dirty_pages(self) -> set[int]:
        """Every page logged dirty (for tests and tools; does not clear)."""
        found = set(self.pages)
        for bitmap in self._maps:
            word = int.from_bytes(bitmap.bits, "little")
            while word:
                low = word & -word
                found.add(bitmap.first + low.bit_length() - 1)
                word ^= low
        return found


class DmaTable:
    """IOVA -> guest memory mappings of one client (sorted, non-overlapping)."""

    def __init__(self, max_maps: int = DEFAULT_MAX_DMA_MAPS) -> None:
        self.max_maps = max_maps
        self.owner = ""  # the device's name, for logs
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self.dirty: DirtyLog | None = None
        # The mapping the last lookup found: a device's accesses cluster in
        # guest RAM (one big mapping), so most skip the bisect.  Forgotten
        # by every unmap.
        self._last: DmaRegion | None = None
        # Called on every map, unmap and clear, before any mapping is
        # released: whoever keeps its own copy of the mappings (native code,
        # mdevcore.nvme.fastio) drops it, and what pins the old mmaps with
        # it (they close, and their fds with them, at once).
        self.watchers: list[Callable[[], None]] = []

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
        self._changed()
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
        self._last = None
        self._changed()
        region.release(self.owner)
        log.debug("[%s] DMA unmap %#x+%#x", self.owner, iova, size)

    def clear(self) -> None:
        regions, self._regions, self._starts = self._regions, [], []
        self._last = None
        self._changed()
        for region in regions:
            region.release(self.owner)

    def _changed(self) -> None:
        for watcher in self.watchers:
            watcher()

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
        region = self._last
        need = vfio.DMA_MAP_FLAG_WRITE if write else vfio.DMA_MAP_FLAG_READ
        if not (
            region is not None
            and length > 0
            and region.iova <= iova
            and iova + length <= region.iova + region.size
            and region.flags & need
        ):
            region = self._last = self.find(iova, length, write)
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

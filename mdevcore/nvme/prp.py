"""Guest memory access for the controller: the DMA interface and PRP walking.

The controller never holds a pointer into guest memory beyond one command:
every access goes through :meth:`DmaSpace.translate`, which checks that the
whole range lies inside one DMA mapping (``OSError(EFAULT)`` otherwise).  A
command whose PRPs point anywhere else completes with Data Transfer Error
and nothing is read or written, because all segments are translated before
any byte moves.
"""

from __future__ import annotations

import struct
from typing import Protocol

from mdevcore.nvme.spec import Generic, generic


class DmaSpace(Protocol):
    """Guest physical (IOVA) memory as the device may touch it."""

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        """A writable (or readable) view of ``length`` bytes at ``iova``.

        Raises OSError(EFAULT) when the range is not inside one mapping or the
        mapping lacks the requested permission.  A writable view counts as
        written: a space that logs dirty pages for migration (the device's
        DmaTable) logs it here, once, so the controller never has to.
        """
        ...


_PRP_ENTRY = struct.Struct("<Q")


def translate(dma: DmaSpace, iova: int, length: int, write: bool) -> memoryview:
    """``dma.translate`` with failures turned into Data Transfer Error.

    Every controller access to guest memory comes through here; writable
    views are logged dirty by the DMA space itself (see DmaSpace).
    """
    try:
        return dma.translate(iova, length, write)
    except (OSError, ValueError, OverflowError) as exc:
        raise generic(Generic.DATA_TRANSFER_ERROR, f"DMA {iova:#x}+{length:#x}: {exc}") from exc


def prp_segments(
    dma: DmaSpace, prp1: int, prp2: int, length: int, page_size: int
) -> list[tuple[int, int]]:
    """The (iova, length) pieces a PRP1/PRP2 pair describes for ``length`` bytes.

    Rules (NVMe 1.4, 4.3): PRP1 may start anywhere dword-aligned in a page;
    every later data entry must be page-aligned.  When the rest fits in one
    page PRP2 is that page, otherwise PRP2 points to a PRP list whose last
    entry in each list page chains to the next list page.
    """
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise generic(Generic.PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} not dword aligned")
    first = min(length, page_size - (prp1 & (page_size - 1)))
    segments = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return segments
    if remaining <= page_size:
        if prp2 & (page_size - 1):
            raise generic(Generic.PRP_OFFSET_INVALID, f"PRP2 {prp2:#x} has an offset")
        segments.append((prp2, remaining))
        return segments
    list_ptr = prp2
    while remaining > 0:
        if list_ptr & 0x7:
            raise generic(Generic.PRP_OFFSET_INVALID, f"PRP list {list_ptr:#x} not qword aligned")
        room = (page_size - (list_ptr & (page_size - 1))) // 8
        needed = -(-remaining // page_size)
        count = min(needed, room)
        if needed > room and room < 2:
            # A list page with room for only the chain pointer would move no data.
            raise generic(
                Generic.PRP_OFFSET_INVALID, f"PRP list {list_ptr:#x} too close to page end"
            )
        view = translate(dma, list_ptr, count * 8, False)
        try:
            raw = bytes(view)
        finally:
            view.release()
        entries = [e for (e,) in _PRP_ENTRY.iter_unpack(raw)]
        data_entries = entries if needed <= room else entries[:-1]
        for entry in data_entries:
            if entry & (page_size - 1):
                raise generic(Generic.PRP_OFFSET_INVALID, f"PRP entry {entry:#x} has an offset")
            piece = min(remaining, page_size)
            segments.append((entry, piece))
            remaining -= piece
        if remaining > 0:
            list_ptr = entries[-1]
    return segments


def map_segments(dma: DmaSpace, segments: list[tuple[int, int]], write: bool) -> list[memoryview]:
    """Translate every segment first, so a bad one means no byte was moved.

    The caller releases the views when done (a mapping with exported views
    cannot be unmapped).
    """
    views: list[memoryview] = []
    try:
        for iova, length in segments:
            views.append(translate(dma, iova, length, write))
    except BaseException:
        release(views)
        raise
    return views


def data_views(
    dma: DmaSpace, prp1: int, prp2: int, length: int, page_size: int, write: bool
) -> list[memoryview]:
    """``map_segments(prp_segments(...))``, with the commonest case first.

    A transfer inside PRP1's page (every 4 KiB I/O of a page-aligned
    buffer) is one translation; anything else takes the general walk.
    """
    if 0 < length <= page_size - (prp1 & (page_size - 1)) and not prp1 & 0x3:
        return [translate(dma, prp1, length, write)]
    return map_segments(dma, prp_segments(dma, prp1, prp2, length, page_size), write)


def release(views: list[memoryview]) -> None:
    for view in views:
        view.release()


def read_guest(dma: DmaSpace, prp1: int, prp2: int, length: int, page_size: int) -> bytes:
    views = map_segments(dma, prp_segments(dma, prp1, prp2, length, page_size), False)
    try:
        return b"".join(bytes(v) for v in views)
    finally:
        release(views)


def write_guest(dma: DmaSpace, prp1: int, prp2: int, data: bytes, page_size: int) -> None:
    views = map_segments(dma, prp_segments(dma, prp1, prp2, len(data), page_size), True)
    try:
        pos = 0
        for view in views:
            view[:] = data[pos : pos + len(view)]
            pos += len(view)
    finally:
        release(views)

"""The controller's common case in C: Read/Write of I/O queues (``fastio.c``).

Fetching, decoding, translating and posting in Python is most of a 4 KiB
read's cost from doorbell to interrupt (``benchmarks/nvme_controller.py``
prints both paths).  The C loop takes only the commands it can finish
with status Success and leaves everything else, errors included, to the
Python path (mdevcore.nvme.nvm), which stays the one place a status is
decided.

The extension is compiled by ``python -m mdevcore.nvme.fastio_build``
(setup.sh does it).  Without it, or when it was built from another
``fastio.c``, :func:`load` returns None and the controller runs in Python
alone.  ``MDEVCORE_NVME_FASTIO=0`` turns it off for a process.

Memory: the C tables point into the DMA table's mmaps, each pinned by a
buffer export while the copy exists.  The table tells its watchers of
every map, unmap and clear before it releases anything: the copy and its
pins go at once (an unmapped mmap closes, and its fd with it), and the
next command rebuilds the copy, so no DMA reaches a range the client has
unmapped.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdevcore.nvme.logpages import SmartCounters
from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.queues import CompletionQueue, SubmissionQueue
from mdevcore.pci.dma import DmaTable

log = logging.getLogger(__name__)

EXTENSION = "_mdevcore_nvme_fastio"
SOURCE_FILE = Path(__file__).with_name("fastio.c")

CDEF = """
struct nf_region { uint64_t iova; uint64_t size; uint8_t *host; uint32_t flags; };
struct nf_ns { int direct_fd; int fd; uint64_t nlbas; uint32_t lba_shift; uint32_t write_through; };
struct nf_ctx {
    struct nf_region *regions; uint32_t nregions; uint32_t last;
    struct nf_ns *ns; uint32_t nns;
    uint32_t page_size; uint64_t max_transfer;
    uint64_t bytes_read, bytes_written, reads, writes;
    uint64_t aio; uint32_t aio_broken; uint64_t batched;
};
struct nf_queue {
    uint64_t sq_base; uint32_t sq_size, sq_head, sq_tail, sqid;
    uint64_t cq_base; uint32_t cq_size, cq_head, cq_tail, cq_phase;
};
uint32_t nf_run(struct nf_ctx *c, struct nf_queue *q, uint32_t limit);
void nf_close(struct nf_ctx *c);
"""


def source_digest() -> str:
    """What an extension must have been built from to be used."""
    return hashlib.sha256(SOURCE_FILE.read_bytes() + CDEF.encode()).hexdigest()[:16]


@functools.cache
def load() -> tuple[Any, Any] | None:
    """The extension's (ffi, lib), or None when it is off, missing or stale."""
    if os.environ.get("MDEVCORE_NVME_FASTIO", "1") == "0":
        return None
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError:
        log.info("NVMe fast I/O module not built (python -m mdevcore.nvme.fastio_build)")
        return None
    built = module.ffi.string(module.lib.nf_digest()).decode()
    expected = source_digest() if SOURCE_FILE.exists() else "missing"
    if built != expected:
        log.warning(
            "NVMe fast I/O module is stale (built from %s, source is %s): not used; "
            "rebuild with python -m mdevcore.nvme.fastio_build",
            built,
            expected,
        )
        return None
    return module.ffi, module.lib


class FastIo:
    """The C loop bound to one controller's DMA table and namespaces."""

    def __init__(
        self,
        dma: DmaTable,
        namespaces: Sequence[FileNamespace],
        smart: SmartCounters,
        max_transfer: int,
        ffi_lib: tuple[Any, Any],
    ) -> None:
        self._ffi, self._lib = ffi_lib
        ffi = self._ffi
        self._dma = dma
        self._namespaces = list(namespaces)
        self._smart = smart
        self._ctx = ffi.new("struct nf_ctx *")
        self._queue = ffi.new("struct nf_queue *")
        self._ns = ffi.new("struct nf_ns[]", max(len(self._namespaces), 1))
        for entry, ns in zip(self._ns, self._namespaces, strict=False):
            direct, buffered = ns.fds()
            entry.direct_fd = -1 if direct is None else direct
            entry.fd = buffered
            entry.nlbas = ns.nlbas
            entry.lba_shift = ns.lba_size.bit_length() - 1
        self._ctx.ns = self._ns
        self._ctx.nns = len(self._namespaces)
        self._ctx.max_transfer = max_transfer
        self._regions: Any = None  # the C copy of the DMA table; None: build it first
        self._pins: list[Any] = []
        self.commands = 0  # completed in C (tests and profiles: did it run?)
        dma.watchers.append(self._forget)

    @property
    def batched(self) -> int:
        """Of :attr:`commands`, those that went to the kernel together (Linux AIO)."""
        return int(self._ctx.batched)

    def close(self) -> None:
        """Unpin every mapping and end the AIO context (the controller is going away)."""
        self._lib.nf_close(self._ctx)
        self._forget()
        if self._forget in self._dma.watchers:
            self._dma.watchers.remove(self._forget)

    def _forget(self) -> None:
        """The DMA table changed: drop the copy (rebuilt on the next run) and its pins."""
        self._ctx.regions = self._ffi.NULL
        self._ctx.nregions = 0
        self._regions = None
        for pin in self._pins:
            self._ffi.release(pin)
        self._pins = []

    def _load_regions(self) -> None:
        ffi = self._ffi
        regions = self._dma.regions()
        table = ffi.new("struct nf_region[]", max(len(regions), 1))
        for entry, region in zip(table, regions, strict=False):
            entry.iova, entry.size, entry.flags = region.iova, region.size, region.flags
            if region.memory is None or region.mapping is None:
                entry.host = ffi.NULL  # message-based DMA: the Python path's business
                continue
            self._pins.append(ffi.from_buffer(region.mapping))
            probe = ffi.from_buffer(region.memory)
            entry.host = ffi.cast("uint8_t *", probe)
            ffi.release(probe)
        self._regions = table
        self._ctx.regions = table
        self._ctx.nregions = len(regions)
        self._ctx.last = 0

    def run(self, sq: SubmissionQueue, cq: CompletionQueue, limit: int, page_size: int) -> int:
        """Execute up to ``limit`` commands of ``sq`` in C; how many completed.

        Stops before the first command it leaves to Python (0: the one at
        the head is such a command, or dirty logging is on: the Python path
        logs what it writes).
        """
        dma = self._dma
        if dma.dirty is not None:
            return 0
        if self._regions is None:
            self._load_regions()
        ctx, q = self._ctx, self._queue
        ctx.page_size = page_size
        for entry, ns in zip(self._ns, self._namespaces, strict=False):
            entry.write_through = not ns.write_cache
        q.sq_base, q.sq_size, q.sq_head, q.sq_tail = sq.base, sq.size, sq.head, sq.tail
        q.sqid = sq.qid
        q.cq_base, q.cq_size, q.cq_head, q.cq_tail = cq.base, cq.size, cq.head, cq.tail
        q.cq_phase = cq.phase
        done: int = self._lib.nf_run(ctx, q, limit)
        if done:
            self.commands += done
            sq.head, cq.tail, cq.phase = q.sq_head, q.cq_tail, q.cq_phase
            cq.posted += done
            smart = self._smart
            if ctx.reads:
                smart.bytes_read += ctx.bytes_read
                smart.read_commands += ctx.reads
                ctx.bytes_read = ctx.reads = 0
            if ctx.writes:
                smart.bytes_written += ctx.bytes_written
                smart.write_commands += ctx.writes
                ctx.bytes_written = ctx.writes = 0
        return done


def attach(
    dma: object, namespaces: Sequence[FileNamespace], smart: SmartCounters, max_transfer: int
) -> FastIo | None:
    """A FastIo for a controller, or None when the C path cannot serve it."""
    if not isinstance(dma, DmaTable):
        return None  # another DMA space (tests, message-only): Python alone
    ffi_lib = load()
    if ffi_lib is None:
        return None
    return FastIo(dma, namespaces, smart, max_transfer, ffi_lib)

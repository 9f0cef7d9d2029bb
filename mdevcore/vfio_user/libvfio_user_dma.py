"""DMA for the libvfio-user transport: the device's view of guest memory.

- ``mapping_file``: libvfio-user mmaps fd-backed DMA regions itself and keeps
  the fd private; the device gets an fd for the same file from
  ``/proc/self/map_files`` and maps it as under the native engine.
- ``VfuDmaPort``: the DmaPort over ``vfu_sgl_read``/``vfu_sgl_write`` for
  regions without an fd (synchronous in libvfio-user: it sends DMA_READ or
  DMA_WRITE and blocks for the reply on the client's socket).
- ``mark_device_dirty``: the device's own dirty log drained into
  libvfio-user's bitmaps before libvfio-user answers DMA_LOGGING_REPORT.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user import libvfio_user_ffi as ffi_mod

if TYPE_CHECKING:
    from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

log = logging.getLogger("mdevcore.vfio_user.libvfio_user")

PROT_READ = 1
PROT_WRITE = 2


def oserror(ffi: Any, what: str) -> OSError:
    """OSError from the errno libvfio-user left (EIO if none)."""
    code = ffi.errno or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code)}")


def mapping_file(vaddr: int) -> tuple[int, int]:
    """(fd, file offset) of the shared file mapped at ``vaddr`` in this process.

    Opens ``/proc/self/map_files/<start>-<end>`` (needs CAP_SYS_ADMIN); the
    caller owns the fd.  OSError if nothing suitable is mapped there.
    """
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split()
            start_s, end_s = fields[0].split(b"-")
            start, end = int(start_s, 16), int(end_s, 16)
            if start <= vaddr < end:
                pgoff = int(fields[2], 16)
                name = f"/proc/self/map_files/{start_s.decode()}-{end_s.decode()}"
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
                return fd, pgoff + (vaddr - start)
    raise OSError(errno.EFAULT, f"nothing mapped at {vaddr:#x}")


class VfuDmaPort:
    """DmaPort over vfu_sgl_read/vfu_sgl_write (synchronous in libvfio-user)."""

    def __init__(self, server: LibvfioUserServer) -> None:
        self._server = server

    def _transfer(self, address: int, count: int, data: bytes | None) -> bytes:
        server = self._server
        ffi, lib, ctx = server.ffi, server.lib, server.ctx
        if ctx is None or not server.connected:
            raise OSError(errno.ENOTCONN, "client gone")
        prot = PROT_WRITE if data is not None else PROT_READ
        sg = ffi.cast("dma_sg_t *", ffi.new("char[]", server.sg_size))
        nr = lib.vfu_addr_to_sgl(ctx, ffi.cast("void *", address), count, sg, 1, prot)
        if nr < 0:
            raise oserror(ffi, f"DMA {address:#x}+{count:#x}")
        if nr != 1:
            # The device's DMA table checks this too: a transfer stays in one mapping.
            raise OSError(errno.EFAULT, f"DMA {address:#x}+{count:#x} spans {nr} mappings")
        # DIRECT_ACCESS: a memcpy for regions libvfio-user mapped, else a
        # DMA_READ/DMA_WRITE message (blocking until the client answers).
        if data is None:
            buf = ffi.new("char[]", count)
            if lib.vfu_sgl_read(ctx, sg, 1, buf, ffi_mod.VFU_SGL_DIRECT_ACCESS) < 0:
                raise oserror(ffi, f"DMA_READ {address:#x}+{count:#x}")
            return bytes(ffi.buffer(buf, count))
        src = ffi.new("char[]", data)
        if lib.vfu_sgl_write(ctx, sg, 1, src, ffi_mod.VFU_SGL_DIRECT_ACCESS) < 0:
            raise oserror(ffi, f"DMA_WRITE {address:#x}+{count:#x}")
        return b""

    async def dma_read(self, address: int, count: int) -> bytes:
        return self._transfer(address, count, None)

    async def dma_write(self, address: int, data: bytes) -> None:
        self._transfer(address, len(data), bytes(data))


def mark_device_dirty(server: LibvfioUserServer, iova: int, length: int) -> None:
    """Drain the device's own dirty log for a range into libvfio-user's bitmap."""
    page = server.device_dirty_page_size
    if not page or length <= 0 or iova % page or length % page:
        return
    try:
        report = server.backend.device_feature(
            vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT,
            struct.pack("<QQQ", iova, length, page),
        )
    except OSError as e:
        log.debug("%s: device dirty report: %s", server.name, e)
        return
    bitmap = int.from_bytes(report[24:], "little")
    ffi, lib, ctx = server.ffi, server.lib, server.ctx
    sg = ffi.cast("dma_sg_t *", ffi.new("char[]", server.sg_size))
    npages = length // page
    i = 0
    while i < npages:
        if not bitmap >> i & 1:
            i += 1
            continue
        run = i
        while run < npages and bitmap >> run & 1:
            run += 1
        start, size = iova + i * page, (run - i) * page
        ok = lib.vfu_addr_to_sgl(ctx, ffi.cast("void *", start), size, sg, 1, PROT_WRITE)
        if ok == 1 and lib.vfu_sg_is_mappable(ctx, sg):
            lib.vfu_sgl_mark_dirty(ctx, sg, 1)
        i = run

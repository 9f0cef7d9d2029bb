"""The destination side: migration stream in, destination device loaded.

:class:`Receiver` is fed the stream's bytes as they arrive (from a socket
or straight from a sender in the same process) and answers with the bytes
to send back: one STATUS frame, when the destination is RUNNING or when
the migration failed.  It drives the destination device directly (the
stream codec is sans-IO; the device calls are the point of this class).

Order, as a VMM's incoming side: META -> reset the device and walk it to
RESUMING; DEVICE frames -> MIG_DATA_WRITE as they come (pre-copy data
included); PAGES -> guest memory; WORKLOAD kept for the caller; END ->
totals checked, RESUMING -> STOP (the device loads), STOP -> RUNNING.

Any failure (malformed or cut-short stream, a refused MIG_DATA_WRITE or
RESUMING -> STOP) resets the device (DEVICE_RESET: RUNNING, empty), so it
is never left half-loaded, and the STATUS carries the errno.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from mdevcore.migration import stream
from mdevcore.migration.arcs import State
from mdevcore.migration.device import MigrationDevice
from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory
from mdevcore.migration.stream import FrameType, StreamError

log = logging.getLogger(__name__)

DEFAULT_DEVICE_LIMIT = 256 << 20


class Receiver:
    def __init__(
        self,
        dst: MigrationDevice,
        mem: GuestMemory,
        *,
        device_limit: int = DEFAULT_DEVICE_LIMIT,
    ) -> None:
        self.dst = dst
        self.mem = mem
        self.device_limit = device_limit
        self.decoder = stream.Decoder()
        self.meta: dict[str, Any] | None = None
        self.workload: tuple[str, bytes] | None = None
        self.device_bytes = 0
        self.pages = 0
        self.frames = 0
        self.done = False
        self.error: OSError | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None

    def feed(self, data: bytes | memoryview) -> bytes:
        """Take stream bytes; returns reply bytes (a STATUS frame or b"")."""
        if self.finished:
            return b""
        try:
            for fr in self.decoder.feed(data):
                if self.done:
                    raise StreamError(errno.EPROTO, "data after END")
                self._frame(fr)
        except OSError as e:
            return self.fail(e)
        except Exception as e:  # a bug must not leave the device half-loaded either
            log.exception("receiver crashed")
            return self.fail(OSError(errno.EIO, f"receiver failed: {e}"))
        if self.done:
            return stream.status(0, "destination running")
        return b""

    def eof(self) -> bytes:
        """The sender went away: unless END was handled, the stream is truncated."""
        if self.finished:
            return b""
        where = "before END" if self.meta is not None else "before any frame"
        return self.fail(StreamError(errno.EPIPE, f"stream cut short {where}"))

    def fail(self, exc: OSError) -> bytes:
        self.error = exc
        log.warning("migration refused: %s", exc)
        if self.meta is not None:  # before META the device was never touched
            try:
                self.dst.reset()
            except (OSError, EOFError) as e:  # the destination itself may be gone
                log.warning("destination reset failed: %s", e)
        err = exc.errno or errno.EIO
        return stream.status(err, str(exc.strerror or exc))

    # --- frames ---------------------------------------------------------------

    def _frame(self, fr: stream.Frame) -> None:
        if self.meta is None and fr.type != FrameType.META:
            raise StreamError(errno.EPROTO, f"{fr.type.name} before META")
        if fr.type == FrameType.META:
            if self.meta is not None:
                raise StreamError(errno.EPROTO, "second META")
            self._start(stream.parse_meta(fr.payload))
        elif fr.type == FrameType.DEVICE:
            self.device_bytes += len(fr.payload)
            if self.device_bytes > self.device_limit:
                raise StreamError(errno.EFBIG, f"device state above {self.device_limit} bytes")
            self.dst.write(fr.payload)
        elif fr.type == FrameType.PAGES:
            npages = self.mem.size // PAGE_SIZE
            for number, data in stream.parse_pages(fr.payload):
                if number >= npages:
                    raise StreamError(errno.ERANGE, f"guest page {number} beyond {npages}")
                self.mem.load_page(number, data)
                self.pages += 1
        elif fr.type == FrameType.WORKLOAD:
            name, part = stream.parse_workload(fr.payload)
            if self.workload is None:
                self.workload = (name, part)
            elif self.workload[0] != name:
                raise StreamError(errno.EPROTO, f"WORKLOAD {name!r} after {self.workload[0]!r}")
            elif len(self.workload[1]) + len(part) > stream.MAX_WORKLOAD_STATE:
                raise StreamError(errno.EFBIG, "workload state too large")
            else:
                self.workload = (name, self.workload[1] + part)
        elif fr.type == FrameType.END:
            self._end(*stream.parse_end(fr.payload))
        else:
            raise StreamError(errno.EPROTO, f"{fr.type.name} frame from a sender")
        self.frames += 1

    def _start(self, meta: dict[str, Any]) -> None:
        size, base = meta.get("memory_size"), meta.get("memory_base")
        if size != self.mem.size or base != self.mem.base:
            raise StreamError(
                errno.EINVAL,
                f"guest memory {size}@{base} does not match {self.mem.size}@{self.mem.base}",
            )
        if meta.get("page_size") != PAGE_SIZE:
            raise StreamError(errno.EINVAL, f"page size {meta.get('page_size')}")
        self.meta = meta
        self.dst.reset()  # whatever it held before, it starts clean
        self.dst.walk(State.RESUMING, State.RUNNING)

    def _end(self, device_bytes: int, pages: int, frames: int) -> None:
        if (device_bytes, pages, frames) != (self.device_bytes, self.pages, self.frames):
            raise StreamError(
                errno.EBADMSG,
                f"END says {device_bytes} device bytes/{pages} pages/{frames} frames, "
                f"got {self.device_bytes}/{self.pages}/{self.frames}",
            )
        self.dst.walk(State.STOP, State.RESUMING)  # the device loads here
        self.dst.walk(State.RUNNING, State.STOP)
        self.done = True
        log.info("destination running: %d device bytes, %d pages", self.device_bytes, self.pages)

"""The source side: live migration of one device and its guest memory.

:meth:`Sender.migrate` runs the whole source half, as a VMM does:

1. META; DMA_LOGGING_START over all guest memory at 4 KiB pages (when the
   device offers it); PRE_COPY when the device offers it.
2. Pre-copy rounds while the workload runs: the first sends every guest
   page, later ones the pages dirtied since (DMA_LOGGING_REPORT, which
   clears, united with the VMM's own vCPU writes), plus the device's
   pre-copy data; until the dirty set is small or the round limit.
3. Stop-and-copy: the workload quiesces (vCPUs paused), the device walks
   to STOP_COPY (through the P2P states when offered), its stream is read
   to the end, the last dirty pages (reported once more, now that the
   device is stopped) and the workload's state follow, then END.
   A device without dirty logging gets every page sent again here, since
   its writes cannot be seen.
4. The receiver's STATUS: on success DMA_LOGGING_STOP and source STOP.

Any failure on the way rolls the source back: walk to RUNNING from
wherever it is, stop logging, ``workload.resume()``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from mdevcore.migration import stream
from mdevcore.migration.arcs import State
from mdevcore.migration.device import MigrationDevice
from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory
from mdevcore.migration.links import Link
from mdevcore.migration.workload import Workload

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Options:
    max_rounds: int = 10
    round_seconds: float = 0.05  # workload time between pre-copy rounds
    dirty_target: int = 64 << 10  # stop pre-copy once this little is dirty
    device_limit: int = 256 << 20
    status_timeout: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    phase: str  # "precopy" or "stopcopy"
    round: int
    dirty_bytes: int
    sent_bytes: int
    rate: float  # bytes/s since the start


@dataclasses.dataclass(slots=True)
class Report:
    ok: bool = False
    error: str = ""
    errno: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    rounds: int = 0
    memory_bytes: int = 0
    pages_sent: int = 0
    device_bytes: int = 0
    precopy_device_bytes: int = 0
    device_size_estimate: int | None = None  # MIG_DATA_SIZE, when offered
    device_flags: int = 0
    dirty_logging: bool = False
    rolled_back: bool = False
    workload: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        head = "migration succeeded" if self.ok else f"migration FAILED: {self.error}"
        lines = [
            head,
            f"  total      {self.total_seconds * 1e3:.1f} ms",
            f"  downtime   {self.downtime_seconds * 1e3:.1f} ms",
            f"  rounds     {self.rounds}",
            f"  memory     {self.memory_bytes} bytes ({self.pages_sent} pages)",
            f"  device     {self.device_bytes} bytes ({self.precopy_device_bytes} pre-copy)",
        ]
        if self.rolled_back:
            lines.append("  source rolled back to RUNNING")
        if self.workload:
            lines.append("  workload   " + " ".join(f"{k}={v}" for k, v in self.workload.items()))
        return "\n".join(lines)


class MigrationFailed(OSError):
    """The migration did not complete; the source was rolled back."""


class Sender:
    def __init__(
        self,
        src: MigrationDevice,
        mem: GuestMemory,
        link: Link,
        *,
        workload: Workload | None = None,
        options: Options | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.src = src
        self.mem = mem
        self.link = link
        self.workload = workload
        self.opts = options or Options()
        self.progress = progress
        self.report = Report(device_flags=src.flags)
        self._frames = 0
        self._t0 = 0.0
        self._quiesced = False
        self._touched = False  # set once the source device was changed

    # --- the whole migration -------------------------------------------------------

    def migrate(self) -> Report:
        """Migrate; returns the report (``ok`` False after a rollback)."""
        self._t0 = time.monotonic()
        try:
            self._run()
            self.report.ok = True
        except Exception as e:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            self.report.error = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
            self.report.errno = err
            log.warning("migration failed: %s; rolling the source back", self.report.error)
            self._rollback()
        finally:
            self.report.total_seconds = time.monotonic() - self._t0
            if self.workload is not None:
                self.report.workload = self.workload.stats()
        return self.report

    def _run(self) -> None:
        state = self.src.state()
        if state != State.RUNNING:
            raise MigrationFailed(errno.EBUSY, f"source is in {state.name}, not RUNNING")
        info = {
            "memory_size": self.mem.size,
            "memory_base": self.mem.base,
            "page_size": PAGE_SIZE,
            "device_flags": self.src.flags,
            "workload": self.workload.name if self.workload else None,
        }
        self._send(stream.header(), counted=False)
        self._send(stream.meta(info))
        self._touched = True
        self.report.dirty_logging = self.src.logging_start([(self.mem.base, self.mem.size)])
        if self.src.pre_copy:
            self.src.walk(State.PRE_COPY, State.RUNNING)
        self.mem.take_dirty()
        pending: set[int] = set(range(self.mem.size // PAGE_SIZE))
        while True:
            self.report.rounds += 1
            self._send_pages(pending)
            if self.src.pre_copy:
                self._send_device(self.src.read_available(self.opts.device_limit), precopy=True)
            self._check_receiver()
            pending = set()
            if self.report.rounds >= self.opts.max_rounds or self.workload is None:
                break
            self.workload.run_for(self.opts.round_seconds)
            pending = self._collect_dirty()
            self._tell("precopy", len(pending) * PAGE_SIZE)
            if len(pending) * PAGE_SIZE <= self.opts.dirty_target:
                break
        self._stop_and_copy(pending)

    def _stop_and_copy(self, pending: set[int]) -> None:
        if self.workload is not None:
            self.workload.quiesce()
        self._quiesced = True
        self.report.device_size_estimate = self.src.data_size()
        t_down = time.monotonic()
        self.src.walk(State.STOP_COPY)
        self._send_device(self.src.read_to_end(self.opts.device_limit), precopy=False)
        # The device is stopped: this report is the last of its writes.
        pending |= self._collect_dirty()
        if not self.report.dirty_logging:
            # No dirty log: the device may have written anywhere it could reach.
            pending = set(range(self.mem.size // PAGE_SIZE))
        self._tell("stopcopy", len(pending) * PAGE_SIZE)
        self._send_pages(pending)
        if self.workload is not None:
            for fr in stream.workload(self.workload.name, self.workload.save()):
                self._send(fr)
        self._send(
            stream.end(self.report.device_bytes, self.report.pages_sent, self._frames),
            counted=False,
        )
        err, text = self.link.wait_status(self.opts.status_timeout)
        if err:
            raise MigrationFailed(err, f"destination refused: {text}")
        self.report.downtime_seconds = time.monotonic() - t_down
        # The destination runs the device now: from here on the source must
        # never be rolled back, whatever fails (that would be two live copies).
        self._touched = False
        try:
            self.src.logging_stop()
            self.src.walk(State.STOP, State.STOP_COPY)
        except (OSError, EOFError, ValueError) as e:
            log.warning("source cleanup after a successful migration: %s", e)

    # --- pieces ------------------------------------------------------------------

    def _send(self, data: bytes, *, counted: bool = True) -> None:
        self.link.send(data)
        if counted:
            self._frames += 1

    def _send_pages(self, numbers: Iterable[int]) -> None:
        ordered = sorted(numbers)
        step = stream.MAX_PAGES_PER_FRAME
        for pos in range(0, len(ordered), step):
            batch = ordered[pos : pos + step]
            self._send(stream.pages(batch, [self.mem.page(n) for n in batch]))
            self.report.pages_sent += len(batch)
            self.report.memory_bytes += len(batch) * PAGE_SIZE

    def _send_device(self, chunks: Iterable[bytes], *, precopy: bool) -> None:
        for chunk in chunks:
            for fr in stream.device(chunk):
                self._send(fr)
            self.report.device_bytes += len(chunk)
            if precopy:
                self.report.precopy_device_bytes += len(chunk)
            if self.report.device_bytes > self.opts.device_limit:
                raise MigrationFailed(errno.EFBIG, "device state above the limit")

    def _collect_dirty(self) -> set[int]:
        pages = self.mem.take_dirty()
        if self.src.logging is not None:
            for iova in self.src.logging_report(self.mem.base, self.mem.size):
                ps = self.src.logging.page_size
                first = max(iova, self.mem.base) - self.mem.base
                last = min(iova + ps, self.mem.end) - self.mem.base
                pages.update(range(first // PAGE_SIZE, (last + PAGE_SIZE - 1) // PAGE_SIZE))
        return pages

    def _check_receiver(self) -> None:
        status = self.link.poll()
        if status is not None:
            raise MigrationFailed(status[0], f"destination refused: {status[1]}")

    def _tell(self, phase: str, dirty: int) -> None:
        sent = self.report.memory_bytes + self.report.device_bytes
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        if self.progress is not None:
            self.progress(Progress(phase, self.report.rounds, dirty, sent, sent / elapsed))

    def _rollback(self) -> None:
        """Source back to RUNNING from wherever it is; logging off; workload on."""
        self.link.close()
        if not self._touched:
            return  # the source was never changed (e.g. it was not RUNNING)
        self.report.rolled_back = True
        try:
            self.src.walk(State.RUNNING)
        except (OSError, EOFError, ValueError) as e:  # ValueError: no path (ERROR)
            log.error("source rollback failed: %s", e)
            self.report.rolled_back = False
        try:
            self.src.logging_stop()
        except (OSError, EOFError) as e:
            log.warning("DMA_LOGGING_STOP after failure: %s", e)
        if self.workload is not None and self._quiesced:
            self.workload.resume()

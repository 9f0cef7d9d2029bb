"""A migratable device seen from the VMM: VFIO migration v2 over vfio-user.

:class:`MigrationDevice` wraps a blocking :class:`Client` and speaks the
DEVICE_FEATURE / MIG_DATA_* part of the protocol from the uAPI's layouts:

* MIGRATION (1): GET -> ``u64 flags`` (STOP_COPY | P2P | PRE_COPY).
* MIG_DEVICE_STATE (2): ``struct vfio_device_feature_mig_state``
  {u32 device_state; s32 data_fd} (data_fd unused in vfio-user).
* DMA_LOGGING_START (6) / STOP (7): ``vfio_device_feature_dma_logging_control``
  {u64 page_size; u32 num_ranges; u32 reserved} + ranges {u64 iova; u64 length}.
* DMA_LOGGING_REPORT (8): ``vfio_device_feature_dma_logging_report``
  {u64 iova; u64 length; u64 page_size; u64 bitmap}: in vfio-user the
  reply carries the bitmap itself from offset 24.
* MIG_DATA_SIZE (9, where offered): GET -> ``u64 stop_copy_length``.

State changes are requested one arc at a time (see ``arcs.plan``), so a
server that implements only single arcs is driven correctly.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import struct
from collections.abc import Iterable

from mdevcore.migration.arcs import State, offered, plan
from mdevcore.pci.migration import MIGRATION_FLAGS_ALL, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY
from mdevcore.vfio_user.client import Client, VfioUserError

log = logging.getLogger(__name__)

FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_DMA_LOGGING_START = 6
FEATURE_DMA_LOGGING_STOP = 7
FEATURE_DMA_LOGGING_REPORT = 8
FEATURE_MIG_DATA_SIZE = 9

LOG_PAGE_SIZE = 4096
_MIG_STATE = struct.Struct("<Ii")
_LOG_CONTROL = struct.Struct("<QII")
_LOG_RANGE = struct.Struct("<QQ")
_LOG_REPORT = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")
# A REPORT's bitmap must fit in one reply (max_data_xfer_size); ask per slice.
_DEFAULT_XFER = 1 << 20


class MigrationError(OSError):
    """The device refused or failed a migration step (errno set)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DirtyLogging:
    page_size: int
    ranges: tuple[tuple[int, int], ...]


class MigrationDevice:
    """One device's migration interface through ``client`` (already negotiated)."""

    def __init__(self, client: Client, *, name: str = "device") -> None:
        self.client = client
        self.name = name
        self.flags = self._probe_flags()
        self.logging: DirtyLogging | None = None
        xfer = client.server_caps.get("max_data_xfer_size", _DEFAULT_XFER)
        self.xfer = max(4096, min(int(xfer), _DEFAULT_XFER))
        self._has_data_size: bool | None = None

    # --- features ---------------------------------------------------------

    def _feature(self, flags: int, data: bytes = b"", reply_room: int = 64) -> bytes:
        try:
            _argsz, _flags, body = self.client.device_feature(
                flags, data, argsz=8 + max(len(data), reply_room)
            )
        except VfioUserError as e:
            raise MigrationError(e.errno, f"{self.name}: {e.strerror}") from None
        return body

    def _probe_flags(self) -> int:
        try:
            body = self._feature(FEATURE_GET | FEATURE_MIGRATION)
        except MigrationError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise MigrationError(errno.ENOTTY, f"{self.name}: not migratable") from None
            raise
        if len(body) < 8:
            raise MigrationError(errno.EPROTO, f"{self.name}: short MIGRATION reply")
        (flags,) = _U64.unpack_from(body)
        if not flags & MIGRATION_STOP_COPY:
            raise MigrationError(errno.ENOTTY, f"{self.name}: no STOP_COPY ({flags:#x})")
        return flags & MIGRATION_FLAGS_ALL

    @property
    def pre_copy(self) -> bool:
        return bool(self.flags & MIGRATION_PRE_COPY)

    def offers(self, state: State) -> bool:
        return offered(state, self.flags)

    # --- device state -------------------------------------------------------

    def state(self) -> State:
        body = self._feature(FEATURE_GET | FEATURE_MIG_DEVICE_STATE)
        if len(body) < 4:
            raise MigrationError(errno.EPROTO, f"{self.name}: short MIG_DEVICE_STATE reply")
        try:
            return State(_MIG_STATE.unpack_from(body.ljust(8, b"\0"))[0])
        except ValueError:
            raise MigrationError(errno.EPROTO, f"{self.name}: unknown state in reply") from None

    def set_state(self, new: State) -> None:
        """Request one arc (the caller knows it is one)."""
        self._feature(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, _MIG_STATE.pack(new, -1))

    def walk(self, target: State, current: State | None = None) -> list[State]:
        """Go to ``target`` one arc at a time; returns the states passed."""
        if current is None:
            current = self.state()
        steps = plan(self.flags, current, target)
        for step in steps:
            log.debug("%s: %s -> %s", self.name, current.name, step.name)
            self.set_state(step)
            current = step
        return steps

    def reset(self) -> None:
        try:
            self.client.reset()
        except VfioUserError as e:
            raise MigrationError(e.errno, f"{self.name}: reset: {e.strerror}") from None
        self.logging = None

    # --- the data stream ------------------------------------------------------

    def data_size(self) -> int | None:
        """MIG_DATA_SIZE's estimate, or None when the device does not offer it."""
        if self._has_data_size is False:
            return None
        try:
            body = self._feature(FEATURE_GET | FEATURE_MIG_DATA_SIZE)
        except MigrationError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise
            self._has_data_size = False
            return None
        self._has_data_size = True
        return _U64.unpack_from(body)[0] if len(body) >= 8 else None

    def read_chunk(self, size: int | None = None) -> bytes:
        """One MIG_DATA_READ of up to ``size`` bytes (b"" when none now / at the end)."""
        try:
            return self.client.mig_data_read(self.xfer if size is None else size)
        except VfioUserError as e:
            if e.errno == errno.ENOMSG:  # the kernel's "nothing right now" in PRE_COPY
                return b""
            raise MigrationError(e.errno, f"{self.name}: MIG_DATA_READ: {e.strerror}") from None

    def read_available(self, limit: int = 1 << 30) -> Iterable[bytes]:
        """PRE_COPY: what the device has now; stops at a short or empty read."""
        got = 0
        while got < limit:
            chunk = self.read_chunk(min(self.xfer, limit - got))
            if chunk:
                got += len(chunk)
                yield chunk
            if len(chunk) < self.xfer:
                return

    def read_to_end(self, limit: int) -> Iterable[bytes]:
        """STOP_COPY: read until a zero-length read; more than ``limit`` bytes is refused."""
        got = 0
        while True:
            chunk = self.read_chunk()
            if not chunk:
                return
            got += len(chunk)
            if got > limit:
                raise MigrationError(errno.EFBIG, f"{self.name}: device state above {limit}")
            yield chunk

    def write(self, data: bytes | memoryview) -> None:
        """MIG_DATA_WRITE in RESUMING, in slices of the transfer size.

        The spec's reply has no payload; a server that echoes the 8-byte
        {argsz, size} header is accepted too (the payload is not looked at).
        """
        view = memoryview(data)
        for pos in range(0, len(view), self.xfer):
            try:
                self.client.mig_data_write(bytes(view[pos : pos + self.xfer]))
            except VfioUserError as e:
                raise MigrationError(
                    e.errno, f"{self.name}: MIG_DATA_WRITE: {e.strerror}"
                ) from None

    # --- DMA dirty logging -----------------------------------------------------

    def logging_start(
        self, ranges: Iterable[tuple[int, int]], page_size: int = LOG_PAGE_SIZE
    ) -> bool:
        """DMA_LOGGING_START; False when the device does not offer dirty logging."""
        rs = tuple(ranges)
        body = _LOG_CONTROL.pack(page_size, len(rs), 0) + b"".join(
            _LOG_RANGE.pack(iova, length) for iova, length in rs
        )
        try:
            reply = self._feature(FEATURE_SET | FEATURE_DMA_LOGGING_START, body)
        except MigrationError as e:
            if e.errno in (errno.ENOTTY, errno.ENOSYS):
                return False
            raise
        # The device may raise the page size and says so in the echo.
        used = _LOG_CONTROL.unpack_from(reply)[0] if len(reply) >= 16 else page_size
        if used <= 0 or used & (used - 1):
            raise MigrationError(errno.EPROTO, f"{self.name}: logging page size {used}")
        self.logging = DirtyLogging(used, rs)
        return True

    def logging_report(self, iova: int, length: int) -> set[int]:
        """Dirty IOVAs (page starts at the logging page size) in the range; clears them."""
        lg = self.logging
        if lg is None:
            raise MigrationError(errno.EINVAL, f"{self.name}: logging not started")
        ps = lg.page_size
        start = iova - iova % ps
        end = iova + length
        end += -end % ps
        # One reply must hold 24 + bitmap bytes within the transfer size.
        pages_per_slice = max(64, (self.xfer - 64) * 8 // 64 * 64)
        dirty: set[int] = set()
        pos = start
        while pos < end:
            npages = min(pages_per_slice, (end - pos) // ps)
            nbytes = (npages + 63) // 64 * 8
            body = self._feature(
                FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
                _LOG_REPORT.pack(pos, npages * ps, ps),
                reply_room=_LOG_REPORT.size + nbytes,
            )
            bitmap = body[_LOG_REPORT.size : _LOG_REPORT.size + nbytes]
            if len(bitmap) < nbytes:
                raise MigrationError(errno.EPROTO, f"{self.name}: short dirty bitmap")
            bits = int.from_bytes(bitmap, "little")
            while bits:
                low = bits & -bits
                n = low.bit_length() - 1
                if n < npages:
                    dirty.add(pos + n * ps)
                bits ^= low
            pos += npages * ps
        return dirty

    def logging_stop(self) -> None:
        if self.logging is None:
            return
        self.logging = None
        # STOP carries no data in the uAPI.
        self._feature(FEATURE_SET | FEATURE_DMA_LOGGING_STOP)

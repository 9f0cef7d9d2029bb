"""A split virtqueue (virtio 1.2, 2.7): avail ring in, used ring out.

The queue only knows guest memory (a :class:`~mdevcore.virtio.chain.GuestMemory`
such as the device's DmaTable) and the three ring addresses the driver
programmed; the transport owns the registers.  Indexes read from the guest
are checked before use: an avail index more than ``size`` ahead of what the
device consumed is a protocol error (:class:`VirtqError`), as is every chain
problem ``chain.walk`` finds.  After an error the queue is ``broken`` and
refuses all work until it is reset, so a confused driver cannot make the
device walk stale rings.

Device writes into guest memory (used elements, used idx, avail_event) go
through ``translate(write=True)`` and ``mark_dirty``, so dirty logging sees
every page the device changed.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from mdevcore.virtio import spec
from mdevcore.virtio.chain import Chain, GuestMemory, VirtqError, view, walk

_U16 = struct.Struct("<H")


@dataclasses.dataclass(slots=True)
class QueueState:
    """Everything a migration needs to resume a queue where it stopped."""

    size: int
    desc: int
    driver: int
    device: int
    enabled: bool
    last_avail_idx: int
    used_idx: int
    # Used idx at the last interrupt (EVENT_IDX); None: notify on next use.
    signalled_used: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, max_size: int) -> QueueState:
        """Parse untrusted migration data; VirtqError unless every field is sane."""
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise VirtqError("queue state: wrong fields")
        for name in ("size", "desc", "driver", "device", "last_avail_idx", "used_idx"):
            if type(data[name]) is not int:
                raise VirtqError(f"queue state: {name} is not an integer")
        signalled = data["signalled_used"]
        if type(data["enabled"]) is not bool or not (signalled is None or type(signalled) is int):
            raise VirtqError("queue state: enabled/signalled_used of the wrong type")
        state = cls(**data)
        if not 0 < state.size <= max_size or state.size & (state.size - 1):
            raise VirtqError(f"queue state: size {state.size}")
        for idx in (state.last_avail_idx, state.used_idx, signalled or 0):
            if not 0 <= idx <= 0xFFFF:
                raise VirtqError("queue state: index beyond 16 bits")
        for addr in (state.desc, state.driver, state.device):
            if not 0 <= addr < 1 << 64:
                raise VirtqError("queue state: address beyond 64 bits")
        return state


class SplitQueue:
    """One virtqueue; ``max_size`` is what the device offers in queue_size."""

    def __init__(self, mem: GuestMemory, index: int, max_size: int) -> None:
        if not 0 < max_size <= spec.QUEUE_SIZE_MAX or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        """Power-on state (device reset, or queue_reset)."""
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.enabled = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used: int | None = None
        self.broken: str | None = None

    # --- setup ----------------------------------------------------------------

    def check_layout(self) -> None:
        """Size and alignments the driver programmed (VirtqError if unusable)."""
        if not 0 < self.size <= self.max_size or self.size & (self.size - 1):
            raise VirtqError(f"queue {self.index}: size {self.size}")
        for addr, align, what in (
            (self.desc, spec.DESC_ALIGN, "descriptor table"),
            (self.driver, spec.AVAIL_ALIGN, "driver area"),
            (self.device, spec.USED_ALIGN, "device area"),
        ):
            if addr % align:
                raise VirtqError(f"queue {self.index}: {what} at {addr:#x} misaligned")

    def enable(self, features: int) -> None:
        """queue_enable = 1: check the layout and take the negotiated ring features."""
        self.check_layout()
        self.event_idx = bool(features & spec.bit(spec.F_EVENT_IDX))
        self.indirect = bool(features & spec.bit(spec.F_INDIRECT_DESC))
        self.enabled = True

    def fail(self, error: VirtqError) -> VirtqError:
        """Mark the queue broken; returns the error for the caller to raise."""
        if self.broken is None:
            self.broken = str(error)
        return error

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise VirtqError(f"queue {self.index} is broken: {self.broken}")
        if not self.enabled:
            raise VirtqError(f"queue {self.index} is not enabled")

    # --- ring accessors -------------------------------------------------------------

    def _read_u16(self, iova: int) -> int:
        return int(_U16.unpack(view(self.mem, iova, 2, False))[0])

    def _write(self, iova: int, data: bytes) -> None:
        view(self.mem, iova, len(data), True)[:] = data
        self.mem.mark_dirty(iova, len(data))

    def avail_idx(self) -> int:
        return self._read_u16(self.driver + 2)

    # --- device side -------------------------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available and the device not taken."""
        self._check_usable()
        try:
            ahead = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
            if ahead > self.size:
                raise VirtqError(
                    f"queue {self.index}: avail idx {ahead} ahead of the device, size {self.size}"
                )
        except VirtqError as exc:
            raise self.fail(exc) from None
        return ahead

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty."""
        if not self.pending():
            if not self.event_idx:
                return None
            self._publish_avail_event()
            # The driver may have added a chain before it saw avail_event: look
            # again, or its next kick would never come.
            if not self.pending():
                return None
        try:
            slot = self.last_avail_idx % self.size
            head = self._read_u16(self.driver + 4 + 2 * slot)
            chain = walk(self.mem, self.desc, self.size, head, indirect_ok=self.indirect)
        except VirtqError as exc:
            raise self.fail(exc) from None
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _publish_avail_event(self) -> None:
        """Ask to be notified when the driver adds past what we consumed."""
        try:
            self._write(self.device + 4 + 8 * self.size, _U16.pack(self.last_avail_idx))
        except VirtqError as exc:
            raise self.fail(exc) from None

    def unpop(self, count: int = 1) -> None:
        """Give back chains taken by pop() and not used (e.g. no room for a frame)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def push(self, used: list[tuple[int, int]]) -> None:
        """Return chains (head, bytes written) and publish them with one used idx update."""
        self._check_usable()
        try:
            for offset, (head, length) in enumerate(used):
                slot = (self.used_idx + offset) % self.size
                self._write(self.device + 4 + 8 * slot, spec.USED_ELEM.pack(head, length))
            self.used_idx = (self.used_idx + len(used)) & 0xFFFF
            self._write(self.device + 2, _U16.pack(self.used_idx))
        except VirtqError as exc:
            raise self.fail(exc) from None

    def should_notify(self) -> bool:
        """Whether the used entries published since the last interrupt need one now.

        Without EVENT_IDX the driver's NO_INTERRUPT flag decides; with it,
        the driver's used_event (2.7.10): interrupt when the used idx moved
        past it since the last interrupt.
        """
        try:
            if not self.event_idx:
                flags = self._read_u16(self.driver)
                return not flags & spec.AVAIL_F_NO_INTERRUPT
            old, new = self.signalled_used, self.used_idx
            self.signalled_used = new
            if old is None:
                return True
            event = self._read_u16(self.driver + 4 + 2 * self.size)
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        except VirtqError as exc:
            raise self.fail(exc) from None

    # --- migration ---------------------------------------------------------------------

    def save(self) -> QueueState:
        return QueueState(
            size=self.size,
            desc=self.desc,
            driver=self.driver,
            device=self.device,
            enabled=self.enabled,
            last_avail_idx=self.last_avail_idx,
            used_idx=self.used_idx,
            signalled_used=self.signalled_used,
        )

    def load(self, state: QueueState, features: int) -> None:
        """Resume from ``state`` (already checked by QueueState.from_dict)."""
        self.reset()
        self.size, self.desc, self.driver, self.device = (
            state.size,
            state.desc,
            state.driver,
            state.device,
        )
        self.last_avail_idx = state.last_avail_idx
        self.used_idx = state.used_idx
        if state.enabled:
            self.enable(features)
        self.signalled_used = state.signalled_used

"""Log pages (error information, SMART/health, firmware slot) and async events."""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import Any

from mdevcore.nvme.checks import U16, U32, U64, Invalid, dict_of, int_in, list_of
from mdevcore.nvme.spec import AsyncEventType, LogId

ERROR_ENTRY_SIZE = 64
SMART_SIZE = 512
FIRMWARE_SLOT_SIZE = 512


@dataclasses.dataclass(slots=True)
class ErrorEntry:
    count: int
    sqid: int
    cid: int
    status: int
    lba: int
    nsid: int

    def encode(self) -> bytes:
        # status field keeps the phase-bit position (bit 0) as in the CQE
        raw = struct.pack(
            "<QHHHHQI",
            self.count,
            self.sqid,
            self.cid,
            self.status << 1,
            0xFFFF,
            self.lba,
            self.nsid,
        )
        return raw.ljust(ERROR_ENTRY_SIZE, b"\0")


class ErrorLog:
    """The newest ``capacity`` failed commands, newest first when read."""

    def __init__(self, capacity: int) -> None:
        self.count = 0  # lifetime errors; entry counts are 1-based and unique
        self.entries: collections.deque[ErrorEntry] = collections.deque(maxlen=capacity)
        self._capacity = capacity

    def record(self, sqid: int, cid: int, status: int, lba: int = 0, nsid: int = 0) -> None:
        self.count += 1
        self.entries.appendleft(ErrorEntry(self.count, sqid, cid, status, lba, nsid))

    def page(self) -> bytes:
        raw = b"".join(e.encode() for e in self.entries)
        return raw.ljust(self._capacity * ERROR_ENTRY_SIZE, b"\0")

    def snapshot(self) -> list[Any]:
        """The count, then the entries oldest first."""
        entries = [
            [e.count, e.sqid, e.cid, e.status, e.lba, e.nsid] for e in reversed(self.entries)
        ]
        return [self.count, *entries]

    def check_snapshot(self, data: Any) -> tuple[int, list[ErrorEntry]]:
        saved = list_of(data, None, "errors")
        if not saved:
            raise Invalid("errors: no count")
        entries = [
            ErrorEntry(*(int_in(v, 0, U64, "error entry") for v in list_of(e, 6, "error entry")))
            for e in saved[1 : 1 + self._capacity]
        ]
        return int_in(saved[0], 0, U64, "error count"), entries

    def load(self, checked: tuple[int, list[ErrorEntry]]) -> None:
        # Saved oldest first; the log keeps the newest at the left.  A
        # controller reset keeps the error log, so clear it here.
        self.count, entries = checked
        self.entries.clear()
        for entry in entries:
            self.entries.appendleft(entry)


@dataclasses.dataclass(slots=True)
class SmartCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    read_commands: int = 0
    write_commands: int = 0
    power_cycles: int = 1
    unsafe_shutdowns: int = 0
    critical_warning: int = 0
    temperature_k: int = 313

    def snapshot(self) -> list[int]:
        return [self.bytes_read, self.bytes_written, self.read_commands, self.write_commands]

    @staticmethod
    def check_snapshot(data: Any) -> list[int]:
        return [int_in(v, 0, U64, "SMART") for v in list_of(data, 4, "smart")]

    def load(self, values: list[int]) -> None:
        self.bytes_read, self.bytes_written, self.read_commands, self.write_commands = values

    def page(self, error_count: int) -> bytes:
        data = bytearray(SMART_SIZE)
        data[0] = self.critical_warning
        struct.pack_into("<HBB", data, 1, self.temperature_k, 100, 10)

        def u128(offset: int, value: int) -> None:
            data[offset : offset + 16] = value.to_bytes(16, "little")

        # Data units are thousands of 512-byte units, rounded up.
        u128(32, -(-self.bytes_read // 512_000))
        u128(48, -(-self.bytes_written // 512_000))
        u128(64, self.read_commands)
        u128(80, self.write_commands)
        u128(112, self.power_cycles)
        u128(144, self.unsafe_shutdowns)
        u128(176, error_count)
        return bytes(data)


def firmware_slot_page(firmware: str) -> bytes:
    data = bytearray(FIRMWARE_SLOT_SIZE)
    data[0] = 1  # active firmware in slot 1
    data[8:16] = firmware.encode("ascii", "replace")[:8].ljust(8, b" ")
    return bytes(data)


@dataclasses.dataclass(frozen=True, slots=True)
class AsyncEvent:
    type: AsyncEventType
    info: int
    log_id: int

    @property
    def dw0(self) -> int:
        return int(self.type) | (self.info & 0xFF) << 8 | (self.log_id & 0xFF) << 16


# Which log page clears the mask of an event type when read with RAE=0.
EVENT_LOG = {
    AsyncEventType.ERROR: LogId.ERROR_INFO,
    AsyncEventType.SMART: LogId.SMART,
}


# SMART event info (reliability, temperature, spare) -> its critical-warning config bit
_SMART_INFO_TO_CONFIG_BIT = {0: 2, 1: 1, 2: 0}


_Events = tuple[list[int], list[AsyncEvent], set[AsyncEventType], int]


class AsyncEvents:
    """Queued events and the host's outstanding Asynchronous Event Requests.

    Once an event of some type is reported, further events of that type stay
    queued until the host reads the matching log page (with RAE cleared).
    """

    def __init__(self) -> None:
        self.requests: collections.deque[int] = collections.deque()  # held AER command ids
        self.queued: collections.deque[AsyncEvent] = collections.deque()
        self.masked: set[AsyncEventType] = set()
        self.config = 0  # Asynchronous Event Configuration feature value

    def reset(self) -> None:
        self.requests.clear()
        self.queued.clear()
        self.masked.clear()
        self.config = 0

    def enabled(self, event: AsyncEvent) -> bool:
        if event.type == AsyncEventType.SMART:
            bit = _SMART_INFO_TO_CONFIG_BIT.get(event.info)
            return bit is not None and bool(self.config >> bit & 1)
        if event.type == AsyncEventType.NOTICE:
            return bool(self.config >> (8 + event.info) & 1)
        return True  # error events cannot be disabled

    def post(self, event: AsyncEvent) -> None:
        # A guest can trigger error events at will (bad doorbell writes) while
        # their type stays masked: an event already waiting is not queued
        # twice, so the queue stays bounded by the distinct events there are.
        if self.enabled(event) and event not in self.queued:
            self.queued.append(event)

    def ready(self) -> list[tuple[int, AsyncEvent]]:
        """Pair held requests with reportable events; masks their types."""
        out = []
        for event in list(self.queued):
            if not self.requests:
                break
            if event.type in self.masked:
                continue
            self.queued.remove(event)
            self.masked.add(event.type)
            out.append((self.requests.popleft(), event))
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": list(self.requests),
            "queued": [[int(e.type), e.info, e.log_id] for e in self.queued],
            "masked": sorted(int(t) for t in self.masked),
            "config": self.config,
        }

    @staticmethod
    def check_snapshot(data: Any, aerl: int) -> _Events:
        events = dict_of(data, "events")
        requests = [int_in(c, 0, U16, "AER cid") for c in list_of(events["requests"], None, "aers")]
        if len(requests) > aerl + 1:
            raise Invalid("too many held AERs")
        queued = []
        for raw in list_of(events["queued"], None, "queued")[:256]:
            etype, info, lid = list_of(raw, 3, "event")
            queued.append(
                AsyncEvent(AsyncEventType(int_in(etype, 0, 2, "event type")),
                           int_in(info, 0, 255, "info"), int_in(lid, 0, 255, "log id"))
            )  # fmt: skip
        masked = {
            AsyncEventType(int_in(t, 0, 2, "masked")) for t in list_of(events["masked"], None, "m")
        }
        return requests, queued, masked, int_in(events["config"], 0, U32, "AEC")

    def load(self, checked: _Events) -> None:
        requests, queued, self.masked, self.config = checked
        self.requests.clear()
        self.requests.extend(requests)
        self.queued.clear()
        self.queued.extend(queued)

    def log_read(self, log_id: int) -> None:
        for event_type, lid in EVENT_LOG.items():
            if lid == log_id:
                self.masked.discard(event_type)

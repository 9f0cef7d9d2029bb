"""Migration v2: DEVICE_FEATURE, the state FSM, the data stream, dirty logging."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
from pcitest_helpers import checked_device_feature

from mdevcore.pci.device import PciDevice, PciIdentity
from mdevcore.pci.migration import (
    MIGRATION_FLAGS_ALL,
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    MigState,
    arcs,
    path,
)
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DmaMapping

S = MigState
GET, SET, PROBE = vfio.DEVICE_FEATURE_GET, vfio.DEVICE_FEATURE_SET, vfio.DEVICE_FEATURE_PROBE
MIG, STATE = vfio.DEVICE_FEATURE_MIGRATION, vfio.DEVICE_FEATURE_MIG_DEVICE_STATE
LOG_START = vfio.DEVICE_FEATURE_DMA_LOGGING_START
LOG_STOP = vfio.DEVICE_FEATURE_DMA_LOGGING_STOP
LOG_REPORT = vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT
MAGIC = b"CNT1"


class Counter(PciDevice):
    """A register whose value must survive migration."""

    def __init__(self, flags: int = MIGRATION_FLAGS_ALL) -> None:
        self.migration_flags = flags
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=1, class_code=0xFF0000))
        self.add_bar(0, 0x1000)
        self.value = 0
        self.arcs: list[tuple[MigState, MigState]] = []
        self.crash_on: tuple[MigState, MigState] | None = None
        self.refuse: tuple[MigState, MigState] | None = None

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        if (old, new) == self.crash_on:
            raise RuntimeError("device firmware fell over")
        if (old, new) == self.refuse:
            raise OSError(errno.EBUSY, "not now")
        self.arcs.append((old, new))

    def save_precopy(self) -> bytes:
        return b"PRE:" if self.migration_flags & MIGRATION_PRE_COPY else b""

    def save_state(self) -> bytes:
        return MAGIC + struct.pack("<Q", self.value)

    def load_state(self, data: bytes) -> None:
        data = data.removeprefix(b"PRE:")
        if len(data) != 12 or not data.startswith(MAGIC):
            raise OSError(errno.EINVAL, "not a counter state")
        (self.value,) = struct.unpack_from("<Q", data, 4)


def set_state(dev: PciDevice, state: int) -> int:
    reply = dev.device_feature(SET | STATE, struct.pack("<Ii", state, -1))
    assert len(reply) == 8
    return struct.unpack("<Ii", reply)[0]


def get_state(dev: PciDevice) -> int:
    return struct.unpack("<Ii", dev.device_feature(GET | STATE, b""))[0]


def feature_errno(dev: PciDevice, flags: int, data: bytes = b"") -> int:
    with pytest.raises(OSError) as info:
        checked_device_feature(dev, flags, data)  # as the engine delivers it
    assert info.value.errno is not None
    return info.value.errno


def drive(dev: Counter, state: MigState) -> None:
    """Bring ``dev`` to ``state`` (feeding valid data when passing RESUMING)."""
    for step in path(dev.migration_flags, dev.mig_state, state):
        if dev.mig_state == S.RESUMING:
            dev.mig_data_write(MAGIC + bytes(8))
        set_state(dev, step)


# --- DEVICE_FEATURE ----------------------------------------------------------


def test_not_migratable_offers_nothing() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    for feature in (MIG, STATE, LOG_START, LOG_STOP, LOG_REPORT, 3, 0xFFFF):
        assert feature_errno(dev, GET | feature) == errno.ENOTTY
        assert feature_errno(dev, PROBE | GET | feature) == errno.ENOTTY


def test_migration_flags_feature() -> None:
    dev = Counter(MIGRATION_STOP_COPY | MIGRATION_P2P)
    assert dev.device_feature(GET | MIG, b"") == struct.pack("<Q", 3)
    assert feature_errno(dev, SET | MIG, bytes(8)) == errno.EINVAL


def test_probe_semantics() -> None:
    dev = Counter()
    assert dev.device_feature(PROBE | GET | MIG, b"") == b""
    assert dev.device_feature(PROBE | MIG, b"") == b""
    assert dev.device_feature(PROBE | GET | SET | STATE, b"") == b""
    assert feature_errno(dev, PROBE | SET | MIG) == errno.EINVAL
    assert feature_errno(dev, PROBE | GET | LOG_START) == errno.EINVAL
    assert dev.device_feature(PROBE | SET | LOG_START, b"") == b""
    assert feature_errno(dev, PROBE | GET | 12) == errno.ENOTTY


def test_feature_flag_errors() -> None:
    dev = Counter()
    assert feature_errno(dev, MIG) == errno.EINVAL  # neither GET nor SET
    assert feature_errno(dev, GET | SET | STATE, bytes(8)) == errno.EINVAL
    assert feature_errno(dev, GET | MIG | (1 << 19)) == errno.EINVAL
    assert feature_errno(dev, SET | STATE, b"\x01") == errno.EINVAL  # short payload


def test_initial_state_is_running() -> None:
    assert get_state(Counter()) == S.RUNNING


def test_bad_migration_flags_rejected() -> None:
    with pytest.raises(ValueError):
        Counter(MIGRATION_P2P)


# --- the FSM -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [MIGRATION_STOP_COPY, MIGRATION_STOP_COPY | MIGRATION_P2P,
     MIGRATION_STOP_COPY | MIGRATION_PRE_COPY, MIGRATION_FLAGS_ALL],
)  # fmt: skip
def test_every_arc(flags: int) -> None:
    found = arcs(flags)
    expected = {(S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP), (S.STOP, S.RESUMING),
                (S.RESUMING, S.STOP)}  # fmt: skip
    if flags & MIGRATION_P2P:
        expected |= {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING),
                     (S.RUNNING_P2P, S.STOP), (S.STOP, S.RUNNING_P2P)}  # fmt: skip
    else:
        expected |= {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
    if flags & MIGRATION_PRE_COPY:
        expected |= {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING)}
        if flags & MIGRATION_P2P:
            expected |= {(S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
                         (S.PRE_COPY_P2P, S.RUNNING_P2P), (S.RUNNING_P2P, S.PRE_COPY_P2P),
                         (S.PRE_COPY_P2P, S.STOP_COPY)}  # fmt: skip
        else:
            expected |= {(S.PRE_COPY, S.STOP_COPY)}
    assert found == expected
    if flags == MIGRATION_FLAGS_ALL:
        assert len(found) == 15
    # Each arc, taken on a real device, is exactly one hook call.
    for old, new in sorted(found):
        dev = Counter(flags)
        drive(dev, old)
        dev.arcs.clear()
        if old == S.RESUMING:
            dev.mig_data_write(MAGIC + bytes(8))
        assert set_state(dev, new) == new
        assert dev.arcs == [(old, new)]


@pytest.mark.parametrize(
    ("flags", "start", "target", "expected"),
    [
        (MIGRATION_STOP_COPY, S.RUNNING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
        (MIGRATION_FLAGS_ALL, S.RUNNING, S.STOP_COPY, [S.RUNNING_P2P, S.STOP, S.STOP_COPY]),
        (MIGRATION_FLAGS_ALL, S.RUNNING, S.RESUMING, [S.RUNNING_P2P, S.STOP, S.RESUMING]),
        (MIGRATION_FLAGS_ALL, S.PRE_COPY, S.STOP_COPY, [S.PRE_COPY_P2P, S.STOP_COPY]),
        (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY, S.PRE_COPY, S.STOP_COPY, [S.STOP_COPY]),
        (MIGRATION_FLAGS_ALL, S.STOP, S.PRE_COPY, [S.RUNNING_P2P, S.RUNNING, S.PRE_COPY]),
        (MIGRATION_FLAGS_ALL, S.PRE_COPY, S.STOP, [S.RUNNING, S.RUNNING_P2P, S.STOP]),
        (MIGRATION_STOP_COPY, S.STOP_COPY, S.RUNNING, [S.STOP, S.RUNNING]),
        (MIGRATION_FLAGS_ALL, S.STOP_COPY, S.RUNNING, [S.STOP, S.RUNNING_P2P, S.RUNNING]),
        (MIGRATION_STOP_COPY, S.RESUMING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
    ],
)
def test_shortest_paths(
    flags: int, start: MigState, target: MigState, expected: list[MigState]
) -> None:
    assert path(flags, start, target) == expected
    dev = Counter(flags)
    drive(dev, start)
    dev.arcs.clear()
    if start == S.RESUMING:
        dev.mig_data_write(MAGIC + bytes(8))
    assert set_state(dev, target) == target
    assert [new for _, new in dev.arcs] == expected


@pytest.mark.parametrize(
    ("flags", "start", "target"),
    [
        (MIGRATION_FLAGS_ALL, S.STOP_COPY, S.PRE_COPY),
        (MIGRATION_FLAGS_ALL, S.STOP_COPY, S.PRE_COPY_P2P),
        (MIGRATION_FLAGS_ALL, S.RUNNING, S.ERROR),
        (MIGRATION_FLAGS_ALL, S.RUNNING, 8),
        (MIGRATION_STOP_COPY, S.RUNNING, S.RUNNING_P2P),
        (MIGRATION_STOP_COPY, S.RUNNING, S.PRE_COPY),
        (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY, S.RUNNING, S.PRE_COPY_P2P),
    ],
)
def test_invalid_requests(flags: int, start: MigState, target: int) -> None:
    dev = Counter(flags)
    drive(dev, start)
    with pytest.raises(OSError) as info:
        set_state(dev, target)
    assert info.value.errno == errno.EINVAL
    assert get_state(dev) == start


def test_error_is_left_only_by_reset() -> None:
    dev = Counter()
    dev.crash_on = (S.RUNNING_P2P, S.STOP)
    with pytest.raises(OSError) as info:
        set_state(dev, S.STOP)
    assert info.value.errno == errno.EIO
    assert get_state(dev) == S.ERROR
    for state in (S.RUNNING, S.STOP):
        with pytest.raises(OSError) as info:
            set_state(dev, state)
        assert info.value.errno == errno.EINVAL
    dev.reset()
    assert get_state(dev) == S.RUNNING


def test_refused_arc_stays_in_last_good_state() -> None:
    dev = Counter()
    dev.refuse = (S.STOP, S.STOP_COPY)
    with pytest.raises(OSError) as info:
        set_state(dev, S.STOP_COPY)
    assert info.value.errno == errno.EBUSY
    assert get_state(dev) == S.STOP  # the arcs before the refused one happened


# --- the data stream -----------------------------------------------------------


def read_all(dev: PciDevice, chunk: int) -> bytes:
    data = b""
    while True:
        part = dev.mig_data_read(chunk)
        data += part
        if len(part) < chunk:  # a short read ends the stream
            return data


def test_stream_round_trip_between_two_devices() -> None:
    src, dst = Counter(MIGRATION_STOP_COPY), Counter(MIGRATION_STOP_COPY)
    src.value = 0xDEADBEEF
    set_state(src, S.STOP_COPY)
    stream = read_all(src, 5)
    assert stream == MAGIC + struct.pack("<Q", 0xDEADBEEF)
    assert src.mig_data_read(5) == b""
    set_state(dst, S.RESUMING)
    for i in range(0, len(stream), 3):
        dst.mig_data_write(stream[i : i + 3])
    assert set_state(dst, S.RUNNING) == S.RUNNING
    assert dst.value == 0xDEADBEEF
    assert [new for _, new in dst.arcs] == [S.STOP, S.RESUMING, S.STOP, S.RUNNING]
    set_state(src, S.RUNNING)  # leaving the saving group ends the session
    set_state(src, S.STOP)
    with pytest.raises(OSError):
        src.mig_data_read(4)


def test_precopy_then_stop_copy() -> None:
    src, dst = Counter(), Counter()
    src.value = 7
    set_state(src, S.PRE_COPY)
    assert src.mig_data_read(100) == b"PRE:"  # what is available now
    assert src.mig_data_read(100) == b""
    set_state(src, S.STOP_COPY)
    rest = read_all(src, 4)
    set_state(dst, S.RESUMING)
    dst.mig_data_write(b"PRE:" + rest)
    set_state(dst, S.STOP)
    assert dst.value == 7


def test_mig_data_outside_its_states() -> None:
    dev = Counter()
    with pytest.raises(OSError) as info:
        dev.mig_data_read(10)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        dev.mig_data_write(b"x")
    assert info.value.errno == errno.EINVAL
    set_state(dev, S.STOP_COPY)
    with pytest.raises(OSError) as info:
        dev.mig_data_write(b"x")
    assert info.value.errno == errno.EINVAL


def test_bad_resume_data_is_einval_and_stays_resuming() -> None:
    dev = Counter()
    set_state(dev, S.RESUMING)
    dev.mig_data_write(b"garbage")
    with pytest.raises(OSError) as info:
        set_state(dev, S.RUNNING)
    assert info.value.errno == errno.EINVAL
    assert get_state(dev) == S.RESUMING
    dev.mig_data_write(MAGIC[:0])  # more data can still come
    dev.reset()
    assert get_state(dev) == S.RUNNING


def test_resume_size_limit() -> None:
    dev = Counter()
    assert dev.migration is not None
    dev.migration.stream.max_resume_bytes = 16
    set_state(dev, S.RESUMING)
    dev.mig_data_write(bytes(16))
    with pytest.raises(OSError) as info:
        dev.mig_data_write(b"x")
    assert info.value.errno == errno.EFBIG


def test_mig_data_size() -> None:
    dev = Counter(MIGRATION_STOP_COPY)
    assert dev.device_feature(GET | 9, b"") == struct.pack("<Q", 12)
    set_state(dev, S.STOP_COPY)
    dev.mig_data_read(5)
    assert dev.device_feature(GET | 9, b"") == struct.pack("<Q", 7)  # what is left


# --- DMA dirty logging ---------------------------------------------------------


def start_logging(dev: PciDevice, page: int, ranges: list[tuple[int, int]]) -> bytes:
    payload = struct.pack("<QII", page, len(ranges), 0)
    payload += b"".join(struct.pack("<QQ", a, n) for a, n in ranges)
    return dev.device_feature(SET | LOG_START, payload)


def report(dev: PciDevice, iova: int, length: int, page: int) -> int:
    reply = dev.device_feature(GET | LOG_REPORT, struct.pack("<QQQ", iova, length, page))
    assert reply[:24] == struct.pack("<QQQ", iova, length, page)
    assert len(reply) - 24 == ((length // page + 63) // 64) * 8
    return int.from_bytes(reply[24:], "little")


async def test_dirty_logging_tracks_device_writes() -> None:
    dev = Counter()
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * mmap.PAGESIZE)
    try:
        flags = vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE
        dev.dma_map(DmaMapping(address=0x100000, size=64 * 4096, flags=flags, fd=fd, offset=0))
        assert start_logging(dev, 4096, [(0x100000, 64 * 4096)])[:8] == struct.pack("<Q", 4096)
        await dev.dma_write(0x100000 + 4096 * 2 + 10, b"x")
        await dev.dma_write(0x100000 + 4096 * 5 - 1, b"yz")  # spans pages 4 and 5
        dev.dma.translate(0x100000 + 4096 * 63, 8, write=True)
        dev.dma.translate(0x100000 + 4096 * 9, 8, write=False)  # reads are not logged
        await dev.dma_read(0x100000 + 4096 * 10, 8)
        assert report(dev, 0x100000, 64 * 4096, 4096) == (1 << 2) | (1 << 4) | (1 << 5) | (1 << 63)
        assert report(dev, 0x100000, 64 * 4096, 4096) == 0  # reports clear
        await dev.dma_write(0x100000 + 4096 * 3, b"x")
        assert report(dev, 0x100000 + 4096 * 2, 4096 * 2, 4096) == 0b10
        with pytest.raises(OSError) as info:
            report(dev, 0x100000, 4096, 8192)  # page size mismatch
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            report(dev, 0x100001, 4096, 4096)  # unaligned
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            start_logging(dev, 4096, [])
        assert info.value.errno == errno.EBUSY
        dev.device_feature(SET | LOG_STOP, b"")
        with pytest.raises(OSError) as info:
            report(dev, 0x100000, 4096, 4096)
        assert info.value.errno == errno.EINVAL
    finally:
        dev.disconnected()
        os.close(fd)


async def test_dirty_logging_records_only_the_requested_ranges() -> None:
    dev = Counter()
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * mmap.PAGESIZE)
    try:
        flags = vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE
        dev.dma_map(DmaMapping(address=0x100000, size=64 * 4096, flags=flags, fd=fd, offset=0))
        start_logging(dev, 4096, [(0x100000, 4 * 4096), (0x100000 + 8 * 4096, 4096)])
        await dev.dma_write(0x100000 + 4096 * 4 - 1, b"yz")  # pages 3 (logged) and 4 (not)
        await dev.dma_write(0x100000 + 4096 * 10, b"x")  # outside every range
        dev.dma.translate(0x100000 + 4096 * 7, 3 * 4096, write=True)  # pages 7-9: only 8
        assert report(dev, 0x100000, 64 * 4096, 4096) == (1 << 3) | (1 << 8)
        assert dev.dma.dirty is not None and not dev.dma.dirty.dirty_pages()
    finally:
        dev.disconnected()
        os.close(fd)


def test_logging_start_validation() -> None:
    dev = Counter()
    # A smaller page size is raised to 4 KiB, and the reply says so.
    assert start_logging(dev, 512, [])[:8] == struct.pack("<Q", 4096)
    dev.device_feature(SET | LOG_STOP, b"")
    for page, ranges in ((3000, []), (0, []), (4096, [(0, 0)]), (4096, [(0, 8192), (4096, 4096)])):
        with pytest.raises(OSError) as info:
            start_logging(dev, page, ranges)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:  # num_ranges disagrees with the payload
        dev.device_feature(SET | LOG_START, struct.pack("<QII", 4096, 2, 0))
    assert info.value.errno == errno.EINVAL

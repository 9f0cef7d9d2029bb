"""What the fuzzers found: each finding as a regression test (and a corpus entry).

The inputs are also kept in tests/fuzz/corpus/<target>/finding-* (replayed by
test_fuzz_corpus); here each is stated as the behaviour it broke.
"""

from __future__ import annotations

import errno
import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mdevcore.tools.fuzz as fuzz
from mdevcore.core import MdevCore
from mdevcore.kernel_parse import kstrtobool, kstrtoul, parse_uuid, sysfs_streq
from mdevcore.parents.pds.vf import STATE_MAGIC
from mdevcore.samples.mtty.device import MttyDriver
from mdevcore.sysfs.mdev_view import create_store, remove_store
from mdevcore.tools.fuzz.targets import kernel_model as km
from mdevcore.tools.fuzz.targets.migration import BusyVf, snapshot
from mdevcore.tools.fuzz.targets.virtio import AVAIL, DATA, DESC, USED, Guest, VirtioTarget
from mdevcore.virtio import spec
from mdevcore.virtio.chain import Chain, VirtqError, scatter
from mdevcore.virtio.virtqueue import SplitQueue

U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno or -1


@pytest.fixture
def busy_vf(tmp_path: Path) -> Iterator[BusyVf]:
    vf = BusyVf(str(tmp_path))
    yield vf
    vf.close()


@pytest.fixture
def core() -> MdevCore:
    c = MdevCore()
    c.register_parent("mtty", "devices/virtual/mtty/mtty", MttyDriver())
    return c


# --- migration: the pds NVMe VF ----------------------------------------------


def test_vf_state_without_controller_is_refused_before_config_changes(busy_vf: BusyVf) -> None:
    """Found by `migration`: KeyError escaped load_state after config space was replaced."""
    vf = busy_vf.vf
    snapshot(vf)  # settle the status register's INTx bit (see the target)
    before = snapshot(vf)
    blob = json.loads(before[0][len(STATE_MAGIC) :])
    del blob["controller"]
    config = bytearray.fromhex(blob["config"])
    config[4] ^= 0x04  # another command register: the change a refusal must not make
    blob["config"] = config.hex()
    stream = STATE_MAGIC + json.dumps(blob).encode()
    assert errno_of(vf.load_state, stream) == errno.EINVAL
    assert snapshot(vf) == before


# --- sysfs stores against the kernel's rules ----------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [(b"1\n\0\0\0", 1), (b"0x10\0junk", 16), (b"7\0", 7)],
)
def test_kstrtoul_stops_at_nul_like_a_c_string(text: bytes, value: int) -> None:
    """Found by `sysfs`: kernfs NUL-terminates the buffer; kstrtoul reads up to the NUL."""
    assert kstrtoul(text) == value == km.kstrtou(text, 64)


@pytest.mark.parametrize("text", ["9" * 25 + "x", "0x" + "f" * 17 + "g", "9" * 30 + "\n\n"])
def test_kstrtoul_overflow_wins_over_trailing_junk(text: str) -> None:
    """Found by `sysfs`: _kstrtoull reports the overflow before looking at the rest."""
    assert errno_of(kstrtoul, text) == errno.ERANGE
    assert km.kstrtou(text.encode(), 64) == km.Errno(errno.ERANGE)


def test_remove_store_answers_einval_for_every_parse_failure(core: MdevCore) -> None:
    """Found by `sysfs`: remove_store maps kstrtoul's ERANGE to EINVAL, we passed it on."""
    dev = create_store(core, "mtty", "mtty-2", U1)
    assert errno_of(remove_store, core, dev.uuid, "9" * 30) == errno.EINVAL
    assert dev.uuid in core.devices
    remove_store(core, dev.uuid, b"1\n\0\0")  # NUL-padded, as some tools write
    assert dev.uuid not in core.devices


@pytest.mark.parametrize(("text", "value"), [("e", True), ("Enable", True), ("d", False)])
def test_kstrtobool_takes_enable_and_disable(text: str, value: bool) -> None:
    """Found against Linux 6.2+'s kstrtobool, which added E/e and D/d."""
    assert kstrtobool(text) is value
    assert km.kstrtobool(text.encode()) is value


def test_sysfs_streq_stops_at_nul() -> None:
    """Found by `sysfs`: "0000:00:01.0\\0..." names the device for bind/unbind/probe."""
    assert sysfs_streq(b"0000:00:01.0\0junk", "0000:00:01.0")
    assert sysfs_streq(b"0000:00:01.0\n\0", "0000:00:01.0")
    assert not sysfs_streq(b"0000:00:01.\0", "0000:00:01.0")


@pytest.mark.parametrize("tail", [" ", "0", "\0", "\x8a"])
def test_create_takes_any_37th_byte_like_the_kernel(tail: str) -> None:
    """Found by `sysfs`: create_store checks the count (36 or 37), guid_parse the first 36."""
    assert km.mdev_create((U1 + tail).encode("latin-1")) == uuid.UUID(U1)
    assert parse_uuid((U1 + tail).encode("latin-1")) == uuid.UUID(U1)


def test_the_37th_byte_finding_is_kept_in_the_corpus() -> None:
    names = [p.name for p in fuzz.corpus_files("sysfs")]
    assert "finding-create-37th-byte" in names


# --- virtio: descriptor chains ------------------------------------------------


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def pop_one(guest: Guest, descs: list[tuple[int, int, int, int]], table: bytes) -> Chain | None:
    guest.write(DESC, b"".join(spec.DESC.pack(*d) for d in descs))
    guest.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    guest.write(DATA, table)
    q = SplitQueue(guest, 0, 8)  # type: ignore[arg-type]
    q.size, q.desc, q.driver, q.device = 8, DESC, AVAIL, USED
    q.enable(spec.bit(spec.F_INDIRECT_DESC))
    return q.pop()


TABLE = spec.DESC.pack(DATA + 0x100, 12, spec.DESC_F_NEXT, 1) + spec.DESC.pack(
    DATA + 0x200, 1514, spec.DESC_F_WRITE, 0
)


def test_write_flag_on_an_indirect_descriptor_is_ignored(guest: Guest) -> None:
    """Found by `virtio`: 2.7.5.3.2 says the device MUST ignore it; we refused the chain."""
    flags = spec.DESC_F_INDIRECT | spec.DESC_F_WRITE
    chain = pop_one(guest, [(DATA, len(TABLE), flags, 0)], TABLE)
    assert chain is not None
    assert (chain.readable, chain.writable) == ([(DATA + 0x100, 12)], [(DATA + 0x200, 1514)])


def test_an_indirect_table_may_end_a_chain_of_direct_descriptors(guest: Guest) -> None:
    """2.7.5.3.2: the device MUST handle direct descriptors followed by one indirect."""
    descs = [(DATA + 0x800, 8, spec.DESC_F_NEXT, 1), (DATA, len(TABLE), spec.DESC_F_INDIRECT, 0)]
    chain = pop_one(guest, descs, TABLE)
    assert chain is not None
    assert chain.readable == [(DATA + 0x800, 8), (DATA + 0x100, 12)]
    assert chain.writable == [(DATA + 0x200, 1514)]


def test_indirect_with_next_is_still_refused(guest: Guest) -> None:
    flags = spec.DESC_F_INDIRECT | spec.DESC_F_NEXT
    with pytest.raises(VirtqError):
        pop_one(guest, [(DATA, len(TABLE), flags, 1), (DATA, 8, 0, 0)], TABLE)


def test_a_driver_idx_scattered_over_is_seen_on_the_next_pop(guest: Guest) -> None:
    """Found by `virtio` (the target's reference, not the device): a chain's
    writable buffer lay on the avail ring, scattering into it moved the
    driver's idx, and the device - reading idx afresh, as it must - refused
    the next pop while the reference still used the idx it read first (and,
    in the second input, expected nothing of the pop after the last slot).
    The inputs are kept as edge-avail-idx-scattered-over*."""
    guest.write(DESC, spec.DESC.pack(AVAIL, 4, spec.DESC_F_WRITE, 0))
    guest.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    q = SplitQueue(guest, 0, 8)  # type: ignore[arg-type]
    q.size, q.desc, q.driver, q.device = 8, DESC, AVAIL, USED
    q.enable(0)
    chain = q.pop()
    assert chain is not None and chain.writable == [(AVAIL, 4)]
    scatter(guest, chain, struct.pack("<HH", 0, 0x7FFF))  # avail idx := 0x7fff
    q.push([(chain.head, 4)])
    with pytest.raises(VirtqError, match="ahead"):
        q.pop()
    for name in ("edge-avail-idx-scattered-over", "edge-avail-idx-scattered-over-last-pop"):
        VirtioTarget().run((fuzz.CORPUS / "virtio" / name).read_bytes())  # no Finding now

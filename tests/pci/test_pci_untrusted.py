"""Untrusted clients: any request either works or fails with an errno.

Hypothesis drives random requests through every DeviceBackend entry point
of a device with all features; the only acceptable failure is OSError with
an errno set, and the device must keep answering afterwards.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from pcitest_helpers import PlainDevice, checked_device_feature, checked_set_irqs

from mdevcore.pci.migration import MIGRATION_FLAGS_ALL
from mdevcore.vfio_user.backend import DmaMapping

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
SMALL = st.integers(min_value=0, max_value=0x5000)
ADDR = st.one_of(SMALL, U64)
INDEX = st.integers(min_value=0, max_value=12)


class Everything(PlainDevice):
    migration_flags = MIGRATION_FLAGS_ALL

    def save_state(self) -> bytes:
        return b"state"

    def load_state(self, data: bytes) -> None:
        if data != b"state":
            raise OSError(22, "bad state")


request = st.one_of(
    st.tuples(st.just("read"), INDEX, st.one_of(SMALL, U64), st.integers(0, 64)),
    st.tuples(st.just("write"), INDEX, st.one_of(SMALL, U64), st.binary(max_size=64)),
    st.tuples(
        st.just("irqs"), INDEX, st.integers(0, 127), st.integers(0, 10),
        st.integers(0, 10), st.binary(max_size=12), st.integers(0, 3),
    ),
    st.tuples(st.just("map"), st.one_of(SMALL, U64), st.one_of(SMALL, U64), st.integers(0, 7)),
    st.tuples(st.just("mapfd"), ADDR, ADDR, ADDR),
    st.tuples(st.just("unmap"), st.one_of(SMALL, U64), st.one_of(SMALL, U64), st.integers(0, 3)),
    st.tuples(st.just("feature"), st.integers(0, (1 << 20) - 1), st.binary(max_size=48)),
    st.tuples(st.just("migread"), st.integers(0, 100)),
    st.tuples(st.just("migwrite"), st.binary(max_size=16)),
    st.tuples(st.just("info"), INDEX),
    st.tuples(st.just("reset")),
)  # fmt: skip


def apply(dev: Everything, req: tuple, fds: list[int]) -> None:  # type: ignore[type-arg]
    kind = req[0]
    if kind == "read":
        dev.region_read(req[1], req[2], req[3])
    elif kind == "write":
        dev.region_write(req[1], req[2], req[3])
    elif kind == "irqs":
        _, index, flags, start, count, data, nfds = req
        checked_set_irqs(dev, index, flags, start, count, data, fds[1 : 1 + nfds])
    elif kind == "map":
        dev.dma_map(DmaMapping(address=req[1], size=req[2], flags=req[3], fd=None, offset=0))
    elif kind == "mapfd":  # fds[0] is a 16 KiB memfd standing in for guest RAM
        dev.dma_map(DmaMapping(address=req[1], size=req[2], flags=3, fd=fds[0], offset=req[3]))
    elif kind == "unmap":
        dev.dma_unmap(req[1], req[2], req[3])
    elif kind == "feature":
        checked_device_feature(dev, req[1], req[2])
    elif kind == "migread":
        dev.mig_data_read(req[1])
    elif kind == "migwrite":
        dev.mig_data_write(req[1])
    elif kind == "info":
        dev.region_info(req[1])
        dev.irq_info(req[1])
    else:
        dev.reset()


@settings(max_examples=300, deadline=None)
@given(st.lists(request, max_size=25))
def test_random_requests_only_fail_with_errno(requests: list[tuple]) -> None:  # type: ignore[type-arg]
    dev = Everything()
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 0x4000)
    fds = [ram] + [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        for req in requests:
            try:
                apply(dev, req, fds)
            except OSError as exc:
                assert exc.errno, f"{req} raised OSError without errno: {exc!r}"
        # Still serving.
        assert len(dev.region_read(7, 0, 4)) == 4
        dev.raise_irq(0)
    finally:
        dev.close()
        for fd in fds:
            os.close(fd)

"""Migration driven by hand over vfio-user: the VFIO v2 steps a VMM takes, one call each.

Tests (and benchmarks/migration_nvme.py) use these instead of the
migration tool so that the device side is checked on its own.  VFs are
served in-process by a DeviceServer each, in one trio run; the blocking
clients run in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator, Sequence

import trio

from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory
from mdevcore.parents.pds.vf import PdsNvmeVf, VfConfig
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_DMA_LOGGING_REPORT,
    DEVICE_FEATURE_DMA_LOGGING_START,
    DEVICE_FEATURE_DMA_LOGGING_STOP,
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MIG_DEVICE_STATE,
    DEVICE_FEATURE_SET,
)
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.server import DeviceServer

STREAM_CHUNK = 1 << 16


@contextlib.asynccontextmanager
async def serve_vfs(
    workdir: str, configs: Sequence[VfConfig]
) -> AsyncIterator[list[tuple[PdsNvmeVf, str]]]:
    """One served VF per config; yields (vf, socket path) pairs."""
    served: list[tuple[PdsNvmeVf, str]] = []
    try:
        async with trio.open_nursery() as nursery:
            for i, config in enumerate(configs):
                vf = PdsNvmeVf(config, name=f"vf{i}")
                path = os.path.join(workdir, f"vf{i}.sock")
                served.append((vf, path))
                await nursery.start(DeviceServer(vf, path, name=f"vf{i}").serve)
            yield served
            nursery.cancel_scope.cancel()
    finally:
        for vf, _ in served:
            vf.close()


def connect(path: str, mem: GuestMemory) -> Client:
    """A client as the VMM holds it: negotiated, guest memory mapped."""
    client = Client(path)
    client.negotiate()
    mem.map_into(client)
    return client


def set_state(dev: Client, state: MigState) -> MigState:
    _, _, data = dev.device_feature(
        DEVICE_FEATURE_SET | DEVICE_FEATURE_MIG_DEVICE_STATE, struct.pack("<Ii", state, -1)
    )
    return MigState(struct.unpack_from("<I", data)[0])


def get_state(dev: Client) -> MigState:
    _, _, data = dev.device_feature(DEVICE_FEATURE_GET | DEVICE_FEATURE_MIG_DEVICE_STATE)
    return MigState(struct.unpack_from("<I", data)[0])


def read_stream(dev: Client) -> bytes:
    """MIG_DATA_READ until the device has nothing more (end of stream)."""
    parts = []
    while chunk := dev.mig_data_read(STREAM_CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def write_stream(dev: Client, stream: bytes) -> None:
    for pos in range(0, len(stream), STREAM_CHUNK):
        dev.mig_data_write(stream[pos : pos + STREAM_CHUNK])


def copy_memory(src: GuestMemory, dst: GuestMemory) -> None:
    """Every guest page, source to destination (the SQs and CQs among them)."""
    assert src.size == dst.size
    for page in range(src.size // PAGE_SIZE):
        dst.load_page(page, src.page(page))


def logging_start(dev: Client, ranges: Sequence[tuple[int, int]], page: int = PAGE_SIZE) -> None:
    body = struct.pack("<QII", page, len(ranges), 0)
    body += b"".join(struct.pack("<QQ", iova, length) for iova, length in ranges)
    dev.device_feature(DEVICE_FEATURE_SET | DEVICE_FEATURE_DMA_LOGGING_START, body)


def logging_stop(dev: Client) -> None:
    dev.device_feature(DEVICE_FEATURE_SET | DEVICE_FEATURE_DMA_LOGGING_STOP)


def logging_report(dev: Client, iova: int, length: int, page: int = PAGE_SIZE) -> set[int]:
    """Dirty pages (absolute page numbers, IOVA // page) the device reports."""
    bitmap_bytes = (length // page + 63) // 64 * 8
    _, _, data = dev.device_feature(
        DEVICE_FEATURE_GET | DEVICE_FEATURE_DMA_LOGGING_REPORT,
        struct.pack("<QQQ", iova, length, page),
        argsz=8 + 24 + bitmap_bytes,
    )
    bitmap = int.from_bytes(data[24 : 24 + bitmap_bytes], "little")
    first = iova // page
    pages = set()
    while bitmap:
        low = bitmap & -bitmap
        pages.add(first + low.bit_length() - 1)
        bitmap ^= low
    return pages

"""NVM command set (I/O queues): Read, Write, Flush, Write Zeroes, Dataset Management."""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable

from mdevcore.nvme.context import IoContext
from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.prp import data_views, read_guest, release
from mdevcore.nvme.queues import Command
from mdevcore.nvme.spec import (
    BROADCAST_NSID,
    Generic,
    IoOpcode,
    NvmeError,
    StatusType,
    generic,
)

log = logging.getLogger(__name__)

MEDIA_WRITE_FAULT = 0x80
MEDIA_UNRECOVERED_READ = 0x81
CAPACITY_EXCEEDED = 0x81  # generic status, LBA range 80h-BFh

_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in LBAs, starting LBA
DSM_ATTR_DEALLOCATE = 1 << 2
WZ_DEAC = 1 << 25
RW_FUA = 1 << 30


def execute(ctrl: IoContext, sqid: int, cmd: Command) -> int:
    handler = _HANDLERS.get(cmd.opcode)
    if handler is None:
        raise generic(Generic.INVALID_OPCODE, f"I/O opcode {cmd.opcode:#x}")
    return handler(ctrl, cmd)


def _lba_range(ns: FileNamespace, slba: int, count: int) -> None:
    if slba + count > ns.nlbas:
        raise generic(Generic.LBA_OUT_OF_RANGE, f"LBA {slba}+{count} beyond {ns.nlbas}")


def _blocks(ctrl: IoContext, cmd: Command) -> tuple[FileNamespace, int, int]:
    """Namespace, SLBA and block count of a Read/Write/Write Zeroes, range-checked."""
    ns = ctrl.require_namespace(cmd.nsid)
    slba = cmd.cdw11 << 32 | cmd.cdw10
    nlb = (cmd.cdw12 & 0xFFFF) + 1  # NLB is 0-based
    _lba_range(ns, slba, nlb)
    return ns, slba, nlb


def _media_error(exc: OSError, write: bool) -> NvmeError:
    if exc.errno == errno.ENOSPC:
        return NvmeError(StatusType.GENERIC, CAPACITY_EXCEEDED, "backing store full")
    if exc.errno == errno.EIO:
        sc = MEDIA_WRITE_FAULT if write else MEDIA_UNRECOVERED_READ
        return NvmeError(StatusType.MEDIA, sc, f"backing file: {exc.strerror}")
    return NvmeError(StatusType.GENERIC, Generic.INTERNAL_ERROR, f"backing file: {exc}")


def _read_write(ctrl: IoContext, cmd: Command, write: bool) -> int:
    ns, slba, nlb = _blocks(ctrl, cmd)
    length = nlb * ns.lba_size
    if length > ctrl.config.max_transfer:
        raise generic(Generic.INVALID_FIELD, f"{length} bytes exceed MDTS")
    # Read fills guest memory, Write takes from it.
    views = data_views(ctrl.dma, cmd.prp1, cmd.prp2, length, ctrl.page_size, not write)
    try:
        if write:
            ns.write(slba, views)
            if cmd.cdw12 & RW_FUA and ns.write_cache:
                ns.flush()
        else:
            ns.read(slba, views)
    except OSError as exc:
        raise _media_error(exc, write) from exc
    finally:
        release(views)
    smart = ctrl.smart
    if write:
        smart.bytes_written += length
        smart.write_commands += 1
    else:
        smart.bytes_read += length
        smart.read_commands += 1
    return 0


def read(ctrl: IoContext, cmd: Command) -> int:
    return _read_write(ctrl, cmd, write=False)


def write(ctrl: IoContext, cmd: Command) -> int:
    return _read_write(ctrl, cmd, write=True)


def flush(ctrl: IoContext, cmd: Command) -> int:
    targets = ctrl.namespaces if cmd.nsid == BROADCAST_NSID else [ctrl.require_namespace(cmd.nsid)]
    try:
        for ns in targets:
            ns.flush()
    except OSError as exc:
        raise _media_error(exc, True) from exc
    return 0


def write_zeroes(ctrl: IoContext, cmd: Command) -> int:
    ns, slba, nlb = _blocks(ctrl, cmd)
    try:
        ns.write_zeroes(slba, nlb, deallocate=bool(cmd.cdw12 & WZ_DEAC))
        if cmd.cdw12 & RW_FUA and ns.write_cache:
            ns.flush()
    except OSError as exc:
        raise _media_error(exc, True) from exc
    return 0


def dataset_management(ctrl: IoContext, cmd: Command) -> int:
    ns = ctrl.require_namespace(cmd.nsid)
    nr = (cmd.cdw10 & 0xFF) + 1
    raw = read_guest(ctrl.dma, cmd.prp1, cmd.prp2, nr * _DSM_RANGE.size, ctrl.page_size)
    if not cmd.cdw11 & DSM_ATTR_DEALLOCATE:
        return 0  # integral-read/write hints only: nothing to do
    ranges = [(slba, count) for _attr, count, slba in _DSM_RANGE.iter_unpack(raw)]
    for slba, count in ranges:  # check all first: a bad range changes nothing
        _lba_range(ns, slba, count)
    try:
        for slba, count in ranges:
            if count:
                ns.deallocate(slba, count)
    except OSError as exc:
        raise _media_error(exc, True) from exc
    return 0


_HANDLERS: dict[int, Callable[[IoContext, Command], int]] = {
    IoOpcode.FLUSH: flush,
    IoOpcode.WRITE: write,
    IoOpcode.READ: read,
    IoOpcode.WRITE_ZEROES: write_zeroes,
    IoOpcode.DATASET_MANAGEMENT: dataset_management,
}

"""Structural checks of the requests whose structure VFIO defines.

Called once, by whoever parses the request off the wire (the engine), so
that the layers behind (the PCI model's IrqController) trust the shape
and check only what needs device knowledge.  Each check raises
OSError(EINVAL), as VFIO does.
"""

from __future__ import annotations

import errno

from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MASK,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
)

IRQ_DATA_TYPES = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_ACTION_TYPES = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER
FEATURE_FLAGS = DEVICE_FEATURE_MASK | DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | DEVICE_FEATURE_PROBE


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, why)


def check_set_irqs(
    flags: int, start: int, count: int, data_len: int, nfds: int, vectors: int
) -> None:
    """SET_IRQS against an index with ``vectors`` vectors (from GET_IRQ_INFO)."""
    if flags & ~(IRQ_DATA_TYPES | IRQ_ACTION_TYPES):
        raise _einval(f"SET_IRQS unknown flags {flags:#x}")
    dtype, action = flags & IRQ_DATA_TYPES, flags & IRQ_ACTION_TYPES
    if dtype.bit_count() != 1 or action.bit_count() != 1:
        raise _einval(f"SET_IRQS needs one data and one action flag, got {flags:#x}")
    if count == 0:
        # The only zero-count request: disable the whole index.
        if flags != IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER:
            raise _einval("SET_IRQS count 0 is only for DATA_NONE|TRIGGER (disable)")
        if start != 0:
            raise _einval("SET_IRQS count 0 with a non-zero start")
    elif start < 0 or start + count > vectors:
        raise _einval(f"SET_IRQS vectors {start}+{count} beyond {vectors}")
    expect_data = count if dtype == IRQ_SET_DATA_BOOL else 0
    if data_len != expect_data:
        raise _einval(f"SET_IRQS carries {data_len} data bytes, expected {expect_data}")
    if dtype == IRQ_SET_DATA_EVENTFD:
        if nfds not in (0, count):
            raise _einval(f"SET_IRQS {nfds} eventfds for count {count}")
    elif nfds:
        raise _einval("SET_IRQS fds without DATA_EVENTFD")


def check_device_feature(flags: int) -> None:
    if flags & ~FEATURE_FLAGS:
        raise _einval(f"DEVICE_FEATURE unknown flags {flags:#x}")
    get_set = flags & (DEVICE_FEATURE_GET | DEVICE_FEATURE_SET)
    if not flags & DEVICE_FEATURE_PROBE and get_set in (0, DEVICE_FEATURE_GET | DEVICE_FEATURE_SET):
        raise _einval("DEVICE_FEATURE needs exactly one of GET/SET (or PROBE)")

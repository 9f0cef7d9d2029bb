"""SET_IRQS when the fd table is full: EMFILE, and every vector keeps its eventfd."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from pcitest_helpers import PlainDevice, drain, eventfds

from mdevcore.pci.irq import IrqIndex
from mdevcore.vfio_user import backend as vfio

MSIX = vfio.PCI_MSIX_IRQ_INDEX
EVENTFD_TRIGGER = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER
LOOPBACK = vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_ACTION_TRIGGER

FdTableFull = Callable[[], AbstractContextManager[None]]


def test_reassign_without_a_free_fd_keeps_the_old_eventfd(fd_table_full: FdTableFull) -> None:
    irq = IrqIndex(MSIX, 1, "dev")
    with eventfds(2) as (old, new):
        irq.assign(0, old)
        with fd_table_full(), pytest.raises(OSError) as info:
            irq.assign(0, new)
        assert info.value.errno == errno.EMFILE
        assert irq.active() and irq.fire(0)
        assert (drain(old), drain(new)) == (1, 0)
        irq.close_all()
        assert not irq.active()


def test_set_irqs_is_all_or_nothing_when_fds_run_out(fd_table_full: FdTableFull) -> None:
    dev = PlainDevice()
    with eventfds(4) as fds:
        dev.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 2, b"", fds[:2])
        spare = os.open(os.devnull, os.O_RDONLY)
        with fd_table_full():
            os.close(spare)  # room for one dup of the two needed
            with pytest.raises(OSError) as info:
                dev.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 2, b"", fds[2:])
            assert info.value.errno == errno.EMFILE
            os.close(os.open(os.devnull, os.O_RDONLY))  # the dup made was given back
        dev.set_irqs(MSIX, LOOPBACK, 0, 2, b"", [])
        assert [drain(fd) for fd in fds] == [1, 1, 0, 0]
        dev.close()

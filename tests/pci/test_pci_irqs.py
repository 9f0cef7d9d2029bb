"""SET_IRQS, IRQ info, delivery, masks and pending state, with real eventfds."""

from __future__ import annotations

import errno
import os

import pytest
from pcitest_helpers import PlainDevice, cfg_read, cfg_write, checked_set_irqs, drain, eventfds

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.vfio_user import backend as vfio

INTX, MSI, MSIX, ERR, REQ = range(5)
NONE = vfio.IRQ_SET_DATA_NONE
BOOL = vfio.IRQ_SET_DATA_BOOL
EVENTFD = vfio.IRQ_SET_DATA_EVENTFD
MASK = vfio.IRQ_SET_ACTION_MASK
UNMASK = vfio.IRQ_SET_ACTION_UNMASK
TRIGGER = vfio.IRQ_SET_ACTION_TRIGGER


def einval(fn: object, *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == errno.EINVAL, info.value


def test_irq_info() -> None:
    dev = PlainDevice()
    intx, msi, msix, err, req = (dev.irq_info(i) for i in range(5))
    assert intx.count == 1
    assert intx.flags == vfio.IRQ_INFO_EVENTFD | vfio.IRQ_INFO_MASKABLE | vfio.IRQ_INFO_AUTOMASKED
    assert (msi.count, msi.flags) == (4, vfio.IRQ_INFO_EVENTFD | vfio.IRQ_INFO_NORESIZE)
    assert (msix.count, msix.flags) == (8, vfio.IRQ_INFO_EVENTFD | vfio.IRQ_INFO_NORESIZE)
    assert (err.count, err.flags) == (1, vfio.IRQ_INFO_EVENTFD)
    assert (req.count, req.flags) == (1, vfio.IRQ_INFO_EVENTFD)
    assert PlainDevice(pin=0).irq_info(INTX).count == 0
    einval(dev.irq_info, 5)


def test_assign_trigger_loopback_and_disable() -> None:
    dev = PlainDevice()
    with eventfds(4) as fds:
        dev.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, b"", fds)
        dev.set_irqs(MSI, NONE | TRIGGER, 1, 2, b"", [])  # loopback: vectors 1, 2
        assert [drain(fd) for fd in fds] == [0, 1, 1, 0]
        dev.set_irqs(MSI, BOOL | TRIGGER, 0, 4, b"\x01\x00\x00\x01", [])
        assert [drain(fd) for fd in fds] == [1, 0, 0, 1]
        dev.set_irqs(MSI, NONE | TRIGGER, 0, 0, b"", [])  # count 0: disable index
        dev.set_irqs(MSI, NONE | TRIGGER, 0, 4, b"", [])
        assert [drain(fd) for fd in fds] == [0, 0, 0, 0]
        assert dev.irqs.indexes[MSI].fds == [None] * 4


def test_kept_fds_are_duplicates() -> None:
    dev = PlainDevice()
    with eventfds(1) as fds:
        dev.set_irqs(ERR, EVENTFD | TRIGGER, 0, 1, b"", fds)
        kept = dev.irqs.indexes[ERR].fds[0]
        assert kept is not None and kept != fds[0]
    # The caller's fd is closed; ours still works and reaches the same eventfd.
    os.fstat(kept)
    dev.set_irqs(ERR, NONE | TRIGGER, 0, 0, b"", [])
    with pytest.raises(OSError):
        os.fstat(kept)


def test_eventfd_without_fds_deassigns_range() -> None:
    dev = PlainDevice()
    with eventfds(4) as fds:
        dev.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, b"", fds)
        dev.set_irqs(MSI, EVENTFD | TRIGGER, 1, 2, b"", [])
        for v in range(4):
            dev.raise_irq(v)
        assert [drain(fd) for fd in fds] == [1, 0, 0, 1]


def test_partial_assignment_keeps_other_vectors() -> None:
    dev = PlainDevice()
    with eventfds(3) as fds:
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, b"", fds[:1])
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 5, 2, b"", fds[1:])
        for v in (0, 5, 6, 7):
            dev.raise_irq(v)
        assert [drain(fd) for fd in fds] == [1, 1, 1]


@pytest.mark.parametrize(
    ("index", "flags", "start", "count", "data", "nfds"),
    [
        (5, NONE | TRIGGER, 0, 1, b"", 0),  # bad index
        (MSI, TRIGGER, 0, 1, b"", 0),  # no DATA_*
        (MSI, NONE | BOOL | TRIGGER, 0, 1, b"\x01", 0),  # two DATA_*
        (MSI, NONE, 0, 1, b"", 0),  # no ACTION_*
        (MSI, NONE | MASK | UNMASK, 0, 1, b"", 0),  # two ACTION_*
        (MSI, NONE | TRIGGER | (1 << 6), 0, 1, b"", 0),  # unknown flag
        (MSI, NONE | TRIGGER, 3, 2, b"", 0),  # start + count beyond 4
        (MSI, NONE | TRIGGER, 4, 1, b"", 0),  # start beyond
        (MSI, BOOL | TRIGGER, 0, 2, b"\x01", 0),  # short bool array
        (MSI, BOOL | TRIGGER, 0, 0, b"", 0),  # count 0 needs DATA_NONE
        (MSI, NONE | MASK, 0, 0, b"", 0),  # count 0 needs TRIGGER
        (MSI, NONE | TRIGGER, 1, 0, b"", 0),  # disable with a start
        (MSI, EVENTFD | TRIGGER, 0, 2, b"", 1),  # fd count != count
        (MSI, NONE | TRIGGER, 0, 1, b"", 1),  # fds without DATA_EVENTFD
        (MSI, NONE | TRIGGER, 0, 1, b"\x01", 0),  # data with DATA_NONE
        (ERR, NONE | MASK, 0, 1, b"", 0),  # ERR only triggers
        (REQ, NONE | UNMASK, 0, 1, b"", 0),  # REQ only triggers
        (INTX, NONE | TRIGGER, 0, 2, b"", 0),  # INTx has one vector
    ],
)
def test_set_irqs_rejects(
    index: int, flags: int, start: int, count: int, data: bytes, nfds: int
) -> None:
    dev = PlainDevice()
    with eventfds(nfds) as fds:
        einval(checked_set_irqs, dev, index, flags, start, count, data, fds)
    assert not any(irq.active() for irq in dev.irqs.indexes)


def test_unsupported_index_is_einval() -> None:
    dev = PlainDevice(pin=0)
    with eventfds(1) as fds:
        einval(checked_set_irqs, dev, INTX, EVENTFD | TRIGGER, 0, 1, b"", fds)


def test_eventfd_unmask_is_enotty() -> None:
    dev = PlainDevice()
    with eventfds(1) as fds, pytest.raises(OSError) as info:
        dev.set_irqs(INTX, EVENTFD | UNMASK, 0, 1, b"", fds)
    assert info.value.errno == errno.ENOTTY


def test_bad_fd_is_rejected_atomically() -> None:
    dev = PlainDevice()
    with eventfds(1) as fds:
        closed = os.dup(fds[0])
        os.close(closed)
        with pytest.raises(OSError) as info:
            dev.set_irqs(MSI, EVENTFD | TRIGGER, 0, 2, b"", [fds[0], closed])
        assert info.value.errno == errno.EBADF
    assert dev.irqs.indexes[MSI].fds == [None] * 4


def test_one_vector_index_at_a_time() -> None:
    dev = PlainDevice()
    with eventfds(2) as fds:
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", fds[:1])
        einval(dev.set_irqs, MSIX, EVENTFD | TRIGGER, 0, 1, b"", fds[1:])
        dev.set_irqs(INTX, NONE | TRIGGER, 0, 0, b"", [])
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, b"", fds[1:])
        # ERR/REQ are independent of the vector indexes.
        dev.set_irqs(ERR, EVENTFD | TRIGGER, 0, 1, b"", fds[:1])


def test_raise_irq_uses_the_enabled_index() -> None:
    dev = PlainDevice()
    with eventfds(3) as (intx, msi, msix):
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", [intx])
        dev.raise_irq()
        assert drain(intx) == 1
        dev.set_irqs(INTX, NONE | TRIGGER, 0, 0, b"", [])
        dev.set_irqs(MSI, EVENTFD | TRIGGER, 0, 1, b"", [msi])
        dev.raise_irq(0)
        dev.raise_irq(3)  # no eventfd on vector 3: nothing
        assert (drain(intx), drain(msi)) == (0, 1)
        dev.set_irqs(MSI, NONE | TRIGGER, 0, 0, b"", [])
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 2, 1, b"", [msix])
        dev.raise_irq(2)
        assert (drain(msi), drain(msix)) == (0, 1)
        dev.raise_irq(99)  # out of range: ignored
        assert dev.trigger(MSIX, 2) and drain(msix) == 1
        assert not dev.trigger(MSIX, 3)


def test_intx_automask_and_unmask() -> None:
    dev = PlainDevice()
    with eventfds(1) as (fd,):
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", [fd])
        dev.raise_irq()
        dev.raise_irq()  # automasked: latched, not signalled
        assert drain(fd) == 1
        assert cfg_read(dev, cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
        dev.set_irqs(INTX, NONE | UNMASK, 0, 1, b"", [])
        assert drain(fd) == 1  # the latched one fires on unmask
        dev.set_irqs(INTX, NONE | UNMASK, 0, 1, b"", [])
        assert drain(fd) == 0
        assert not cfg_read(dev, cfg.STATUS, 2) & cfg.STATUS_INTERRUPT


def test_intx_mask_bool_and_explicit_mask() -> None:
    dev = PlainDevice()
    with eventfds(1) as (fd,):
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", [fd])
        dev.set_irqs(INTX, BOOL | MASK, 0, 1, b"\x00", [])  # false: no-op
        dev.raise_irq()
        assert drain(fd) == 1
        dev.set_irqs(INTX, NONE | UNMASK, 0, 1, b"", [])
        dev.set_irqs(INTX, BOOL | MASK, 0, 1, b"\x01", [])
        assert not dev.trigger(INTX)
        assert drain(fd) == 0
        dev.set_irqs(INTX, BOOL | UNMASK, 0, 1, b"\x01", [])
        assert drain(fd) == 1


def test_intx_level_resignals_on_unmask() -> None:
    dev = PlainDevice()
    with eventfds(1) as (fd,):
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", [fd])
        dev.set_intx(True)
        assert drain(fd) == 1
        dev.set_irqs(INTX, NONE | UNMASK, 0, 1, b"", [])
        assert drain(fd) == 1  # still asserted: signalled again
        dev.set_intx(False)
        dev.set_irqs(INTX, NONE | UNMASK, 0, 1, b"", [])
        assert drain(fd) == 0


def test_intx_disable_bit_holds_interrupts_back() -> None:
    dev = PlainDevice()
    with eventfds(1) as (fd,):
        dev.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, b"", [fd])
        cfg_write(dev, cfg.COMMAND, cfg.COMMAND_INTX_DISABLE, 2)
        dev.raise_irq()
        assert drain(fd) == 0
        assert cfg_read(dev, cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
        cfg_write(dev, cfg.COMMAND, 0, 2)
        assert drain(fd) == 1


def test_msix_masked_vector_pending_then_delivered() -> None:
    dev = PlainDevice()
    pba = 0x1000
    with eventfds(8) as fds:
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 8, b"", fds)
        dev.set_irqs(MSIX, BOOL | MASK, 0, 8, b"\x00\x00\x00\x01\x00\x01\x00\x00", [])
        dev.raise_irq(3)
        dev.raise_irq(5)
        dev.raise_irq(3)
        dev.raise_irq(1)
        assert [drain(fd) for fd in fds] == [0, 1, 0, 0, 0, 0, 0, 0]
        # The PBA (read through the BAR, as QEMU forwards it) shows 3 and 5.
        assert int.from_bytes(dev.region_read(4, pba, 8), "little") == (1 << 3) | (1 << 5)
        assert dev.region_read(4, pba, 1) == bytes([0x28])
        dev.region_write(4, pba, b"\xff" * 8)  # the PBA is read-only
        assert int.from_bytes(dev.region_read(4, pba, 8), "little") == (1 << 3) | (1 << 5)
        dev.set_irqs(MSIX, NONE | UNMASK, 3, 1, b"", [])
        assert [drain(fd) for fd in fds] == [0, 0, 0, 1, 0, 0, 0, 0]  # once
        assert int.from_bytes(dev.region_read(4, pba, 8), "little") == 1 << 5
        dev.set_irqs(MSIX, NONE | UNMASK, 0, 8, b"", [])
        assert [drain(fd) for fd in fds] == [0, 0, 0, 0, 0, 1, 0, 0]
        assert dev.region_read(4, pba, 8) == bytes(8)


def test_msi_vector_masking() -> None:
    dev = PlainDevice()
    with eventfds(4) as fds:
        dev.set_irqs(MSI, EVENTFD | TRIGGER, 0, 4, b"", fds)
        dev.set_irqs(MSI, NONE | MASK, 2, 1, b"", [])
        assert not dev.trigger(MSI, 2)
        assert dev.trigger(MSI, 1)
        dev.set_irqs(MSI, NONE | UNMASK, 2, 1, b"", [])
        assert [drain(fd) for fd in fds] == [0, 1, 1, 0]


def test_msix_capability_bits_left_to_the_vmm() -> None:
    # QEMU emulates MSI-X enable/mask bits itself; delivery follows SET_IRQS.
    dev = PlainDevice()
    with eventfds(1) as (fd,):
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, b"", [fd])
        cfg_write(dev, dev.msix_off + caps.MSIX_FLAGS, caps.MSIX_FLAGS_ENABLE, 2)
        dev.raise_irq(0)
        assert drain(fd) == 1


def test_disconnect_closes_irq_fds() -> None:
    dev = PlainDevice()
    with eventfds(2) as fds:
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 2, b"", fds)
        kept = dev.irqs.indexes[MSIX].fds[:2]
        dev.disconnected()
        for fd in kept:
            assert fd is not None
            with pytest.raises(OSError):
                os.fstat(fd)
        dev.raise_irq(0)
        assert [drain(fd) for fd in fds] == [0, 0]


def test_msix_table_masks_once_the_client_owns_the_table() -> None:
    dev = PlainDevice()
    ctrl_off = dev.msix_off + caps.MSIX_FLAGS
    with eventfds(2) as fds:
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 2, b"", fds)
        dev.region_write(4, 12, bytes(4))  # unmask entry 0 through the BAR
        dev.raise_irq(0)
        dev.raise_irq(1)  # entry 1 still has its power-on mask bit
        assert [drain(fd) for fd in fds] == [1, 0]
        assert dev.region_read(4, 0x1000, 1) == b"\x02"
        dev.region_write(4, 16 + 12, bytes(4))  # unmasking the entry delivers it
        assert [drain(fd) for fd in fds] == [0, 1]
        cfg_write(dev, ctrl_off, caps.MSIX_FLAGS_ENABLE | caps.MSIX_FLAGS_MASKALL, 2)
        dev.raise_irq(0)
        assert drain(fds[0]) == 0
        cfg_write(dev, ctrl_off, caps.MSIX_FLAGS_ENABLE, 2)  # function mask lifted
        assert drain(fds[0]) == 1
        dev.reset()  # back to VMM-emulated mode: the table no longer masks
        dev.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 2, b"", fds)
        dev.raise_irq(1)
        assert drain(fds[1]) == 1


@pytest.mark.parametrize("index", [INTX, MSI, MSIX, ERR, REQ])
@pytest.mark.parametrize("dtype", [NONE, BOOL, EVENTFD])
@pytest.mark.parametrize("action", [MASK, UNMASK, TRIGGER])
def test_every_flag_combination(index: int, dtype: int, action: int) -> None:
    """Each DATA_* x ACTION_* on vector 0 of each index: outcome and effect."""
    dev = PlainDevice()
    with eventfds(2) as (wired, given):
        dev.set_irqs(index, EVENTFD | TRIGGER, 0, 1, b"", [wired])
        if index < ERR:  # start masked, to see what each request changes
            dev.set_irqs(index, NONE | MASK, 0, 1, b"", [])
        data = b"\x01" if dtype == BOOL else b""
        fds = [given] if dtype == EVENTFD else []
        call = (index, dtype | action, 0, 1, data, fds)
        if index in (ERR, REQ) and action != TRIGGER:
            einval(dev.set_irqs, *call)
            return
        if dtype == EVENTFD and action != TRIGGER:
            with pytest.raises(OSError) as info:
                dev.set_irqs(*call)
            assert info.value.errno == errno.ENOTTY
            return
        dev.set_irqs(*call)
        irq = dev.irqs.indexes[index]
        if action == TRIGGER and dtype == EVENTFD:
            dev.trigger(index, 0)
            if index == INTX:  # a fresh INTx setup starts unmasked
                assert (drain(given), drain(wired)) == (1, 0)
            elif index < ERR:  # the MSI/MSI-X vector mask stays
                assert (drain(given), drain(wired)) == (0, 0) and irq.pending[0]
            else:
                assert (drain(given), drain(wired)) == (1, 0)
        elif action == TRIGGER:  # loopback on a masked vector: pending
            assert drain(wired) == (1 if index >= ERR else 0)
            if index < ERR:
                assert irq.pending[0]
        elif action == MASK:
            assert irq.masked[0] and drain(wired) == 0
        else:  # UNMASK
            assert not irq.masked[0] and drain(wired) == 0

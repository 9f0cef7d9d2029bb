"""The mtty port against what Linux's samples/vfio-mdev/mtty.c computes.

Each test pins one behaviour of mtty.c's handle_bar_read/handle_bar_write
as a guest sees it; the expected values are read off mtty.c, not off the
16550A datasheet where the two differ.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdevcore.samples.mtty import uart as u
from mdevcore.samples.mtty.uart import Uart16550

# What MSR always reads outside AFE-with-a-full-FIFO: DCD DSR CTS + DDSR DCTS.
MSR_USUAL = 0xB3
EMPTY_LSR = u.LSR_THRE | u.LSR_TEMT


class Counter:
    """Counts the interrupts a port raises."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


@pytest.fixture
def irq() -> Counter:
    return Counter()


@pytest.fixture
def port(irq: Counter) -> Uart16550:
    return Uart16550(irq)


def fifo_on(port: Uart16550, trigger_bits: int = 0) -> None:
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_RCVR | u.FCR_CLEAR_XMIT | trigger_bits)


def send(port: Uart16550, data: bytes) -> None:
    for b in data:
        port.write(u.RBR_THR, b)


def receive(port: Uart16550, n: int) -> bytes:
    return bytes(port.read(u.RBR_THR) for _ in range(n))


# --- power-on and plain registers ------------------------------------------


def test_power_on_values(port: Uart16550, irq: Counter) -> None:
    assert port.read(u.IER) == 0
    assert port.read(u.IIR_FCR) == 0xC1  # bits 6-7 set before any FCR write
    assert port.read(u.LCR) == 0
    assert port.read(u.MCR) == 0
    assert port.read(u.LSR) == EMPTY_LSR
    assert port.read(u.MSR) == MSR_USUAL
    assert port.read(u.SCR) == 0
    assert port.fifo_depth == 16
    assert irq.take() == 0


def test_hi_comes_back_whole_without_fcr(port: Uart16550) -> None:
    send(port, b"Hi!")
    assert receive(port, 3) == b"Hi!"
    assert port.read(u.RBR_THR) == 0  # empty: 0
    assert port.read(u.LSR) == EMPTY_LSR


def test_power_on_fifo_holds_sixteen_and_keeps_the_oldest(port: Uart16550) -> None:
    send(port, bytes(range(0x40, 0x51)))  # 17 bytes, no FCR written
    assert port.read(u.LSR) == u.LSR_DR | u.LSR_OE
    assert receive(port, 16) == bytes(range(0x40, 0x50))
    assert port.read(u.LSR) == EMPTY_LSR | u.LSR_OE  # 0x50 was dropped


def test_overflow_drops_new_bytes_and_only_a_stored_byte_clears_overrun(port: Uart16550) -> None:
    fifo_on(port)
    send(port, bytes(range(20)))
    assert port.read(u.LSR) & u.LSR_OE
    assert port.read(u.LSR) & u.LSR_OE  # reading LSR does not clear it
    assert receive(port, 1) == b"\x00"
    assert port.read(u.LSR) & u.LSR_OE  # nor does making room
    send(port, b"\xaa")  # a byte that fits does
    assert port.read(u.LSR) == u.LSR_DR
    assert receive(port, 16) == bytes(range(1, 16)) + b"\xaa"


def test_without_fifo_one_byte_is_held_and_the_next_dropped(port: Uart16550) -> None:
    port.write(u.IIR_FCR, 0)
    assert port.fifo_depth == 1
    send(port, b"ab")
    assert port.read(u.LSR) == u.LSR_DR | u.LSR_OE
    assert receive(port, 2) == b"a\x00"


def test_fcr_depth_change_keeps_queued_bytes(port: Uart16550) -> None:
    fifo_on(port)
    send(port, b"xyz")
    port.write(u.IIR_FCR, 0)  # FIFO off, no clear bit: nothing emptied
    send(port, b"w")  # depth 1 and 3 queued: overrun
    assert port.read(u.LSR) == u.LSR_DR | u.LSR_OE
    assert receive(port, 3) == b"xyz"


@pytest.mark.parametrize("clear", [u.FCR_CLEAR_RCVR, u.FCR_CLEAR_XMIT])
def test_either_fcr_clear_bit_empties_the_loopback_fifo(port: Uart16550, clear: int) -> None:
    fifo_on(port)
    send(port, b"abc")
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO | clear)
    assert port.read(u.LSR) == EMPTY_LSR
    send(port, b"z")
    assert receive(port, 2) == b"z\x00"


def test_scratch_lcr_and_mcr_hold_any_byte(port: Uart16550) -> None:
    for value in (0x00, 0x5A, 0xA5, 0x7F):
        port.write(u.SCR, value)
        port.write(u.LCR, value)
        port.write(u.MCR, value)
        assert (port.read(u.SCR), port.read(u.LCR), port.read(u.MCR)) == (value,) * 3
    port.write(u.MCR, 0xFF)
    assert port.read(u.MCR) == 0xFF


def test_ier_reads_back_low_nibble_only(port: Uart16550) -> None:
    port.write(u.IER, 0xF0)
    assert port.read(u.IER) == 0
    port.write(u.IER, 0x05)
    assert port.read(u.IER) == 0x05


def test_writes_to_status_registers_are_ignored(port: Uart16550) -> None:
    port.write(u.LSR, 0xFF)
    port.write(u.MSR, 0x00)
    assert port.read(u.LSR) == EMPTY_LSR
    assert port.read(u.MSR) == MSR_USUAL


def test_bad_offset_and_value(port: Uart16550) -> None:
    with pytest.raises(OSError) as e:
        port.read(8)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        port.write(-1, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        port.write(u.SCR, 0x100)
    assert e.value.errno == errno.EINVAL


# --- divisor latch -----------------------------------------------------------


def test_divisor_latch_is_ored_and_zeroed_by_each_dlab_write(port: Uart16550) -> None:
    port.write(u.IER, 0x03)
    port.write(u.LCR, u.LCR_DLAB | 0x03)
    port.write(u.RBR_THR, 0x0C)
    port.write(u.RBR_THR, 0x30)  # ORed in: 0x3C, not replaced
    port.write(u.IER, 0x01)
    assert (port.read(u.RBR_THR), port.read(u.IER)) == (0x3C, 0x01)
    assert port.divisor == 0x013C
    port.write(u.LCR, 0x03)
    assert port.read(u.LSR) == EMPTY_LSR  # no byte went to the FIFO
    assert port.read(u.IER) == 0x03
    assert port.divisor == 0x013C  # clearing DLAB keeps it...
    port.write(u.LCR, u.LCR_DLAB)  # ...setting it again zeroes it
    assert (port.read(u.RBR_THR), port.read(u.IER)) == (0, 0)


# --- IIR -------------------------------------------------------------------------


def test_iir_bits_6_7_are_set_whatever_fcr_says(port: Uart16550) -> None:
    port.write(u.IIR_FCR, 0)
    assert port.read(u.IIR_FCR) == 0xC1
    fifo_on(port)
    assert port.read(u.IIR_FCR) == 0xC1


def test_iir_codes_one_source_each(port: Uart16550) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_THRI)
    assert port.read(u.IIR_FCR) == 0xC2  # THR empty
    port.write(u.IER, u.IER_RDI | u.IER_THRI)
    send(port, b"d")
    assert port.read(u.IIR_FCR) == 0xC4  # data at trigger level, THR not empty
    port.write(u.IER, u.IER_RLSI)
    send(port, bytes(16))
    assert port.read(u.IIR_FCR) == 0xC6  # overrun
    port.write(u.IER, u.IER_MSI)
    port.write(u.MCR, u.MCR_DTR | u.MCR_RTS)
    assert port.read(u.IIR_FCR) == 0xC1  # modem status: code 0, so "none"


def test_iir_ors_the_codes_of_all_sources(port: Uart16550) -> None:
    # Power-on trigger level 0: "data available" even when empty, and THRE.
    port.write(u.IER, u.IER_RDI | u.IER_THRI)
    assert port.read(u.IIR_FCR) == 0xC6  # 0x04 | 0x02
    fifo_on(port)
    assert port.read(u.IIR_FCR) == 0xC2
    port.write(u.IER, u.IER_RLSI | u.IER_RDI | u.IER_THRI | u.IER_MSI)
    port.write(u.MCR, u.MCR_DTR)
    send(port, bytes(17))  # overrun + data
    assert port.read(u.IIR_FCR) == 0xC6
    receive(port, 16)  # overrun + THR empty
    assert port.read(u.IIR_FCR) == 0xC6
    send(port, b"x")  # stored: overrun cleared, data again
    assert port.read(u.IIR_FCR) == 0xC4


def test_iir_read_has_no_side_effect(port: Uart16550, irq: Counter) -> None:
    port.write(u.IER, u.IER_THRI)
    irq.take()
    assert [port.read(u.IIR_FCR) for _ in range(3)] == [0xC2] * 3
    assert irq.take() == 0


@pytest.mark.parametrize("bits", [0x00, 0x40, 0x80, 0xC0])
def test_fcr_trigger_bits_are_ignored_level_is_one(
    port: Uart16550, irq: Counter, bits: int
) -> None:
    fifo_on(port, bits)
    port.write(u.IER, u.IER_RDI)
    send(port, b"a")
    assert irq.take() == 1
    assert port.read(u.IIR_FCR) == 0xC4
    send(port, b"bcd")  # interrupt only on reaching the level, not above it
    assert irq.take() == 0
    receive(port, 4)
    assert port.read(u.IIR_FCR) == 0xC1


def test_no_rx_interrupt_before_the_first_fcr_write(port: Uart16550, irq: Counter) -> None:
    port.write(u.IER, u.IER_RDI)  # power-on trigger level is 0
    assert port.read(u.IIR_FCR) == 0xC4  # count 0 >= 0
    send(port, b"abc")
    assert irq.take() == 0
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO)  # level 1 now; bytes kept
    receive(port, 3)
    send(port, b"d")
    assert irq.take() == 1


# --- interrupt triggers --------------------------------------------------------------


def test_every_ier_write_with_thri_on_an_empty_fifo_interrupts(
    port: Uart16550, irq: Counter
) -> None:
    port.write(u.IER, u.IER_THRI)
    port.write(u.IER, u.IER_THRI)  # same value again: again
    assert irq.take() == 2
    port.write(u.IER, u.IER_RDI)
    assert irq.take() == 0
    send(port, b"q")
    port.write(u.IER, u.IER_THRI)  # FIFO not empty: nothing
    assert irq.take() == 0


def test_thr_write_raises_no_thre_interrupt(port: Uart16550, irq: Counter) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_THRI)
    irq.take()
    send(port, b"abc")
    assert irq.take() == 0
    assert port.read(u.IIR_FCR) == 0xC1  # THR "not empty" while data waits


def test_rbr_read_that_leaves_fifo_empty_interrupts(port: Uart16550, irq: Counter) -> None:
    fifo_on(port)
    send(port, b"ab")
    port.write(u.IER, u.IER_THRI)
    assert irq.take() == 0
    receive(port, 1)
    assert irq.take() == 0
    receive(port, 1)  # now empty
    assert irq.take() == 1
    receive(port, 1)  # reading an empty FIFO does it again
    assert irq.take() == 1


def test_each_overrun_interrupts_with_rlsi(port: Uart16550, irq: Counter) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_RLSI)
    send(port, bytes(16))
    assert irq.take() == 0
    send(port, bytes(3))
    assert irq.take() == 3


@pytest.mark.parametrize(
    ("mcr", "count"),
    [
        (u.MCR_OUT2, 1),
        (u.MCR_DTR, 1),
        (u.MCR_RTS, 1),
        (u.MCR_OUT2 | u.MCR_DTR | u.MCR_RTS, 2),
        (u.MCR_LOOP | u.MCR_OUT1 | u.MCR_AFE, 0),
    ],
)
def test_mcr_write_interrupts_with_msi(port: Uart16550, irq: Counter, mcr: int, count: int) -> None:
    port.write(u.MCR, mcr)
    assert irq.take() == 0  # IER.MSI off
    port.write(u.IER, u.IER_MSI)
    port.write(u.MCR, mcr)
    port.write(u.MCR, mcr)  # every write, not a change
    assert irq.take() == 2 * count


# --- LSR and MSR ----------------------------------------------------------------


def test_lsr_full_fifo_still_reads_as_data(port: Uart16550) -> None:
    # The one place this model departs from mtty.c (see uart.py).
    fifo_on(port)
    send(port, bytes(range(16)))
    assert port.read(u.LSR) == u.LSR_DR
    assert receive(port, 16) == bytes(range(16))


def test_msr_is_constant_and_ignores_loop_mode(port: Uart16550) -> None:
    assert [port.read(u.MSR) for _ in range(2)] == [MSR_USUAL] * 2
    port.write(u.MCR, u.MCR_LOOP)
    assert port.read(u.MSR) == MSR_USUAL
    port.write(u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_RTS | u.MCR_OUT1 | u.MCR_OUT2)
    assert port.read(u.MSR) == MSR_USUAL
    send(port, b"\x99")  # loopback works in every mode
    assert receive(port, 1) == b"\x99"


def test_msr_cts_drops_with_afe_when_the_fifo_is_full(port: Uart16550) -> None:
    fifo_on(port)
    port.write(u.MCR, u.MCR_AFE | u.MCR_RTS)
    send(port, bytes(15))
    assert port.read(u.MSR) == MSR_USUAL
    send(port, bytes(1))
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_DDSR
    receive(port, 1)
    assert port.read(u.MSR) == MSR_USUAL
    port.write(u.IIR_FCR, 0)  # depth 1 with 15 queued: full again
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_DDSR


# --- saved state ---------------------------------------------------------------


def test_saved_state_is_struct_serial_port(port: Uart16550) -> None:
    assert u.STATE_SIZE == 36
    assert port.save() == bytes(33) + b"\x10" + bytes(2)  # power-on: depth 16 only
    port.write(u.LCR, u.LCR_DLAB | 0x03)
    port.write(u.RBR_THR, 0x01)
    port.write(u.IER, 0xC2)
    port.write(u.LCR, 0x03)
    port.write(u.IIR_FCR, 0xC7)
    port.write(u.IER, 0x1D)
    port.write(u.MCR, 0x0B)
    port.write(u.SCR, 0x5A)
    send(port, bytes(range(0x60, 0x74)))  # 20: wraps, overruns
    receive(port, 3)
    blob = port.save()
    regs = bytes([0, 0x1D, 0, 0x03, 0x0B, 0, 0, 0x5A])
    assert blob[0:8] == regs
    assert blob[8:24] == bytes(range(0x60, 0x70))
    assert (blob[24], blob[25], blob[26]) == (0, 3, 13)  # head, tail, count
    assert (blob[27], blob[28], blob[29]) == (0, 1, 0)  # dlab, overrun, pad
    assert blob[30:32] == (0xC201).to_bytes(2, "little")
    assert (blob[32], blob[33], blob[34], blob[35]) == (0xC7, 16, 1, 0)


def test_save_load_roundtrip_with_a_wrapped_ring(port: Uart16550) -> None:
    fifo_on(port)
    send(port, bytes(range(12)))
    receive(port, 10)
    send(port, b"wrapped!")  # tail 10, head 4
    port.write(u.LCR, u.LCR_DLAB)
    port.write(u.IER, 0x02)
    blob = port.save()
    irq = Counter()
    other = Uart16550(irq)
    other.load(blob)
    assert irq.take() == 0  # loading raises nothing
    assert other.save() == blob
    assert other.divisor == 0x0200
    other.write(u.LCR, 0x03)
    assert receive(other, 10) == b"\x0a\x0bwrapped!"


@pytest.mark.parametrize(
    "patch",
    [
        {24: 16},  # head beyond the ring
        {25: 16},  # tail beyond the ring
        {26: 17},  # count beyond the ring
        {26: 1},  # count not head - tail
        {27: 2},  # dlab not a bool
        {28: 2},  # overrun not a bool
        {27: 1},  # dlab without LCR.DLAB
        {34: 4},  # a trigger level mtty.c never sets
        {33: 1},  # power-on (trigger 0) with depth 1
        {32: 0x01},  # power-on (trigger 0) with FCR written
        {32: 0x01, 34: 1, 33: 1},  # FIFO enabled, depth 1
        {34: 1, 33: 16},  # FIFO disabled (FCR 0), depth 16
    ],
)
def test_load_rejects_bad_state(patch: dict[int, int]) -> None:
    blob = bytearray(Uart16550().save())
    for off, value in patch.items():
        blob[off] = value
    port = Uart16550()
    port.write(u.SCR, 0x42)
    for bad in (bytes(blob), bytes(Uart16550().save()[:-1])):
        with pytest.raises(OSError) as e:
            port.load(bad)
        assert e.value.errno == errno.EINVAL
    assert port.read(u.SCR) == 0x42


# --- any access sequence: the FIFO is mtty.c's, the state reloads ----------------

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 255)), max_size=200)


@given(ops)
@settings(max_examples=200, deadline=None)
def test_any_sequence_matches_a_plain_fifo(sequence: list[tuple[bool, int, int]]) -> None:
    port = Uart16550()
    fifo: list[int] = []  # the reference: a list with mtty.c's depth
    depth, dlab, overrun = 16, False, False
    for is_write, offset, value in sequence:
        if is_write:
            port.write(offset, value)
            if offset == u.LCR:
                dlab = bool(value & u.LCR_DLAB)
            elif offset == u.IIR_FCR:
                depth = 16 if value & u.FCR_ENABLE_FIFO else 1
                if value & (u.FCR_CLEAR_RCVR | u.FCR_CLEAR_XMIT):
                    fifo.clear()
            elif offset == u.RBR_THR and not dlab:
                overrun = len(fifo) >= depth
                if not overrun:
                    fifo.append(value)
        else:
            got = port.read(offset)
            if offset == u.RBR_THR and not dlab:
                assert got == (fifo.pop(0) if fifo else 0)
        assert port.rx_bytes == bytes(fifo)
        assert bool(port.lsr & u.LSR_OE) == overrun
        assert port.lsr & (u.LSR_DR | u.LSR_THRE) == (u.LSR_DR if fifo else u.LSR_THRE)
    blob = port.save()
    clone = Uart16550()
    clone.load(blob)
    assert clone.save() == blob

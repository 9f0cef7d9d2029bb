"""The 16550A model against the register semantics the 8250 driver uses."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samples.mtty import uart as u
from samples.mtty.uart import Uart16550


class Recorder:
    """Collects the interrupt line transitions a UART reports."""

    def __init__(self) -> None:
        self.events: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.events.append(level)

    def take(self) -> list[bool]:
        events, self.events = self.events, []
        return events


@pytest.fixture
def irq() -> Recorder:
    return Recorder()


@pytest.fixture
def port(irq: Recorder) -> Uart16550:
    return Uart16550(irq)


def fifo_on(port: Uart16550, trigger_bits: int = 0) -> None:
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_RCVR | u.FCR_CLEAR_XMIT | trigger_bits)


# --- power-on and plain registers ------------------------------------------


def test_power_on_values(port: Uart16550, irq: Recorder) -> None:
    assert port.read(u.IER) == 0
    assert port.read(u.IIR_FCR) == u.IIR_NO_INT  # FIFOs off: bits 6-7 clear
    assert port.read(u.LCR) == 0
    assert port.read(u.MCR) == 0
    assert port.read(u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert port.read(u.SCR) == 0
    assert irq.take() == []


def test_scratch_and_lcr_hold_any_byte(port: Uart16550) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        port.write(u.SCR, value)
        assert port.read(u.SCR) == value
    port.write(u.LCR, 0x1B)  # 8 bits, 2 stop, even parity
    assert port.read(u.LCR) == 0x1B


def test_ier_reads_back_low_nibble_only(port: Uart16550) -> None:
    port.write(u.IER, 0xFF)
    assert port.read(u.IER) == 0x0F
    port.write(u.IER, 0x05)
    assert port.read(u.IER) == 0x05


def test_mcr_keeps_modem_loop_and_afe_bits(port: Uart16550) -> None:
    port.write(u.MCR, 0xFF)
    assert port.read(u.MCR) == 0x3F


def test_writes_to_status_registers_are_ignored(port: Uart16550) -> None:
    port.read(u.MSR)
    port.write(u.LSR, 0xFF)
    port.write(u.MSR, 0x0F)
    assert port.read(u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS


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


def test_dlab_maps_offsets_0_and_1_to_the_divisor(port: Uart16550) -> None:
    port.write(u.SCR, 0x11)
    port.write(u.IER, 0x03)
    port.write(u.LCR, u.LCR_DLAB | 0x03)
    port.write(u.RBR_THR, 0x0C)  # 9600 baud from 1.8432 MHz
    port.write(u.IER, 0x01)
    assert port.read(u.RBR_THR) == 0x0C
    assert port.read(u.IER) == 0x01
    assert port.divisor == 0x010C
    port.write(u.LCR, 0x03)
    # The divisor write went nowhere near the FIFO or IER.
    assert port.read(u.LSR) & u.LSR_DR == 0
    assert port.read(u.IER) == 0x03
    # The latch survives DLAB being cleared and set again.
    port.write(u.LCR, u.LCR_DLAB)
    assert port.read(u.RBR_THR) == 0x0C
    assert port.read(u.IER) == 0x01


# --- loopback FIFO -------------------------------------------------------------


def test_sixteen_bytes_loop_back_in_order(port: Uart16550) -> None:
    fifo_on(port)
    data = bytes(range(0x40, 0x50))
    for b in data:
        port.write(u.RBR_THR, b)
    assert port.read(u.LSR) == u.LSR_DR | u.LSR_THRE | u.LSR_TEMT
    got = bytes(port.read(u.RBR_THR) for _ in range(16))
    assert got == data
    assert port.read(u.LSR) & u.LSR_DR == 0
    assert port.read(u.RBR_THR) == 0  # empty FIFO reads 0


def test_seventeenth_byte_overruns_and_is_lost(port: Uart16550) -> None:
    fifo_on(port)
    for b in range(17):
        port.write(u.RBR_THR, b)
    lsr = port.read(u.LSR)
    assert lsr & u.LSR_OE
    assert lsr & u.LSR_DR
    assert port.read(u.LSR) & u.LSR_OE == 0  # OE cleared by the read
    assert bytes(port.read(u.RBR_THR) for _ in range(16)) == bytes(range(16))
    assert port.read(u.LSR) & u.LSR_DR == 0


def test_without_fifo_the_holding_register_is_overwritten(port: Uart16550) -> None:
    port.write(u.RBR_THR, 0x41)
    assert port.read(u.LSR) & (u.LSR_DR | u.LSR_OE) == u.LSR_DR
    port.write(u.RBR_THR, 0x42)
    assert port.read(u.LSR) & u.LSR_OE
    assert port.read(u.RBR_THR) == 0x42
    assert port.read(u.LSR) & u.LSR_DR == 0


def test_fcr_rx_reset_empties_fifo(port: Uart16550) -> None:
    fifo_on(port)
    for b in b"abc":
        port.write(u.RBR_THR, b)
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_RCVR)
    assert port.read(u.LSR) & u.LSR_DR == 0
    port.write(u.RBR_THR, ord("z"))
    assert port.read(u.RBR_THR) == ord("z")


def test_fcr_tx_reset_alone_keeps_received_bytes(port: Uart16550) -> None:
    fifo_on(port)
    port.write(u.RBR_THR, 0x33)
    port.write(u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_CLEAR_XMIT)
    assert port.read(u.RBR_THR) == 0x33


def test_turning_fifos_off_empties_them(port: Uart16550) -> None:
    fifo_on(port)
    for b in b"xyz":
        port.write(u.RBR_THR, b)
    port.write(u.IIR_FCR, 0)
    assert port.read(u.LSR) & u.LSR_DR == 0
    assert port.read(u.IIR_FCR) & u.IIR_FIFOS_ENABLED == 0


def test_iir_shows_fifos_enabled(port: Uart16550) -> None:
    fifo_on(port)
    assert port.read(u.IIR_FCR) == u.IIR_FIFOS_ENABLED | u.IIR_NO_INT


# --- interrupts --------------------------------------------------------------


@pytest.mark.parametrize(("bits", "level"), [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_trigger_levels(port: Uart16550, irq: Recorder, bits: int, level: int) -> None:
    fifo_on(port, bits)
    port.write(u.IER, u.IER_RDI)
    for n in range(1, level):
        port.write(u.RBR_THR, n)
        # Below the trigger: character timeout (expired at once, see uart.py).
        assert port.iir == u.IIR_FIFOS_ENABLED | u.IIR_RX_TIMEOUT
    port.write(u.RBR_THR, 0xEE)
    assert port.iir == u.IIR_FIFOS_ENABLED | u.IIR_RDI
    assert irq.take() == [True]  # one rising edge at the first byte
    for _ in range(level):
        port.read(u.RBR_THR)
    assert port.iir == u.IIR_FIFOS_ENABLED | u.IIR_NO_INT
    assert irq.take() == [False]


def test_rx_interrupt_drops_as_the_fifo_drains_below_trigger(port: Uart16550) -> None:
    fifo_on(port, 0x40)  # trigger 4
    port.write(u.IER, u.IER_RDI)
    for b in range(5):
        port.write(u.RBR_THR, b)
    assert port.iir & 0x0F == u.IIR_RDI
    port.read(u.RBR_THR)
    assert port.iir & 0x0F == u.IIR_RDI  # 4 left: still at trigger
    port.read(u.RBR_THR)
    assert port.iir & 0x0F == u.IIR_RX_TIMEOUT  # 3 left


def test_rx_interrupt_needs_ier(port: Uart16550, irq: Recorder) -> None:
    fifo_on(port)
    port.write(u.RBR_THR, 1)
    assert port.iir & 0x0F == u.IIR_NO_INT
    assert irq.take() == []
    port.write(u.IER, u.IER_RDI)  # enabling with data waiting interrupts
    assert irq.take() == [True]
    port.write(u.IER, 0)
    assert irq.take() == [False]


def test_thre_interrupt_on_enable_cleared_by_iir_read(port: Uart16550, irq: Recorder) -> None:
    port.write(u.IER, u.IER_THRI)
    assert irq.take() == [True]
    assert port.read(u.IIR_FCR) == u.IIR_THRI
    assert irq.take() == [False]
    assert port.read(u.IIR_FCR) == u.IIR_NO_INT
    # Rewriting the same IER value does not re-arm it...
    port.write(u.IER, u.IER_THRI)
    assert irq.take() == []
    # ...disabling and enabling again does (the 8250 driver's TXEN probe).
    port.write(u.IER, 0)
    port.write(u.IER, u.IER_THRI)
    assert irq.take() == [True]
    assert port.read(u.IIR_FCR) == u.IIR_THRI


def test_thre_interrupt_after_each_transmitted_byte(port: Uart16550, irq: Recorder) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_THRI)
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_THRI
    assert irq.take() == [True, False]
    port.write(u.RBR_THR, 0x55)  # TX drains at once: THRE again
    assert irq.take() == [True]
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_THRI
    assert irq.take() == [False]


def test_overrun_raises_line_status_interrupt_until_lsr_read(
    port: Uart16550, irq: Recorder
) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_RLSI)
    for b in range(16):
        port.write(u.RBR_THR, b)
    assert irq.take() == []
    port.write(u.RBR_THR, 16)
    assert irq.take() == [True]
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_RLSI
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_RLSI  # IIR read does not clear it
    port.read(u.LSR)
    assert irq.take() == [False]
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_NO_INT


def test_iir_priority_order(port: Uart16550) -> None:
    fifo_on(port)
    port.read(u.MSR)
    # Set up all four sources: overrun, RX data, THRE, modem status.
    for b in range(17):
        port.write(u.RBR_THR, b)
    port.write(u.MCR, u.MCR_LOOP | u.MCR_RTS)  # CTS drops/rises: deltas
    port.write(u.IER, u.IER_RLSI | u.IER_RDI | u.IER_THRI | u.IER_MSI)
    seen = [port.iir & 0x0F]
    port.read(u.LSR)  # clears line status
    seen.append(port.iir & 0x0F)
    for _ in range(16):
        port.read(u.RBR_THR)  # drains RX
    seen.append(port.read(u.IIR_FCR) & 0x0F)  # reports and acknowledges THRE
    seen.append(port.iir & 0x0F)
    port.read(u.MSR)
    seen.append(port.iir & 0x0F)
    assert seen == [u.IIR_RLSI, u.IIR_RDI, u.IIR_THRI, u.IIR_MSI, u.IIR_NO_INT]


def test_iir_read_does_not_ack_thre_when_rx_is_reported(port: Uart16550) -> None:
    fifo_on(port)
    port.write(u.IER, u.IER_RDI | u.IER_THRI)
    port.write(u.RBR_THR, 7)
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_RDI
    port.read(u.RBR_THR)
    assert port.read(u.IIR_FCR) & 0x0F == u.IIR_THRI


# --- modem status --------------------------------------------------------------


def test_msr_reports_dcd_dsr_cts_with_deltas_cleared_on_read(port: Uart16550) -> None:
    first = port.read(u.MSR)
    assert first == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS | u.MSR_DDCD | u.MSR_DDSR | u.MSR_DCTS
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS


def test_msr_cts_follows_fifo_room_with_afe(port: Uart16550) -> None:
    fifo_on(port)
    port.write(u.MCR, u.MCR_AFE | u.MCR_RTS)
    port.read(u.MSR)
    for b in range(16):
        port.write(u.RBR_THR, b)
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_DCTS
    port.read(u.RBR_THR)
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS | u.MSR_DCTS


def test_loop_mode_feeds_mcr_outputs_to_msr(port: Uart16550) -> None:
    port.read(u.MSR)
    port.write(u.MCR, u.MCR_LOOP)
    # All four inputs dropped: deltas for CTS, DSR, DCD (RI was already low).
    assert port.read(u.MSR) == u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    port.write(u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_RTS | u.MCR_OUT1 | u.MCR_OUT2)
    assert port.read(u.MSR) == (
        u.MSR_CTS | u.MSR_DSR | u.MSR_RI | u.MSR_DCD | u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    )
    port.write(u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2)
    assert port.read(u.MSR) == u.MSR_CTS | u.MSR_DSR | u.MSR_DCD | u.MSR_TERI
    # Bytes still loop back in loop mode.
    port.write(u.RBR_THR, 0x99)
    assert port.read(u.RBR_THR) == 0x99


def test_modem_status_interrupt(port: Uart16550, irq: Recorder) -> None:
    port.write(u.IER, u.IER_MSI)  # power-on deltas are still latched
    assert irq.take() == [True]
    assert port.read(u.IIR_FCR) == u.IIR_MSI
    port.read(u.MSR)
    assert irq.take() == [False]
    port.write(u.MCR, u.MCR_OUT2)  # no loop: outputs do not reach inputs
    assert irq.take() == []
    port.write(u.MCR, u.MCR_LOOP | u.MCR_OUT2)  # CTS/DSR drop, DCD stays
    assert irq.take() == [True]
    assert port.read(u.MSR) == u.MSR_DCD | u.MSR_DCTS | u.MSR_DDSR
    assert irq.take() == [False]


# --- reset and state -----------------------------------------------------------


def test_reset_returns_to_power_on(port: Uart16550, irq: Recorder) -> None:
    fifo_on(port, 0xC0)
    port.write(u.LCR, u.LCR_DLAB)
    port.write(u.RBR_THR, 1)
    port.write(u.LCR, 0x03)
    port.write(u.MCR, 0x0B)
    port.write(u.SCR, 0x77)
    port.write(u.IER, 0x0F)
    port.write(u.RBR_THR, 0x10)
    assert irq.take()[-1] is True
    port.reset()
    assert irq.take() == [False]
    fresh = Uart16550()
    for off in (u.IER, u.IIR_FCR, u.LCR, u.MCR, u.LSR, u.MSR, u.SCR, u.RBR_THR):
        assert port.read(off) == fresh.read(off)
    assert port.divisor == 0


def test_save_load_roundtrip(port: Uart16550) -> None:
    fifo_on(port, 0x80)
    port.write(u.LCR, u.LCR_DLAB)
    port.write(u.RBR_THR, 0x30)
    port.write(u.LCR, 0x03)
    port.write(u.IER, u.IER_RDI | u.IER_THRI)
    for b in b"hello":
        port.write(u.RBR_THR, b)
    blob = port.save()
    assert len(blob) == u.STATE_SIZE
    levels: list[bool] = []
    other = Uart16550(levels.append)
    other.load(blob)
    assert levels == [True]
    assert other.save() == blob
    assert other.divisor == 0x30
    assert bytes(other.read(u.RBR_THR) for _ in range(5)) == b"hello"


@pytest.mark.parametrize(
    "patch",
    [
        {16: 17},  # count above the FIFO size
        {17: 0x10},  # IER bit that does not exist
        {23: 2},  # fifo_enabled not a bool
        {24: 3},  # trigger level not one of 1/4/8/14
        {27: 0x10},  # delta bits outside 0-3
    ],
)
def test_load_rejects_bad_state(patch: dict[int, int]) -> None:
    blob = bytearray(Uart16550().save())
    for off, value in patch.items():
        blob[off] = value
    with pytest.raises(OSError) as e:
        Uart16550().load(bytes(blob))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        Uart16550().load(bytes(blob[:-1]))


# --- any access sequence keeps the model consistent ---------------------------

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 255)), max_size=200)


@given(ops)
@settings(max_examples=300, deadline=None)
def test_any_sequence_keeps_invariants(sequence: list[tuple[bool, int, int]]) -> None:
    levels: list[bool] = []
    port = Uart16550(levels.append)
    for is_write, offset, value in sequence:
        if is_write:
            port.write(offset, value)
        else:
            port.read(offset)
        assert len(port.s.rx) <= port.fifo_depth
        # The callback saw exactly the transitions of the output line...
        assert levels == [bool(i % 2 == 0) for i in range(len(levels))]
        assert port.irq_level == (bool(levels) and levels[-1])
        # ...and the line is high exactly when IIR reports a source.
        assert port.irq_level == (port.iir & u.IIR_NO_INT == 0)
        assert port.lsr & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
        assert bool(port.lsr & u.LSR_DR) == bool(port.s.rx)
    blob = port.save()
    clone = Uart16550()
    clone.load(blob)
    assert clone.save() == blob

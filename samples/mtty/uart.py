"""One serial port of the mtty card, register for register as Linux's mtty.c.

Pure state machine: the guest's port reads and writes come in through
:meth:`Uart16550.read` / :meth:`Uart16550.write` (offset 0-7, one byte each)
and interrupts come out through a callback.  No I/O, no time.

The kernel sample (samples/vfio-mdev/mtty.c) is not a full 16550A: it is a
loopback buffer behind the 16550 register file, and a guest sees exactly
what it computes.  This model reproduces that:

* State is mtty.c's ``struct serial_port``: the register bytes (IER, LCR,
  MCR, SCR), a 16-byte ring (head, tail, count), the DLAB flag, the overrun
  flag, the divisor, FCR, the FIFO depth and the RX trigger level.  At
  power-on everything is 0 except the depth, which is 16: the FIFO holds 16
  bytes before the guest ever writes FCR, and the trigger level is 0.
* THR: a byte written is appended to the ring (transmit is receive).  If the
  ring already holds ``depth`` bytes the new byte is dropped, the oldest
  kept, and the overrun flag set; a byte that fits clears it.  Nothing else
  clears overrun (not an LSR read).
* RBR: takes the oldest byte; an empty ring reads 0 (mtty.c leaves the byte
  unwritten, i.e. whatever was on its stack).
* FCR: either clear bit empties the ring; bit 0 sets the depth to 16, else 1
  (a smaller depth keeps bytes already queued).  The trigger bits are parsed
  and then ignored: every FCR write sets the trigger level to 1.
* LCR: any write with DLAB (bit 7) set zeroes the divisor; while DLAB is
  set, writes to offsets 0 and 1 OR the byte into its low / high half and
  reads return the halves.  IER reads back its low nibble, MCR and LCR and
  SCR the whole byte.
* LSR: DR while the ring holds a byte, OE while the overrun flag is set,
  THRE and TEMT while the ring is empty (the transmitter *is* the ring).
* MSR: always DCD, DSR and DDSR, plus CTS and DCTS, except with MCR.AFE set
  and the ring full.  No loop mode, no deltas cleared by reading.
* IIR: computed on every read, no side effect.  mtty.c ORs the codes of all
  pending sources: overrun with IER.RLSI (0x06), ring count >= trigger level
  with IER.RDI (0x04), empty ring with IER.THRI (0x02), MCR.RTS|DTR with
  IER.MSI (0x00, so it never shows); 0x01 if that OR is 0; bits 6-7 always
  set.  With one source that reads as the 16550's priority order; RX data
  and THRE together (trigger level 0, before any FCR write) read as 0x06.
* Interrupts are events, not a level, raised at the moments mtty.c raises
  them: a THR write that brings the count to the trigger level (IER.RDI), a
  THR write that overruns (IER.RLSI), every IER write with THRI set while
  the ring is empty, every RBR read that leaves the ring empty (IER.THRI),
  and an MCR write with IER.MSI: once if OUT2 is set, once more if RTS or
  DTR is.  Note the trigger level 0 of power-on: no RX interrupt until the
  guest writes FCR.

One deliberate difference: mtty.c tells "has data" by head != tail, so its
ring with 16 bytes in it (head == tail again) reads as empty - LSR shows no
data, RBR returns nothing, and the bytes stay stuck until FCR clears them.
The guest's 8250 driver sends 16 bytes per THRE interrupt, so that would
lose its data; this model uses the count (a full ring has data, THRE clear).
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from collections.abc import Callable

# Register offsets (reading / writing side where they differ).
RBR_THR = 0  # divisor low byte when LCR.DLAB
IER = 1  # divisor high byte when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
NR_REGS = 8

FIFO_SIZE = 16

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_READ_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_BITS = 0xC0  # mtty.c sets them whatever FCR says

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10  # stored, has no effect (mtty.c has no loop mode)
MCR_AFE = 0x20  # auto flow control: CTS follows ring room

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_DCD = 0x80

# The trigger level after any FCR write, and at power-on (never written).
TRIGGER_LEVEL = 1
POWER_ON_TRIGGER_LEVEL = 0

InterruptCallback = Callable[[], None]


@dataclasses.dataclass(slots=True)
class UartState:
    """mtty.c's ``struct serial_port``, field for field; defaults are power-on."""

    uart_reg: bytearray = dataclasses.field(default_factory=lambda: bytearray(NR_REGS))
    fifo: bytearray = dataclasses.field(default_factory=lambda: bytearray(FIFO_SIZE))
    head: int = 0  # next slot a THR write fills
    tail: int = 0  # next slot an RBR read takes
    count: int = 0
    dlab: bool = False
    overrun: bool = False
    divisor: int = 0
    fcr: int = 0
    max_fifo_size: int = FIFO_SIZE
    trigger_level: int = POWER_ON_TRIGGER_LEVEL


# Saved form: struct serial_port as the kernel lays it out on x86-64 and
# arm64 (one pad byte before the u16 divisor, one at the end): 36 bytes.
_STATE = struct.Struct("<8s16sBBB??xHBBBx")
STATE_SIZE = _STATE.size


class Uart16550:
    """One mtty serial port; see the module doc for the behaviour."""

    def __init__(self, on_interrupt: InterruptCallback | None = None) -> None:
        self._on_interrupt = on_interrupt
        self.s = UartState()

    # --- the guest's view -------------------------------------------------

    def read(self, offset: int) -> int:
        """Read register ``offset`` (0-7); only RBR has a side effect."""
        s = self.s
        if offset == RBR_THR:
            return s.divisor & 0xFF if s.dlab else self._read_rbr()
        if offset == IER:
            return s.divisor >> 8 if s.dlab else self.ier
        if offset == IIR_FCR:
            return self.iir
        if offset in (LCR, MCR, SCR):
            return s.uart_reg[offset]
        if offset == LSR:
            return self.lsr
        if offset == MSR:
            return self.msr
        raise OSError(errno.EINVAL, f"UART register offset {offset} out of range")

    def write(self, offset: int, value: int) -> None:
        """Write ``value`` (a byte) to register ``offset`` (0-7)."""
        if not 0 <= value <= 0xFF:
            raise OSError(errno.EINVAL, f"UART register value {value:#x} is not a byte")
        s = self.s
        if offset == RBR_THR:
            if s.dlab:
                s.divisor |= value
            else:
                self._write_thr(value)
        elif offset == IER:
            if s.dlab:
                s.divisor |= value << 8
            else:
                s.uart_reg[IER] = value
                if value & IER_THRI and s.count == 0:
                    self._interrupt()
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            s.dlab = bool(value & LCR_DLAB)
            if s.dlab:
                s.divisor = 0
            s.uart_reg[LCR] = value
        elif offset == MCR:
            s.uart_reg[MCR] = value
            if s.uart_reg[IER] & IER_MSI:
                if value & MCR_OUT2:
                    self._interrupt()
                if value & (MCR_RTS | MCR_DTR):
                    self._interrupt()
        elif offset == SCR:
            s.uart_reg[SCR] = value
        elif offset not in (LSR, MSR):  # status registers ignore writes
            raise OSError(errno.EINVAL, f"UART register offset {offset} out of range")

    # --- derived registers (no side effects) -------------------------------

    @property
    def ier(self) -> int:
        return self.s.uart_reg[IER] & IER_READ_MASK

    @property
    def lcr(self) -> int:
        return self.s.uart_reg[LCR]

    @property
    def mcr(self) -> int:
        return self.s.uart_reg[MCR]

    @property
    def lsr(self) -> int:
        s = self.s
        value = LSR_DR if s.count else LSR_THRE | LSR_TEMT
        if s.overrun:
            value |= LSR_OE
        return value

    @property
    def msr(self) -> int:
        s = self.s
        value = MSR_DCD | MSR_DSR | MSR_DDSR
        if not s.uart_reg[MCR] & MCR_AFE or s.count < s.max_fifo_size:
            value |= MSR_CTS | MSR_DCTS
        return value

    @property
    def iir(self) -> int:
        s = self.s
        ier = s.uart_reg[IER]
        value = 0
        if ier & IER_RLSI and s.overrun:
            value |= IIR_RLSI
        if ier & IER_RDI and s.count >= s.trigger_level:
            value |= IIR_RDI
        if ier & IER_THRI and s.count == 0:
            value |= IIR_THRI
        if ier & IER_MSI and s.uart_reg[MCR] & (MCR_RTS | MCR_DTR):
            value |= IIR_MSI  # 0: mtty.c's modem status never shows in IIR
        return (value or IIR_NO_INT) | IIR_FIFO_BITS

    @property
    def divisor(self) -> int:
        return self.s.divisor

    @property
    def fifo_depth(self) -> int:
        return self.s.max_fifo_size

    @property
    def rx_bytes(self) -> bytes:
        """What RBR reads would return, oldest first (no side effect)."""
        s = self.s
        return bytes(s.fifo[(s.tail + i) % FIFO_SIZE] for i in range(s.count))

    # --- migration ------------------------------------------------------------

    def save(self) -> bytes:
        """The port as mtty.c's ``struct serial_port`` bytes."""
        s = self.s
        return _STATE.pack(
            bytes(s.uart_reg),
            bytes(s.fifo),
            s.head,
            s.tail,
            s.count,
            s.dlab,
            s.overrun,
            s.divisor,
            s.fcr,
            s.max_fifo_size,
            s.trigger_level,
        )

    @staticmethod
    def parse(data: bytes) -> UartState:
        """A saved port as UartState; OSError(EINVAL) unless mtty.c could hold it."""
        if len(data) != STATE_SIZE:
            raise OSError(errno.EINVAL, f"UART state is {len(data)} bytes, not {STATE_SIZE}")
        # Unpack the two flags as bytes to see values other than 0/1.
        regs, fifo, head, tail, count, _, _, divisor, fcr, depth, trigger = _STATE.unpack(data)
        dlab, overrun = data[27], data[28]
        fcr_written = trigger == TRIGGER_LEVEL
        if (
            head >= FIFO_SIZE
            or tail >= FIFO_SIZE
            or count > FIFO_SIZE
            or (tail + count) % FIFO_SIZE != head
            or dlab not in (0, 1)
            or overrun not in (0, 1)
            or bool(dlab) != bool(regs[LCR] & LCR_DLAB)
            or trigger not in (POWER_ON_TRIGGER_LEVEL, TRIGGER_LEVEL)
            or (fcr_written and depth != (FIFO_SIZE if fcr & FCR_ENABLE_FIFO else 1))
            or (not fcr_written and (fcr != 0 or depth != FIFO_SIZE))
        ):
            raise OSError(errno.EINVAL, "UART state has out-of-range or inconsistent fields")
        return UartState(
            uart_reg=bytearray(regs),
            fifo=bytearray(fifo),
            head=head,
            tail=tail,
            count=count,
            dlab=bool(dlab),
            overrun=bool(overrun),
            divisor=divisor,
            fcr=fcr,
            max_fifo_size=depth,
            trigger_level=trigger,
        )

    def load(self, data: bytes) -> None:
        """Restore :meth:`save` output; OSError(EINVAL), port unchanged, if invalid.

        Like mtty.c's load, it raises no interrupt: pending sources show in
        IIR, and an interrupt the VMM had not delivered travels in its state.
        """
        self.s = self.parse(data)

    # --- internals --------------------------------------------------------

    def _interrupt(self) -> None:
        if self._on_interrupt is not None:
            self._on_interrupt()

    def _write_thr(self, byte: int) -> None:
        s = self.s
        if s.count < s.max_fifo_size:
            s.fifo[s.head] = byte
            s.head = (s.head + 1) % FIFO_SIZE
            s.count += 1
            s.overrun = False
            if s.uart_reg[IER] & IER_RDI and s.count == s.trigger_level:
                self._interrupt()
        else:
            s.overrun = True  # the new byte is lost, the queued ones kept
            if s.uart_reg[IER] & IER_RLSI:
                self._interrupt()

    def _read_rbr(self) -> int:
        s = self.s
        value = 0
        if s.count:
            value = s.fifo[s.tail]
            s.tail = (s.tail + 1) % FIFO_SIZE
            s.count -= 1
        if s.count == 0 and s.uart_reg[IER] & IER_THRI:
            self._interrupt()  # mtty.c: every read of an empty ring, too
        return value

    def _write_fcr(self, value: int) -> None:
        s = self.s
        s.fcr = value
        if value & (FCR_CLEAR_RCVR | FCR_CLEAR_XMIT):
            s.count = s.head = s.tail = 0  # the bytes stay in the array, unreachable
        s.trigger_level = TRIGGER_LEVEL  # mtty.c parses bits 6-7, then sets 1
        s.max_fifo_size = FIFO_SIZE if value & FCR_ENABLE_FIFO else 1

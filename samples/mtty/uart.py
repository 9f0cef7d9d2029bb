"""A 16550A UART with its transmitter wired straight back to its receiver.

Pure state machine: the guest's port reads and writes come in through
:meth:`Uart16550.read` / :meth:`Uart16550.write` (offset 0-7, one byte each)
and the interrupt output comes out through a callback.  No I/O, no time.

What the guest's 8250 driver relies on, and how this model provides it:

* Every byte written to THR is "sent" at once and lands in the 16-byte RX
  FIFO (a loopback cable with infinite baud rate).  So THR/TX are always
  empty when the guest looks: LSR.THRE and LSR.TEMT always read 1, and a
  THRE interrupt is pending again right after every THR write.  A byte that
  finds the RX FIFO full is lost and sets LSR.OE (16 fit, the 17th
  overruns); with FIFOs disabled the holding register is overwritten.
* RX interrupt: "data available" when the FIFO holds at least the FCR
  trigger level (1/4/8/14).  Below the trigger a real 16550 raises the
  character-timeout interrupt after 4 idle character times; on this line no
  time passes between characters, so the timeout is taken as already expired
  and reported (IIR 0x0c) whenever data sits below the trigger level.  The
  8250 driver treats both codes the same way: it drains RX while LSR.DR.
  (The kernel's mtty sample gets the same effect by forcing the trigger
  level to 1.)
* The interrupt output is a level: high while any source enabled in IER is
  pending.  ``on_irq(level)`` is called on every change, so the device can
  signal an edge (MSI) or drive a line that it re-signals when INTx is
  unmasked while still high (what a real level-triggered card does).
* IIR reports only the highest-priority pending source, as the 16550 does:
  line status (overrun) > RX data (trigger level, then timeout) > THR empty
  > modem status.  Reading IIR clears a THRE interrupt it reported; reading
  LSR clears OE; reading MSR clears its delta bits; reading RBR drains RX.
* Modem inputs are what the kernel sample reports: DCD, DSR and CTS asserted
  (CTS follows RX FIFO room when MCR.AFE is set).  In loop mode (MCR bit 4)
  they follow the MCR outputs instead, as on the chip: CTS=RTS, DSR=DTR,
  RI=OUT1, DCD=OUT2.  A change latches the MSR delta bits, which raise the
  modem-status interrupt until MSR is read.  At power-on the lines rise from
  0, so the first MSR read shows DCTS/DDSR/DDCD.
* OUT2 is stored and looped back but does not gate the interrupt: that gate
  is a PC motherboard (ISA) convention, not part of a PCI serial card.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import struct
from collections.abc import Callable

# Register offsets (reading / writing side where they differ).
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

FIFO_SIZE = 16

IER_RDI = 0x01  # received data available (and timeout)
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 do not exist on the 16550A and read 0

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFOS_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 6-7

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_AFE = 0x20  # auto flow control (honoured by the kernel sample for CTS)
MCR_MASK = 0x3F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

IrqCallback = Callable[[bool], None]


@dataclasses.dataclass(slots=True)
class UartState:
    """Everything a 16550A holds; power-on values are the defaults."""

    rx: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0
    dlm: int = 0
    fifo_enabled: bool = False
    trigger_level: int = 1
    overrun: bool = False  # LSR.OE, until LSR is read
    thre_pending: bool = False  # THRE interrupt latched, until IIR/THR
    msr_delta: int = 0  # MSR bits 0-3, until MSR is read
    modem_inputs: int = 0  # MSR bits 4-7 as last seen (to find changes)


# Saved form of UartState (migration): fifo[16], count, then the registers.
_STATE = struct.Struct("<16sB BBBBBB BB BBBB")
STATE_SIZE = _STATE.size


class Uart16550:
    """One 16550A port; see the module doc for the behaviour."""

    def __init__(self, on_irq: IrqCallback | None = None) -> None:
        self._on_irq = on_irq
        self._level = False
        self.s = UartState()
        self._update()

    # --- the guest's view -------------------------------------------------

    def read(self, offset: int) -> int:
        """Read register ``offset`` (0-7); may have side effects (clear-on-read)."""
        s = self.s
        value: int
        if offset == RBR_THR:
            value = s.dll if s.lcr & LCR_DLAB else self._read_rbr()
        elif offset == IER:
            value = s.dlm if s.lcr & LCR_DLAB else s.ier
        elif offset == IIR_FCR:
            value = self._read_iir()
        elif offset == LCR:
            value = s.lcr
        elif offset == MCR:
            value = s.mcr
        elif offset == LSR:
            value = self.lsr
            s.overrun = False
        elif offset == MSR:
            value = self.msr
            s.msr_delta = 0
        elif offset == SCR:
            value = s.scr
        else:
            raise OSError(errno.EINVAL, f"UART register offset {offset} out of range")
        self._update()
        return value

    def write(self, offset: int, value: int) -> None:
        """Write ``value`` (a byte) to register ``offset`` (0-7)."""
        if not 0 <= value <= 0xFF:
            raise OSError(errno.EINVAL, f"UART register value {value:#x} is not a byte")
        s = self.s
        if offset == RBR_THR:
            if s.lcr & LCR_DLAB:
                s.dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if s.lcr & LCR_DLAB:
                s.dlm = value
            else:
                enabling_thri = value & IER_THRI and not s.ier & IER_THRI
                s.ier = value & IER_MASK
                # Enabling THRE interrupts while THR is empty (always, here)
                # raises one at once: 8250's start_tx relies on it (and probes it).
                if enabling_thri:
                    s.thre_pending = True
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            s.lcr = value
        elif offset == MCR:
            s.mcr = value & MCR_MASK
        elif offset == SCR:
            s.scr = value
        elif offset in (LSR, MSR):
            pass  # read-only status registers; the 16550 ignores the write
        else:
            raise OSError(errno.EINVAL, f"UART register offset {offset} out of range")
        self._update()

    def reset(self) -> None:
        """Back to power-on state (FIFO empty, registers 0, lines re-rising)."""
        self.s = UartState()
        self._update()

    # --- derived registers (no side effects) -------------------------------

    @property
    def lsr(self) -> int:
        s = self.s
        value = LSR_THRE | LSR_TEMT  # TX finishes the instant THR is written
        if s.rx:
            value |= LSR_DR
        if s.overrun:
            value |= LSR_OE
        return value

    @property
    def msr(self) -> int:
        return self.s.modem_inputs | self.s.msr_delta

    @property
    def iir(self) -> int:
        """What a read of IIR would return, without the read's side effect."""
        source = self._highest_pending()
        value = IIR_NO_INT if source is None else source
        if self.s.fifo_enabled:
            value |= IIR_FIFOS_ENABLED
        return value

    @property
    def irq_level(self) -> bool:
        """The interrupt output: some source enabled in IER is pending."""
        return self._level

    @property
    def divisor(self) -> int:
        return self.s.dlm << 8 | self.s.dll

    @property
    def fifo_depth(self) -> int:
        return FIFO_SIZE if self.s.fifo_enabled else 1

    # --- migration ------------------------------------------------------------

    def save(self) -> bytes:
        s = self.s
        fifo = bytes(s.rx).ljust(FIFO_SIZE, b"\0")
        return _STATE.pack(
            fifo,
            len(s.rx),
            s.ier,
            s.lcr,
            s.mcr,
            s.scr,
            s.dll,
            s.dlm,
            int(s.fifo_enabled),
            s.trigger_level,
            int(s.overrun),
            int(s.thre_pending),
            s.msr_delta,
            s.modem_inputs,
        )

    def load(self, data: bytes) -> None:
        """Restore :meth:`save` output; OSError(EINVAL) if it is not one."""
        if len(data) != STATE_SIZE:
            raise OSError(errno.EINVAL, f"UART state is {len(data)} bytes, not {STATE_SIZE}")
        (
            fifo,
            count,
            ier,
            lcr,
            mcr,
            scr,
            dll,
            dlm,
            fifo_en,
            trigger,
            overrun,
            thre,
            delta,
            inputs,
        ) = _STATE.unpack(data)
        if (
            count > FIFO_SIZE
            or (not fifo_en and count > 1)
            or ier & ~IER_MASK
            or mcr & ~MCR_MASK
            or fifo_en > 1
            or trigger not in TRIGGER_LEVELS
            or overrun > 1
            or thre > 1
            or delta & 0xF0
            or inputs & 0x0F
        ):
            raise OSError(errno.EINVAL, "UART state has out-of-range fields")
        self.s = UartState(
            rx=collections.deque(fifo[:count]),
            ier=ier,
            lcr=lcr,
            mcr=mcr,
            scr=scr,
            dll=dll,
            dlm=dlm,
            fifo_enabled=bool(fifo_en),
            trigger_level=trigger,
            overrun=bool(overrun),
            thre_pending=bool(thre),
            msr_delta=delta,
            modem_inputs=inputs,
        )
        self._update()

    # --- internals --------------------------------------------------------

    def _transmit(self, byte: int) -> None:
        s = self.s
        s.thre_pending = False  # writing THR clears a THRE interrupt...
        if len(s.rx) < self.fifo_depth:
            s.rx.append(byte)
        else:
            s.overrun = True
            if not s.fifo_enabled:
                # 16450 mode: the new character overwrites the unread one.
                s.rx[-1] = byte
        # ...and, the byte having left at once, THR is empty again.
        s.thre_pending = True

    def _read_rbr(self) -> int:
        rx = self.s.rx
        return rx.popleft() if rx else 0

    def _read_iir(self) -> int:
        value = self.iir
        if value & 0x0F == IIR_THRI:
            self.s.thre_pending = False  # reading IIR acknowledges THRE
        return value

    def _write_fcr(self, value: int) -> None:
        s = self.s
        enable = bool(value & FCR_ENABLE_FIFO)
        # Toggling FIFO mode empties the FIFOs on the 16550.
        if value & FCR_CLEAR_RCVR or enable != s.fifo_enabled:
            s.rx.clear()
        # FCR_CLEAR_XMIT: the TX FIFO is always empty here, nothing to drop.
        s.fifo_enabled = enable
        s.trigger_level = TRIGGER_LEVELS[value >> 6] if enable else 1

    def _modem_inputs(self) -> int:
        s = self.s
        if s.mcr & MCR_LOOP:
            inputs = 0
            if s.mcr & MCR_RTS:
                inputs |= MSR_CTS
            if s.mcr & MCR_DTR:
                inputs |= MSR_DSR
            if s.mcr & MCR_OUT1:
                inputs |= MSR_RI
            if s.mcr & MCR_OUT2:
                inputs |= MSR_DCD
            return inputs
        inputs = MSR_DCD | MSR_DSR
        if not s.mcr & MCR_AFE or len(s.rx) < self.fifo_depth:
            inputs |= MSR_CTS
        return inputs

    def _latch_modem_changes(self) -> None:
        s = self.s
        new = self._modem_inputs()
        changed = new ^ s.modem_inputs
        if changed & MSR_CTS:
            s.msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            s.msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            s.msr_delta |= MSR_DDCD
        if s.modem_inputs & MSR_RI and not new & MSR_RI:
            s.msr_delta |= MSR_TERI  # trailing edge only
        s.modem_inputs = new

    def _highest_pending(self) -> int | None:
        s = self.s
        if s.ier & IER_RLSI and s.overrun:
            return IIR_RLSI
        if s.ier & IER_RDI and s.rx:
            if len(s.rx) >= s.trigger_level:
                return IIR_RDI
            return IIR_RX_TIMEOUT  # see module doc: the timeout has expired
        if s.ier & IER_THRI and s.thre_pending:
            return IIR_THRI
        if s.ier & IER_MSI and s.msr_delta:
            return IIR_MSI
        return None

    def _update(self) -> None:
        self._latch_modem_changes()
        level = self._highest_pending() is not None
        if level != self._level:
            self._level = level
            if self._on_irq is not None:
                self._on_irq(level)

"""The pds NVMe VF: an NVMe controller behind a Pensando-branded PCIe function.

Layout the guest sees:
  vendor 1dd8 (Pensando), device 1006 (NVMe VF, our pick), class 01/08/02
  BAR0/1  64-bit memory, 16 KiB: controller registers at 0, doorbells from 0x1000
          to the end (0x2000 up belongs to queue ids 512 and up, which never
          exist: a write there raises Invalid Doorbell Register)
  BAR4/5  64-bit memory, 16 KiB: MSI-X table at 0, PBA at 0x2000
  capabilities: PM, MSI (1 vector), MSI-X (one vector per queue), PCIe endpoint
  INTx pin A

The controller also offers shadow doorbells (Doorbell Buffer Config), so a
Linux guest rings the real doorbell only when the controller is idle.

Doorbells are reached one of two ways (``doorbells=``):
  "trapped"  every doorbell write arrives as a region write; bar_write
             stores it and executes the commands at once (on the
             connection thread when served by one), waking the processing
             task only for what is left (budget, interrupt timers).
  "mmap"     the doorbell page is a sparse-mmap area the client maps; the
             guest's writes land in shared memory without any message, so
             it is polled: by a thread of the VF's own when a connection
             thread serves it (mdevcore.parents.pds.poller: short nanosleeps after
             activity, backing off when idle), else by the trio task.

Trapped stays the default: with shadow doorbells a Linux guest traps
about once per command at queue depth 1 and rarely at depth 32, and in
benchmarks/nvme_guest.py (TCG, loaded host) the two modes served on a
connection thread were within each other's run-to-run noise, while mmap
costs a polling thread's CPU.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import logging
import math
import os

import trio

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.spec import DOORBELL_BASE
from mdevcore.parents.pds.poller import poll_loop
from mdevcore.parents.pds.wakeup import Wakeup
from mdevcore.pci import caps
from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.pci.migration import MIGRATION_P2P, MIGRATION_STOP_COPY, MigState
from mdevcore.pci.msix import MsixTable
from mdevcore.vfio_user.locking import in_locked_run

log = logging.getLogger(__name__)

PENSANDO_VENDOR_ID = 0x1DD8
PDS_NVME_VF_DEVICE_ID = 0x1006
NVME_CLASS_CODE = 0x010802  # mass storage / NVM / NVM Express

BAR0_SIZE = 0x4000
MSIX_BAR = 4
MSIX_BAR_SIZE = 0x4000
MSIX_PBA_OFFSET = 0x2000

# Adaptive polling of mmapped doorbells by the trio task (served by trio
# alone; a connection thread's VF polls with mdevcore.parents.pds.poller): after
# the last command, keep polling between trio checkpoints for ``VfConfig.poll_spin`` seconds (a
# guest at queue depth 1 rings again within that), then sleep in growing
# steps.  trio sleeps are epoll timeouts: anything below 1 ms costs 1 ms.
POLL_SLEEP_MIN = 1e-3
POLL_SLEEP_MAX = 8e-3


class DoorbellMode(enum.Enum):
    TRAPPED = "trapped"
    MMAP = "mmap"


@dataclasses.dataclass(frozen=True, slots=True)
class VfConfig:
    """What one VF is made of; ``size`` is the namespace size in bytes."""

    backing: str | os.PathLike[str]
    size: int
    lba_size: int = 512
    doorbells: DoorbellMode = DoorbellMode.TRAPPED
    io_queues: int = 16
    queue_entries: int = 1024
    serial: str = "PDSVF0001"
    model: str = "Pensando NVMe VF (mdevcore)"
    direct: bool = True
    poll_spin: float = 50e-3  # mmap mode: seconds of fast polling after activity
    fast_io: bool = True  # reads and writes in C when built (mdevcore.nvme.fastio)


STATE_MAGIC = b"PDS-NVME-VF/1\n"
MAX_STATE_BYTES = 4 << 20
# Migration states in which the controller executes commands (and so
# DMAs).  RUNNING_P2P is not one of them: the uAPI lets a device in P2P take
# MMIO but not start new DMA, so doorbells rung there are only latched and
# served on the way back to RUNNING (or travel in the state).
_EXECUTING = (MigState.RUNNING, MigState.PRE_COPY)


class PdsNvmeVf(PciDevice):
    """Live-migratable like pds VFs: STOP_COPY and P2P (no PRE_COPY).

    The migration stream is the controller state (mdevcore.nvme.state) plus
    config space and the MSI-X table; namespace data stays in the backing
    file, which both ends share.  Commands execute only in RUNNING (and
    PRE_COPY): in RUNNING_P2P and the stopped states BAR0 writes are still
    taken and doorbells latched, but nothing touches guest memory until the
    device runs again, here or (through the state) on the destination.
    Every write into guest memory goes through mdevcore.nvme.prp.translate,
    which logs its pages as dirty.
    """

    migration_flags = MIGRATION_STOP_COPY | MIGRATION_P2P
    # The hooks touch no trio object (the wake-up is an eventfd), so a
    # connection thread may serve the VF: a trapped doorbell is then
    # executed on that thread without a hop through trio's scheduler.
    thread_safe_hooks = True
    # A guest at queue depth 1 rings the next doorbell a few hundred us
    # after the last interrupt (TCG: 500-1000 us); polling for it through
    # that gap rather than sleeping in recvmsg shortened the QD1 cycle
    # here (benchmarks/nvme_guest_probe.py --spin-us 0 against the
    # default; figures and their noise in benchmarks/nvme_qd1_note.md).
    request_spin_us = 1500.0

    def __init__(self, vf: VfConfig, *, name: str = "pds-nvme-vf") -> None:
        super().__init__(
            PciIdentity(
                vendor_id=PENSANDO_VENDOR_ID,
                device_id=PDS_NVME_VF_DEVICE_ID,
                class_code=NVME_CLASS_CODE,
                subsystem_vendor_id=PENSANDO_VENDOR_ID,
                subsystem_id=PDS_NVME_VF_DEVICE_ID,
                interrupt_pin=1,
            )
        )
        self.name = name
        self.vf = vf
        self.mode = DoorbellMode(vf.doorbells)
        shared: memoryview | None = None
        doorbells: memoryview | None = None
        namespace: FileNamespace | None = None
        try:
            areas = ((DOORBELL_BASE, 0x1000),) if self.mode is DoorbellMode.MMAP else ()
            shared = self.add_bar(0, BAR0_SIZE, BarKind.MEM64, mmap_areas=areas)
            self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM64)
            self.add_pm()
            self.add_msi(vectors=1)
            self.msix_vectors = vf.io_queues + 1
            self.add_msix(
                self.msix_vectors,
                table_bar=MSIX_BAR,
                table_offset=0,
                pba_bar=MSIX_BAR,
                pba_offset=MSIX_PBA_OFFSET,
            )
            self.add_express()
            namespace = FileNamespace(vf.backing, vf.size, lba_size=vf.lba_size, direct=vf.direct)
            if shared is not None:
                doorbells = shared[DOORBELL_BASE : DOORBELL_BASE + 0x1000]
            self.controller = NvmeController(
                self.dma,
                [namespace],
                self.raise_irq,
                config=ControllerConfig(
                    serial=vf.serial,
                    model=vf.model,
                    max_io_queues=vf.io_queues,
                    max_queue_entries=vf.queue_entries,
                    subsystem_vendor_id=PENSANDO_VENDOR_ID,
                ),
                doorbells=doorbells,
                irq_vectors=self._usable_vectors,
                level_irq=self._intx_mode,
                may_dma=lambda: self.mig_state in _EXECUTING,
                name=name,
                fast_io=vf.fast_io,
            )
        except BaseException:
            # A VF the config cannot build must not keep its BAR memfd or the
            # backing file open; exported views would keep the BAR mapped.
            for view in (doorbells, shared):
                if view is not None:
                    view.release()
            if namespace is not None:
                namespace.close()
            super().close()
            raise
        self.namespace = namespace
        self._wake = Wakeup()
        # Whether the mmap poller thread (mdevcore.parents.pds.poller) runs, and
        # whether on_close ran: the processing task then stops; on_close must
        # not close the eventfd under a thread blocked on it.
        self._polling = False
        self._closing = False
        self._restored = False  # state loaded: kick interrupts when running again

    # --- interrupts ---------------------------------------------------------

    def _usable_vectors(self) -> int:
        """Vectors a CQ may name: the MSI-X table once the guest enabled MSI-X."""
        if self.msix is not None:
            flags = self.config.get_u16(self.msix.offset + caps.MSIX_FLAGS)
            if flags & caps.MSIX_FLAGS_ENABLE:
                return self.msix_vectors
        return 1  # MSI (one message) or INTx

    def _intx_mode(self) -> bool:
        """Neither MSI-X nor MSI enabled by the guest: INTx, level-triggered."""
        if self.msix is not None:
            if self.config.get_u16(self.msix.offset + caps.MSIX_FLAGS) & caps.MSIX_FLAGS_ENABLE:
                return False
        if self.msi is not None:
            if self.config.get_u16(self.msi.offset + caps.MSI_FLAGS) & caps.MSI_FLAGS_ENABLE:
                return False
        return True

    # --- BAR0 -------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == 0:
            return self.controller.mmio_read(offset, size)
        return super().bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar != 0:
            super().bar_write(bar, offset, data)
            return
        doorbell = self.controller.mmio_write(offset, data)
        if doorbell and self.mig_state in _EXECUTING:
            # Serve the doorbell right here: saves a hop through the scheduler
            # for the common queue-depth-1 case; the task takes the rest.
            if not self.controller.process() and self.controller.next_deadline() is None:
                return  # nothing left, and no interrupt timer for the task to arm
        if doorbell or self.controller.ready:
            # Doorbells, and register writes that may unblock work (INTMC, CC).
            self._wake.set()

    def on_reset(self) -> None:
        self.controller.reset()
        self._wake.set()

    # --- migration ----------------------------------------------------------------

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        if new in _EXECUTING:
            if self._restored:
                self._restored = False
                self.controller.kick_interrupts()
            self._wake.set()  # doorbells rung while stopped are served now

    def _geometry(self) -> list[object]:
        """What the guest saw of this VF beyond its registers: it must not change."""
        vf = self.vf
        return [vf.size, vf.lba_size, vf.io_queues, vf.queue_entries, self.mode.value]

    def save_state(self) -> bytes:
        blob = {
            "vf": self._geometry(),
            "controller": self.controller.save_state(),
            "config": self.config.read(0, self.config.size).hex(),
            "msix_table": self._msix().snapshot().hex(),
            # Whether the client programs the table through the BAR (then its
            # mask bits count) or emulates it as QEMU does (they do not).
            "msix_owned": self._msix().owned,
        }
        return STATE_MAGIC + json.dumps(blob, separators=(",", ":")).encode()

    def load_state(self, data: bytes) -> None:
        if not data.startswith(STATE_MAGIC) or len(data) > MAX_STATE_BYTES:
            raise OSError(errno.EINVAL, "not a pds NVMe VF state")
        try:
            blob = json.loads(data[len(STATE_MAGIC) :])
            config = bytes.fromhex(blob["config"])
            msix_table = bytes.fromhex(blob["msix_table"])
            msix_owned = blob["msix_owned"]
            controller = blob["controller"]  # here, so a missing one is refused before any change
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # RecursionError: a crafted stream can nest JSON arrays deeper than
            # the decoder's limit; that is bad input, not a device failure.
            raise OSError(errno.EINVAL, f"pds NVMe VF state unreadable: {exc}") from None
        if not isinstance(msix_owned, bool):
            raise OSError(errno.EINVAL, "pds NVMe VF state: msix_owned is not a boolean")
        if len(config) != self.config.size or len(msix_table) != len(self._msix().entries):
            raise OSError(errno.EINVAL, "pds NVMe VF state from a different device layout")
        if blob.get("vf") != self._geometry():
            # Namespace size, LBA format, queue limits or doorbell mode differ:
            # the guest's driver would find another device under it.
            raise OSError(
                errno.EINVAL, f"pds NVMe VF state for {blob.get('vf')!r}, not {self._geometry()}"
            )
        # Config space first: the controller checks vectors against MSI-X.
        previous = self.config.read(0, self.config.size)
        self.config.update(0, config)
        try:
            self.controller.load_state(controller)
        except OSError:
            self.config.update(0, previous)
            raise
        self._msix().restore(msix_table)
        self._msix().owned = msix_owned
        self._restored = True
        log.info("%s: state restored", self.name)

    def _msix(self) -> MsixTable:
        assert self.msix_table is not None  # the VF always has MSI-X
        return self.msix_table

    def on_close(self) -> None:
        # Also reached when __init__ failed before the controller existed
        # (that path closes its namespace itself).
        controller = getattr(self, "controller", None)
        if controller is not None:
            self._closing = True
            self._wake.set()
            if not self._polling:
                self._wake.close()  # else the poller's task does, once its thread is joined
            controller.close()
            self.namespace.close()

    # --- processing -------------------------------------------------------------

    def executing(self) -> bool:
        """Whether the controller may run commands (DMA) in this migration state."""
        return self.mig_state in _EXECUTING

    async def background(self) -> None:
        """Execute commands as doorbells move, and fire timed interrupts."""
        if self.mode is DoorbellMode.MMAP and in_locked_run():
            await self._poll_in_thread()
            return
        await self._process_in_trio()

    async def _poll_in_thread(self) -> None:
        """Mmapped doorbells polled by a thread of this task's (mdevcore.parents.pds.poller)."""
        stop = False

        async def stop_when_cancelled() -> None:
            nonlocal stop
            try:
                await trio.sleep_forever()
            finally:
                stop = True
                self._wake.set()

        if self._closing:
            return  # closed already
        self._polling = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_cancelled)
                try:
                    await trio.to_thread.run_sync(
                        poll_loop,
                        self,
                        self._wake,
                        self.vf.poll_spin,
                        lambda: stop or self._closing,
                        limiter=trio.CapacityLimiter(1),  # its own: any number of VFs get one
                    )
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._polling = False
            if self._closing:
                self._wake.close()  # on_close left it to us

    async def _process_in_trio(self) -> None:
        ctrl = self.controller
        idle_since = trio.current_time()
        sleep = POLL_SLEEP_MIN
        while not self._closing:  # closed (removed) while served: nothing left to run
            if self.mig_state not in _EXECUTING:
                await self._wake.wait()  # stopped for migration: touch nothing
                continue
            before = ctrl.commands_done
            more = ctrl.process()
            now = trio.current_time()
            if ctrl.commands_done != before:
                idle_since, sleep = now, POLL_SLEEP_MIN
            deadline = ctrl.next_deadline()
            if deadline is not None and ctrl.clock() >= deadline:
                ctrl.tick()
                continue
            if more:
                await trio.sleep(0)  # let the server answer the client meanwhile
                continue
            wait = math.inf if deadline is None else max(0.0, deadline - ctrl.clock())
            if self.mode is DoorbellMode.MMAP and ctrl.ready:
                if now - idle_since < self.vf.poll_spin:
                    wait = 0.0
                else:
                    wait = min(wait, sleep)
                    sleep = min(sleep * 2, POLL_SLEEP_MAX)
            if wait == 0.0:
                await trio.sleep(0)
                continue
            await self._wake.wait(wait)

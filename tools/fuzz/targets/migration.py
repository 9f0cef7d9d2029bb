"""Migration stream loaders: mtty (samples/mtty) and the pds NVMe VF (parents/pds).

Input: byte 0 picks the device (even: a 2-port mtty whose UARTs a guest
programmed and filled; odd: a pds NVMe VF a driver enabled, with an I/O
queue pair, MSI-X on, features set and an AER held); the rest is the
stream handed to ``load_state``, as MIG_DATA_WRITE delivers it in
RESUMING.

Invariants:
- a refused stream raises OSError(EINVAL) and leaves the device exactly as
  it was: ``save_state`` and config space byte for byte the same;
- anything else raised is a finding (the loader must check, not crash);
- an accepted stream gives a device whose own state loads again and saves
  the same (the loaded state is self-consistent); the device then takes
  its original state back.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import random
import struct
import tempfile
from typing import Any

from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import (
    CC_EN,
    DOORBELL_BASE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    AdminOpcode,
)
from mdevcore.parents.pds.vf import STATE_MAGIC, PdsNvmeVf, VfConfig
from mdevcore.pci import caps
from mdevcore.pci.device import PciDevice
from mdevcore.samples.mtty.device import MttyDevice
from mdevcore.tools.fuzz import Finding, check
from mdevcore.vfio_user.backend import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    PCI_CONFIG_REGION_INDEX,
    DmaMapping,
)

BASE = 0x10_0000
GUEST = 1 << 20


def snapshot(device: PciDevice) -> tuple[bytes, bytes]:
    return device.save_state(), device.region_read(PCI_CONFIG_REGION_INDEX, 0, 256)


def busy_mtty() -> MttyDevice:
    """An mtty a guest driver set up: 8N1 at a divisor, FIFOs on, bytes looped back."""
    dev = MttyDevice(2)
    for bar in (0, 1):
        dev.region_write(bar, 3, b"\x83")  # LCR: DLAB on, 8 bits
        dev.region_write(bar, 0, b"\x0c")  # divisor low
        dev.region_write(bar, 3, b"\x03")  # DLAB off
        dev.region_write(bar, 2, b"\xc7")  # FCR: FIFO on, clear, trigger 14
        dev.region_write(bar, 1, b"\x05")  # IER: rx data + line status
        dev.region_write(bar, 4, b"\x0b")  # MCR
        for ch in b"mdev"[: 2 + 2 * bar]:
            dev.region_write(bar, 0, bytes([ch]))  # THR: looped into the rx FIFO
    dev.region_read(0, 0, 1)  # the guest took one byte
    return dev


class BusyVf:
    """A pds VF whose controller a driver enabled, over a memfd DMA mapping."""

    def __init__(self, folder: str) -> None:
        self.memfd = os.memfd_create("fuzz-vf-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, GUEST)
        self.mm = mmap.mmap(self.memfd, GUEST)
        self.vf = PdsNvmeVf(VfConfig(backing=os.path.join(folder, "vf.img"), size=1 << 20,
                                     io_queues=2, queue_entries=64))  # fmt: skip
        vf = self.vf
        vf.dma_map(DmaMapping(BASE, GUEST, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, self.memfd, 0))
        msix = vf.msix
        assert msix is not None
        ctl = vf.config.get_u16(msix.offset + caps.MSIX_FLAGS)
        vf.region_write(
            PCI_CONFIG_REGION_INDEX,
            msix.offset + caps.MSIX_FLAGS,
            (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little"),
        )
        vf.region_write(PCI_CONFIG_REGION_INDEX, 4, struct.pack("<H", 6))  # memory, bus master
        self.tail = 0
        self.w32(REG_AQA, 15 << 16 | 15)
        self.w64(REG_ASQ, BASE)
        self.w64(REG_ACQ, BASE + 0x1000)
        self.w32(REG_CC, CC_EN | 6 << 16 | 4 << 20)
        vf.controller.process()
        a = AdminOpcode
        self.admin(a.CREATE_IO_CQ, prp1=BASE + 0x2000, cdw10=15 << 16 | 1, cdw11=1 << 16 | 3)
        self.admin(a.CREATE_IO_SQ, prp1=BASE + 0x3000, cdw10=15 << 16 | 1, cdw11=1 << 16 | 1)
        self.admin(a.SET_FEATURES, cdw10=0x08, cdw11=50 << 8 | 7)
        self.admin(a.ASYNC_EVENT_REQUEST)

    def w32(self, offset: int, value: int) -> None:
        self.vf.region_write(0, offset, struct.pack("<I", value))

    def w64(self, offset: int, value: int) -> None:
        self.vf.region_write(0, offset, struct.pack("<Q", value))

    def admin(self, opcode: int, **fields: int) -> None:
        cmd = make_command(opcode, cid=self.tail + 1, **fields)
        self.mm[64 * self.tail : 64 * self.tail + 64] = cmd.encode()
        self.tail += 1
        self.vf.region_write(0, DOORBELL_BASE, struct.pack("<I", self.tail))
        while self.vf.controller.process():
            pass

    def close(self) -> None:
        self.vf.close()
        self.mm.close()
        os.close(self.memfd)


class MigrationTarget:
    def __init__(self) -> None:
        logging.getLogger("mdevcore").setLevel(logging.CRITICAL)
        logging.getLogger("samples").setLevel(logging.CRITICAL)
        logging.getLogger("parents").setLevel(logging.CRITICAL)
        self.dir = tempfile.TemporaryDirectory(prefix="fuzz-mig-")
        self.mtty = busy_mtty()
        self.busy_vf = BusyVf(self.dir.name)
        self.devices: tuple[PciDevice, PciDevice] = (self.mtty, self.busy_vf.vf)
        # A config read refreshes the status register's INTx bit in the config
        # copy save_state takes: read once so the baseline is settled.
        for d in self.devices:
            snapshot(d)
        self.baselines = [snapshot(d) for d in self.devices]
        self.outcomes = {"refused": 0, "accepted": 0}  # the checks are not vacuous

    def run(self, data: bytes) -> None:
        if not data:
            return
        which = data[0] & 1
        device, baseline = self.devices[which], self.baselines[which]
        stream = data[1:]
        try:
            device.load_state(stream)
        except OSError as exc:
            check(exc.errno == errno.EINVAL, f"refused with errno {exc.errno}, not EINVAL")
            check(snapshot(device) == baseline, f"a refused stream changed the device ({exc})")
            self.outcomes["refused"] += 1
            return
        except Exception as exc:
            changed = snapshot(device) != baseline
            device.load_state(baseline[0])  # so one finding does not cascade
            raise Finding(f"load_state raised {exc!r}; device changed: {changed}") from exc
        try:
            loaded = snapshot(device)
            device.load_state(loaded[0])
            check(snapshot(device) == loaded, "an accepted state does not round-trip")
        finally:
            device.load_state(baseline[0])
        check(snapshot(device) == baseline, "the device did not take its own state back")
        self.outcomes["accepted"] += 1

    def close(self) -> None:
        self.mtty.close()
        self.busy_vf.close()
        self.dir.cleanup()


def make() -> MigrationTarget:
    return MigrationTarget()


def seeds() -> dict[str, bytes]:
    """States saved by working devices (a refusal needs a near-valid stream)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-mig-seeds-") as folder:
        fresh_mtty = MttyDevice(2)
        one_port = MttyDevice(1)
        busy = busy_mtty()
        vf = BusyVf(folder)
        fresh_vf = PdsNvmeVf(VfConfig(backing=os.path.join(folder, "f.img"), size=1 << 20,
                                      io_queues=2, queue_entries=64))  # fmt: skip
        try:
            return {
                "mtty-busy": b"\0" + busy.save_state(),
                "mtty-fresh": b"\0" + fresh_mtty.save_state(),
                "mtty-one-port": b"\0" + one_port.save_state(),
                "vf-busy": b"\1" + vf.vf.save_state(),
                "vf-fresh": b"\1" + fresh_vf.save_state(),
            }
        finally:
            for d in (fresh_mtty, one_port, busy, fresh_vf):
                d.close()
            vf.close()


# --- structure-aware mutation -------------------------------------------------
# Byte mutations of a JSON stream mostly break the JSON, so the loaders'
# checks behind json.loads are rarely reached.  Half the time this mutates
# one value of the decoded state instead and encodes it again: a stream
# valid up to the one field that is not.

_EDGES = (0, 1, -1, 2, 15, 16, 63, 64, 255, 256, 4095, 4096, 65535, 65536, (1 << 32) - 1,
          1 << 32, (1 << 64) - 1, 1 << 64, 10**30)  # fmt: skip


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _leaves(value, (*path, i))
    return out


def _mutate_value(rng: random.Random, value: Any) -> Any:
    choice = rng.randrange(8)
    if choice == 0:
        return rng.choice([None, True, False, "", "x", [], {}, 0.5])
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([rng.choice(_EDGES), value + rng.choice([-1, 1]), -value])
    if isinstance(value, list):
        if value and choice < 4:
            del value[rng.randrange(len(value))]
        elif value:
            value.append(value[rng.randrange(len(value))])
        return value
    if isinstance(value, dict):
        if value and choice < 5:
            del value[rng.choice(list(value))]
        else:
            value[rng.choice(["x", "0", "99", "version"])] = rng.choice(_EDGES)
        return value
    if isinstance(value, str):
        return value[: rng.randrange(len(value) + 1)] + rng.choice(["", "0", "zz", "\u00e9"])
    return value


def custom_mutator(data: bytes, max_size: int, seed: int, fallback: Any) -> bytes:
    """For atheris: mutate one field of the state (pds VF: JSON; mtty: one record byte)."""
    rng = random.Random(seed)
    if len(data) > 1 and rng.random() < 0.5:
        head, body = data[:1], data[1:]
        if body.startswith(STATE_MAGIC):
            try:
                blob = json.loads(body[len(STATE_MAGIC) :])
            except (ValueError, RecursionError):
                blob = None
            if blob is not None:
                path = rng.choice(_leaves(blob))
                if not path:
                    blob = _mutate_value(rng, blob)
                else:
                    parent = blob
                    for step in path[:-1]:
                        parent = parent[step]
                    parent[path[-1]] = _mutate_value(rng, parent[path[-1]])
                out = head + STATE_MAGIC + json.dumps(blob, separators=(",", ":")).encode()
                return out[:max_size]
    mutated: bytes = fallback(data, max_size)
    return mutated

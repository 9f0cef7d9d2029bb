"""DEVICE_RESET and the sample counter device, through the backend methods."""

from __future__ import annotations

import errno
import logging
import struct

import pytest
from pcitest_helpers import PlainDevice, cfg_read, cfg_write, drain, eventfds

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.pci.device import PciDevice, PciIdentity
from mdevcore.pci.migration import MigState
from mdevcore.ratelimit import RateLimitedLog
from mdevcore.samples.counter import MAGIC, Counter
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DeviceBackend

MSI_TRIGGER = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER


def test_reset_keeps_programmed_header_and_resets_the_rest() -> None:
    dev = PlainDevice(express=True)
    cfg_write(dev, cfg.COMMAND, cfg.COMMAND_MEMORY | cfg.COMMAND_MASTER, 2)
    cfg_write(dev, cfg.BAR0, 0xFEB00000, 4)
    cfg_write(dev, cfg.INTERRUPT_LINE, 11, 1)
    cfg_write(dev, dev.msi_off + caps.MSI_FLAGS, caps.MSI_FLAGS_ENABLE, 2)
    cfg_write(dev, dev.pm + caps.PM_CTRL, 3, 2)
    cfg_write(dev, dev.exp + caps.EXP_DEVCTL, 0, 2)
    dev.region_write(4, 0, b"\xff" * 16)  # MSI-X table entry 0
    with eventfds(1) as (fd,):
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, MSI_TRIGGER, 0, 1, b"", [fd])
        dev.reset()
        assert dev.resets == 1
        dev.raise_irq(0)
        assert drain(fd) == 0  # interrupts are disabled by a reset
    assert dev.irqs.active_index() is None
    assert cfg_read(dev, cfg.COMMAND, 2) == cfg.COMMAND_MEMORY | cfg.COMMAND_MASTER
    assert cfg_read(dev, cfg.BAR0, 4) == 0xFEB00000
    assert cfg_read(dev, cfg.INTERRUPT_LINE, 1) == 11
    assert not cfg_read(dev, dev.msi_off + caps.MSI_FLAGS, 2) & caps.MSI_FLAGS_ENABLE
    assert cfg_read(dev, dev.pm + caps.PM_CTRL, 2) & 3 == 0
    assert cfg_read(dev, dev.exp + caps.EXP_DEVCTL, 2) != 0  # back to its default
    assert dev.region_read(4, 0, 16) == bytes(12) + b"\x01\x00\x00\x00"


def test_counter_sample_is_a_device_backend() -> None:
    dev = Counter()
    assert isinstance(dev, DeviceBackend)
    assert dev.region_read(0, 8, 4) == MAGIC.to_bytes(4, "little")
    assert dev.region_read(0, 8, 1) == bytes([MAGIC & 0xFF])


def test_counter_counts_and_interrupts() -> None:
    dev = Counter()
    with eventfds(1) as (fd,):
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, MSI_TRIGGER, 0, 1, b"", [fd])
        dev.region_write(0, 0, (40).to_bytes(4, "little"))
        dev.region_write(0, 4, (2).to_bytes(4, "little"))
        assert dev.region_read(0, 0, 4) == (42).to_bytes(4, "little")
        assert drain(fd) == 2
        dev.region_write(0, 0x10, b"\x01")  # unknown register: no interrupt
        assert drain(fd) == 0
    dev.reset()
    assert dev.region_read(0, 0, 4) == bytes(4)


def test_counter_migrates() -> None:
    src, dst = Counter(), Counter()
    src.region_write(0, 0, (1234).to_bytes(4, "little"))
    state = struct.pack("<Ii", MigState.STOP_COPY, -1)
    src.device_feature(vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE, state)
    data = src.mig_data_read(64)
    assert len(data) < 64
    resume = struct.pack("<Ii", MigState.RESUMING, -1)
    dst.device_feature(vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE, resume)
    dst.mig_data_write(data)
    running = struct.pack("<Ii", MigState.RUNNING, -1)
    dst.device_feature(vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE, running)
    assert dst.region_read(0, 0, 4) == (1234).to_bytes(4, "little")
    # Only STOP_COPY is offered: no P2P state.
    p2p = struct.pack("<Ii", MigState.RUNNING_P2P, -1)
    with pytest.raises(OSError) as info:
        dst.device_feature(vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE, p2p)
    assert info.value.errno == errno.EINVAL


def test_device_name_reaches_logs(caplog: pytest.LogCaptureFixture) -> None:
    named = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0), name="early")
    assert named.name == "early"
    dev = Counter()
    assert dev.name == "Counter"  # the class name until the parent names it
    dev.name = "3b1f0c2e-uuid"
    with caplog.at_level("DEBUG", logger="mdevcore.pci"):
        dev.reset()
        dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, vfio.IRQ_SET_DATA_NONE | 0x20, 0, 0, b"", [])
    assert all("[3b1f0c2e-uuid]" in r.getMessage() for r in caplog.records)
    assert len(caplog.records) >= 2


def test_a_guest_resetting_in_a_loop_writes_a_bounded_log(caplog: pytest.LogCaptureFixture) -> None:
    """DEVICE_RESET is the guest's to repeat: the log takes the first few, then summaries."""
    dev = Counter()
    try:
        with caplog.at_level(logging.INFO, logger="mdevcore.pci.device"):
            for _ in range(1000):
                dev.reset()
        resets = [r for r in caplog.records if r.getMessage().endswith("device reset")]
        assert len(resets) == RateLimitedLog(logging.getLogger()).burst
    finally:
        dev.close()

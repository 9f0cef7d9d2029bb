"""Controller configuration and the Identify data structures built from it."""

from __future__ import annotations

import dataclasses
import struct

from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.spec import CQES_LOG2, SQES_LOG2, VERSION_1_4

IDENTIFY_SIZE = 4096

OACS_DOORBELL_BUFFER_CONFIG = 1 << 8
# ONCS bits: the optional NVM commands this controller executes.
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
# VWC: a volatile write cache is present (bit 0); Flush with NSID FFFFFFFFh works (11b in 2:1).
VWC_PRESENT_BROADCAST_FLUSH = 0x07
# LPA bit 2: Get Log Page supports offsets and extended NUMD.
LPA_EXTENDED_DATA = 1 << 2
# DLFEAT: deallocated blocks read as zeroes (001b); Write Zeroes may deallocate (bit 3).
DLFEAT_ZEROES_AND_DEAC = 0x09


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Identity and limits of one controller; shown to the host through Identify/CAP."""

    vendor_id: int = 0x1DD8
    subsystem_vendor_id: int = 0x1DD8
    serial: str = "MDEVNVME0001"
    model: str = "mdevcore emulated NVMe"
    firmware: str = "1.0"
    ieee_oui: int = 0x000000
    cntlid: int = 1
    max_queue_entries: int = 1024  # CAP.MQES + 1, for every queue
    max_io_queues: int = 64  # per direction
    mdts: int = 7  # max transfer = 2**mdts minimum pages (512 KiB)
    aerl: int = 3  # outstanding AERs allowed, 0-based
    acl: int = 3  # outstanding Aborts allowed, 0-based
    kas: int = 10  # keep-alive granularity in 100 ms units
    error_log_entries: int = 16
    timeout_500ms: int = 20  # CAP.TO: worst-case RDY transition time
    subnqn: str = ""
    shadow_doorbells: bool = True  # offer Doorbell Buffer Config (OACS bit 8)

    @property
    def max_transfer(self) -> int:
        return (1 << self.mdts) * 4096


def _ascii(text: str, size: int) -> bytes:
    """NVMe ASCII fields are space-padded, left-justified."""
    raw = text.encode("ascii", "replace")[:size]
    return raw + b" " * (size - len(raw))


def identify_controller(config: ControllerConfig, nn: int) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0, config.vendor_id, config.subsystem_vendor_id)
    data[4:24] = _ascii(config.serial, 20)
    data[24:64] = _ascii(config.model, 40)
    data[64:72] = _ascii(config.firmware, 8)
    data[72] = 6  # recommended arbitration burst
    data[73:76] = config.ieee_oui.to_bytes(3, "little")
    data[77] = config.mdts
    struct.pack_into("<HI", data, 78, config.cntlid, VERSION_1_4)
    data[111] = 1  # CNTRLTYPE: I/O controller
    if config.shadow_doorbells:
        struct.pack_into("<H", data, 256, OACS_DOORBELL_BUFFER_CONFIG)
    data[258] = config.acl
    data[259] = config.aerl
    data[260] = 0x03  # FRMW: one firmware slot, slot 1 read-only
    data[261] = LPA_EXTENDED_DATA
    data[262] = config.error_log_entries - 1
    struct.pack_into("<HH", data, 266, 343, 373)  # WCTEMP/CCTEMP in kelvin
    struct.pack_into("<H", data, 320, config.kas)
    data[512] = SQES_LOG2 << 4 | SQES_LOG2
    data[513] = CQES_LOG2 << 4 | CQES_LOG2
    struct.pack_into("<IH", data, 516, nn, ONCS_DSM | ONCS_WRITE_ZEROES)
    data[525] = VWC_PRESENT_BROADCAST_FLUSH
    data[530] = 1  # NVSCC: vendor-specific commands use the standard format
    subnqn = config.subnqn or f"nqn.2026-11.io.mdevcore:nvme:{config.serial}"
    data[768 : 768 + 256] = subnqn.encode()[:255].ljust(256, b"\0")
    struct.pack_into("<H", data, 2048, 2500)  # power state 0: 25 W max
    return bytes(data)


def identify_namespace(ns: FileNamespace) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", data, 0, ns.nlbas, ns.nlbas, ns.nlbas)
    data[25] = 0  # NLBAF: one LBA format (0-based)
    data[26] = 0  # FLBAS: format 0 in use
    data[33] = DLFEAT_ZEROES_AND_DEAC
    data[104:120] = ns.uuid.bytes  # NGUID
    struct.pack_into("<I", data, 128, (ns.lba_size.bit_length() - 1) << 16)
    return bytes(data)


def active_namespace_list(nsids: list[int], after: int) -> bytes:
    chosen = sorted(n for n in nsids if n > after)[:1024]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(IDENTIFY_SIZE, b"\0")


NIDT_NGUID = 2
NIDT_UUID = 3


def namespace_descriptors(ns: FileNamespace) -> bytes:
    out = bytearray()
    for nidt, value in ((NIDT_NGUID, ns.uuid.bytes), (NIDT_UUID, ns.uuid.bytes)):
        out += struct.pack("<BBH", nidt, len(value), 0) + value
    return bytes(out).ljust(IDENTIFY_SIZE, b"\0")

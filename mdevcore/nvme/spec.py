"""Numbers from the NVM Express base specification (1.4) that the controller uses.

Only names and values live here; behaviour lives in the modules that use them.
"""

from __future__ import annotations

import enum

# --- controller registers (offsets into BAR0) --------------------------------

REG_CAP = 0x00  # 64-bit, read-only
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28  # 64-bit
REG_ACQ = 0x30  # 64-bit
DOORBELL_BASE = 0x1000
REGISTERS_SIZE = 0x1000

NSSR_RESET_VALUE = 0x4E564D65  # "NVMe": the only value that triggers a subsystem reset

VERSION_1_4 = 0x00010400

# CC fields
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF
CC_WRITABLE = 0x00FFFFF1

# CSTS fields
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
CSTS_NSSRO = 1 << 4

SQ_ENTRY_SIZE = 64
CQ_ENTRY_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4

BROADCAST_NSID = 0xFFFFFFFF


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESCRIPTORS = 0x03


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    ASYNC_EVENT_CONFIG = 0x0B
    KEEP_ALIVE_TIMER = 0x0F


class LogId(enum.IntEnum):
    ERROR_INFO = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


# Asynchronous event types (CQE DW0 bits 2:0) and the infos used here
class AsyncEventType(enum.IntEnum):
    ERROR = 0
    SMART = 1
    NOTICE = 2


AER_INFO_INVALID_DOORBELL_REGISTER = 0x00
AER_INFO_INVALID_DOORBELL_VALUE = 0x01


class StatusType(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2


class Generic(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    COMMAND_ID_CONFLICT = 0x03
    DATA_TRANSFER_ERROR = 0x04
    INTERNAL_ERROR = 0x06
    ABORT_REQUESTED = 0x07
    ABORTED_SQ_DELETION = 0x08
    INVALID_NAMESPACE = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11
    PRP_OFFSET_INVALID = 0x13
    LBA_OUT_OF_RANGE = 0x80


class CommandSpecific(enum.IntEnum):
    INVALID_CQ = 0x00
    INVALID_QUEUE_ID = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_LIMIT_EXCEEDED = 0x03
    AER_LIMIT_EXCEEDED = 0x05
    INVALID_INTERRUPT_VECTOR = 0x08
    INVALID_LOG_PAGE = 0x09
    INVALID_QUEUE_DELETION = 0x0C
    FEATURE_NOT_SAVEABLE = 0x0D


class NvmeError(Exception):
    """A command failed with an NVMe status; raised inside command handlers.

    ``dnr`` (Do Not Retry) is set for errors a retry cannot fix, which is
    every error this controller reports except a transient internal one.
    """

    def __init__(self, sct: int, sc: int, why: str = "", *, dnr: bool = True) -> None:
        super().__init__(f"sct={sct:#x} sc={sc:#x} {why}".rstrip())
        self.sct = sct
        self.sc = sc
        self.dnr = dnr

    @property
    def status(self) -> int:
        """The 15-bit status field (without the phase bit) as placed in CQE DW3[31:17]."""
        return status_field(self.sct, self.sc, self.dnr)


def status_field(sct: int, sc: int, dnr: bool = False) -> int:
    return (sc & 0xFF) | (sct & 0x7) << 8 | (0x4000 if dnr else 0)


def generic(sc: Generic, why: str = "") -> NvmeError:
    return NvmeError(StatusType.GENERIC, sc, why)


def specific(sc: CommandSpecific, why: str = "") -> NvmeError:
    return NvmeError(StatusType.COMMAND_SPECIFIC, sc, why)

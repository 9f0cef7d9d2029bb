"""Admin commands: success paths and every error status they define."""

from __future__ import annotations

import struct
import uuid

import pytest
from nvme_host import NS_SIZE, PAGE, FakeClock, GuestMemory, Host, status

from mdevcore.nvme import NvmeController
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import (
    CSTS_CFS,
    AdminOpcode,
    AsyncEventType,
    CommandSpecific,
    FeatureId,
    Generic,
    LogId,
    StatusType,
)

G, CS = StatusType.GENERIC, StatusType.COMMAND_SPECIFIC


def identify(host: Host, cns: int, nsid: int = 0) -> tuple[int, bytes]:
    buf = host.mem.alloc(PAGE)
    cqe = host.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns)
    return cqe.status, host.mem.read(buf, PAGE)


# --- identify ----------------------------------------------------------------


def test_identify_controller(host: Host) -> None:
    st, data = identify(host, 1)
    assert st == 0
    vid, ssvid = struct.unpack_from("<HH", data, 0)
    assert vid == 0x1DD8 and ssvid == 0x1DD8
    assert data[4:24].rstrip() == b"MDEVNVME0001"
    assert data[77] == 5  # MDTS as configured
    assert struct.unpack_from("<I", data, 80)[0] == 0x00010400
    assert data[512] == 0x66 and data[513] == 0x44
    assert struct.unpack_from("<I", data, 516)[0] == 1  # NN
    oncs = struct.unpack_from("<H", data, 520)[0]
    assert oncs & 0b1100 == 0b1100  # DSM + Write Zeroes
    assert data[525] & 1  # volatile write cache present
    assert struct.unpack_from("<I", data, 536)[0] == 0  # no SGL support


def test_identify_namespace(host: Host) -> None:
    st, data = identify(host, 0, nsid=1)
    assert st == 0
    nsze, ncap, nuse = struct.unpack_from("<QQQ", data, 0)
    assert nsze == ncap == nuse == NS_SIZE // 512
    assert data[26] & 0xF == 0
    assert struct.unpack_from("<I", data, 128)[0] >> 16 & 0xFF == 9  # 512-byte LBAs
    assert data[33] & 0x7 == 1  # deallocated blocks read as zeroes


@pytest.mark.parametrize("nsid", [0, 2, 0xFFFFFFFF])
def test_identify_namespace_invalid_nsid(host: Host, nsid: int) -> None:
    assert identify(host, 0, nsid=nsid)[0] == status(G, Generic.INVALID_NAMESPACE)


def test_active_namespace_list(host: Host) -> None:
    st, data = identify(host, 2, nsid=0)
    assert st == 0 and struct.unpack_from("<II", data, 0) == (1, 0)
    st, data = identify(host, 2, nsid=1)
    assert st == 0 and data[:4] == bytes(4)
    assert identify(host, 2, nsid=0xFFFFFFFE)[0] == status(G, Generic.INVALID_NAMESPACE)


def test_namespace_descriptors(host: Host, ctrl: NvmeController) -> None:
    st, data = identify(host, 3, nsid=1)
    assert st == 0
    ns_uuid = ctrl.namespaces[0].uuid
    # NGUID descriptor then UUID descriptor
    assert data[0:4] == bytes([2, 16, 0, 0]) and data[4:20] == ns_uuid.bytes
    assert data[20:24] == bytes([3, 16, 0, 0]) and uuid.UUID(bytes=data[24:40]) == ns_uuid
    assert identify(host, 3, nsid=5)[0] == status(G, Generic.INVALID_NAMESPACE)


def test_identify_unknown_cns(host: Host) -> None:
    assert identify(host, 0x10)[0] == status(G, Generic.INVALID_FIELD)


def test_identify_into_unmapped_memory(host: Host, mem: GuestMemory) -> None:
    cqe = host.admin(AdminOpcode.IDENTIFY, prp1=mem.base + mem.size, cdw10=1)
    assert cqe.status == status(G, Generic.DATA_TRANSFER_ERROR)


def test_invalid_admin_opcode_sgl_and_fused(host: Host) -> None:
    assert host.admin(0x7F).status == status(G, Generic.INVALID_OPCODE)
    assert host.admin(AdminOpcode.KEEP_ALIVE, flags=0x40).status == status(G, Generic.INVALID_FIELD)
    assert host.admin(AdminOpcode.KEEP_ALIVE, flags=0x01).status == status(G, Generic.INVALID_FIELD)


# --- features ----------------------------------------------------------------


def get_feature(host: Host, fid: int, sel: int = 0, cdw11: int = 0) -> tuple[int, int]:
    cqe = host.admin(AdminOpcode.GET_FEATURES, cdw10=sel << 8 | fid, cdw11=cdw11)
    return cqe.status, cqe.dw0


def set_feature(host: Host, fid: int, value: int, save: bool = False) -> tuple[int, int]:
    cqe = host.admin(AdminOpcode.SET_FEATURES, cdw10=int(save) << 31 | fid, cdw11=value)
    return cqe.status, cqe.dw0


def test_number_of_queues(host: Host) -> None:
    assert get_feature(host, FeatureId.NUMBER_OF_QUEUES) == (0, 7 << 16 | 7)
    # ask for 4 SQs and 100 CQs: granted 4 and the maximum (8)
    assert set_feature(host, FeatureId.NUMBER_OF_QUEUES, 99 << 16 | 3) == (0, 7 << 16 | 3)
    assert get_feature(host, FeatureId.NUMBER_OF_QUEUES) == (0, 7 << 16 | 3)
    assert set_feature(host, FeatureId.NUMBER_OF_QUEUES, 0xFFFF)[0] == status(
        G, Generic.INVALID_FIELD
    )
    host.create_io_queue_pair(1)
    assert set_feature(host, FeatureId.NUMBER_OF_QUEUES, 1)[0] == status(
        G, Generic.COMMAND_SEQUENCE_ERROR
    )
    # SQ id 5 > 4 allocated
    q = host.mem.alloc(PAGE)
    cqe = host.admin(AdminOpcode.CREATE_IO_SQ, prp1=q, cdw10=7 << 16 | 5, cdw11=1 << 16 | 1)
    assert cqe.status == status(CS, CommandSpecific.INVALID_QUEUE_ID)


def test_simple_features_round_trip(host: Host, ctrl: NvmeController) -> None:
    for fid, value, default in [
        (FeatureId.ARBITRATION, 0x03020106, 3),
        (FeatureId.INTERRUPT_COALESCING, 0x0A03, 0),
        (FeatureId.ASYNC_EVENT_CONFIG, 0x1FF, 0),
    ]:
        assert set_feature(host, fid, value)[0] == 0
        assert get_feature(host, fid) == (0, value)
        assert get_feature(host, fid, sel=1) == (0, default)
    assert ctrl.irq.threshold == 3 and ctrl.irq.time_100us == 10


def test_volatile_write_cache(host: Host, ctrl: NvmeController) -> None:
    assert get_feature(host, FeatureId.VOLATILE_WRITE_CACHE) == (0, 1)
    assert set_feature(host, FeatureId.VOLATILE_WRITE_CACHE, 0)[0] == 0
    assert get_feature(host, FeatureId.VOLATILE_WRITE_CACHE) == (0, 0)
    assert not ctrl.namespaces[0].write_cache


def test_interrupt_vector_config(host: Host, ctrl: NvmeController) -> None:
    assert set_feature(host, FeatureId.INTERRUPT_VECTOR_CONFIG, 1 << 16 | 2)[0] == 0
    assert get_feature(host, FeatureId.INTERRUPT_VECTOR_CONFIG, cdw11=2) == (0, 1 << 16 | 2)
    assert 2 in ctrl.irq.coalescing_disabled
    st = get_feature(host, FeatureId.INTERRUPT_VECTOR_CONFIG, cdw11=100)[0]
    assert st == status(G, Generic.INVALID_FIELD)


def test_feature_errors(host: Host) -> None:
    for fid in (0x00, 0x03, 0x05, 0x80, 0xFF):
        assert get_feature(host, fid)[0] == status(G, Generic.INVALID_FIELD), fid
        assert set_feature(host, fid, 0)[0] == status(G, Generic.INVALID_FIELD), fid
    st = set_feature(host, FeatureId.ARBITRATION, 1, save=True)[0]
    assert st == status(CS, CommandSpecific.FEATURE_NOT_SAVEABLE)
    assert get_feature(host, FeatureId.ARBITRATION, sel=3) == (0, 1 << 2)  # changeable
    assert get_feature(host, FeatureId.ARBITRATION, sel=4)[0] == status(G, Generic.INVALID_FIELD)


# --- queue creation and deletion ----------------------------------------------


def create_cq(
    host: Host, qid: int, qsize: int = 15, cdw11: int = 0b11, base: int | None = None
) -> int:
    prp1 = host.mem.alloc(PAGE) if base is None else base
    return host.admin(
        AdminOpcode.CREATE_IO_CQ, prp1=prp1, cdw10=qsize << 16 | qid, cdw11=cdw11
    ).status


def create_sq(host: Host, qid: int, cqid: int, qsize: int = 15, cdw11: int = 1) -> int:
    prp1 = host.mem.alloc(PAGE)
    return host.admin(
        AdminOpcode.CREATE_IO_SQ, prp1=prp1, cdw10=qsize << 16 | qid, cdw11=cqid << 16 | cdw11
    ).status


def test_create_cq_errors(host: Host) -> None:
    bad_qid = status(CS, CommandSpecific.INVALID_QUEUE_ID)
    bad_size = status(CS, CommandSpecific.INVALID_QUEUE_SIZE)
    assert create_cq(host, 0) == bad_qid
    assert create_cq(host, 9) == bad_qid  # beyond the 8 allocated
    assert create_cq(host, 1, qsize=0) == bad_size
    assert create_cq(host, 1, qsize=256) == bad_size  # MQES is 255
    assert create_cq(host, 1, cdw11=0b10) == status(G, Generic.INVALID_FIELD)  # PC clear
    assert create_cq(host, 1, base=host.mem.alloc(PAGE) + 0x100) == status(
        G, Generic.PRP_OFFSET_INVALID
    )
    assert create_cq(host, 1, cdw11=9 << 16 | 0b11) == status(
        CS, CommandSpecific.INVALID_INTERRUPT_VECTOR
    )
    assert create_cq(host, 1, qsize=255) == 0
    assert create_cq(host, 1) == bad_qid  # exists


def test_create_sq_errors(host: Host) -> None:
    assert create_sq(host, 1, cqid=1) == status(CS, CommandSpecific.INVALID_CQ)
    assert create_sq(host, 1, cqid=0) == status(CS, CommandSpecific.INVALID_CQ)
    assert create_cq(host, 1) == 0
    assert create_sq(host, 0, cqid=1) == status(CS, CommandSpecific.INVALID_QUEUE_ID)
    assert create_sq(host, 1, cqid=1, qsize=0) == status(CS, CommandSpecific.INVALID_QUEUE_SIZE)
    assert create_sq(host, 1, cqid=1, cdw11=0) == status(G, Generic.INVALID_FIELD)
    assert create_sq(host, 1, cqid=1) == 0
    assert create_sq(host, 1, cqid=1) == status(CS, CommandSpecific.INVALID_QUEUE_ID)
    assert create_sq(host, 2, cqid=1) == 0  # two SQs may share one CQ


def test_delete_queues(host: Host, ctrl: NvmeController) -> None:
    host.create_io_queue_pair(1)
    bad_qid = status(CS, CommandSpecific.INVALID_QUEUE_ID)
    assert host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=1).status == status(
        CS, CommandSpecific.INVALID_QUEUE_DELETION
    )
    assert host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=0).status == bad_qid
    assert host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=2).status == bad_qid
    assert host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=1).status == 0
    assert host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=1).status == bad_qid
    assert host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=0).status == bad_qid
    assert host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=1).status == 0
    assert host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=1).status == bad_qid
    assert set(ctrl.sqs) == {0} and set(ctrl.cqs) == {0}


def test_io_queue_entry_sizes_must_be_set(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    h.enable(cc_extra=0)  # IOSQES/IOCQES left zero
    assert create_cq(h, 1) == status(G, Generic.INVALID_FIELD)


# --- log pages -----------------------------------------------------------------


def get_log(
    host: Host, lid: int, length: int, offset: int = 0, rae: bool = False, nsid: int = 0
) -> tuple[int, bytes]:
    buf = host.mem.alloc(max(length, PAGE))
    numd = length // 4 - 1
    cqe = host.admin(
        AdminOpcode.GET_LOG_PAGE,
        nsid=nsid,
        prp1=buf,
        cdw10=(numd & 0xFFFF) << 16 | int(rae) << 15 | lid,
        cdw11=numd >> 16,
        cdw12=offset & 0xFFFFFFFF,
        cdw13=offset >> 32,
    )
    return cqe.status, host.mem.read(buf, length)


def test_error_log_records_failed_commands(host: Host) -> None:
    failed = host.submit(0, make_command(0x7F))
    host.run()
    host.reap(0)
    st, page = get_log(host, LogId.ERROR_INFO, 64)
    assert st == 0
    count, sqid, cid, sf = struct.unpack_from("<QHHH", page, 0)
    assert count == 1 and sqid == 0 and cid == failed.cid
    assert sf >> 1 == status(G, Generic.INVALID_OPCODE)


def test_smart_and_firmware_logs(io_host: Host) -> None:
    buf = io_host.mem.alloc(PAGE)
    for _ in range(3):
        assert io_host.command(1, make_command(0x01, nsid=1, prp1=buf, cdw12=7)).status == 0
    st, page = get_log(io_host, LogId.SMART, 512)
    assert st == 0
    assert int.from_bytes(page[48:64], "little") == 1  # data units written (rounded up)
    assert int.from_bytes(page[80:96], "little") == 3  # host write commands
    assert struct.unpack_from("<H", page, 1)[0] > 273  # composite temperature in kelvin
    st, page = get_log(io_host, LogId.FIRMWARE_SLOT, 512)
    assert st == 0 and page[0] == 1 and page[8:16].rstrip() == b"1.0"
    # offset read: the tail of the firmware log
    st, tail = get_log(io_host, LogId.FIRMWARE_SLOT, 8, offset=8)
    assert st == 0 and tail.rstrip() == b"1.0"


def test_log_page_errors(host: Host) -> None:
    assert get_log(host, 0x7F, 64)[0] == status(CS, CommandSpecific.INVALID_LOG_PAGE)
    assert get_log(host, LogId.SMART, 64, offset=1024)[0] == status(G, Generic.INVALID_FIELD)
    assert get_log(host, LogId.SMART, 64, offset=2)[0] == status(G, Generic.INVALID_FIELD)
    assert get_log(host, LogId.SMART, 64, nsid=1)[0] == status(G, Generic.INVALID_FIELD)


# --- async events, abort, keep alive ----------------------------------------------


def test_async_event_request_is_held_until_an_event(host: Host, ctrl: NvmeController) -> None:
    aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    assert host.reap(0) == []
    # ring the doorbell of a queue that does not exist: an error event
    host.ring(2 * 5, 1)
    host.run()
    done = host.reap(0)
    assert [c.cid for c in done] == [aer.cid]
    assert done[0].status == 0
    assert done[0].dw0 & 0x7 == 0 and done[0].dw0 >> 16 & 0xFF == LogId.ERROR_INFO
    # a second event of the same type waits until the error log is read
    aer2 = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    host.ring(2 * 6, 1)
    host.run()
    assert host.reap(0) == []
    get_log(host, LogId.ERROR_INFO, 64, rae=True)  # RAE keeps the mask
    assert host.reap(0) == []
    # reading it (RAE clear) unmasks errors: the held AER completes right after the read
    read = host.submit(
        0,
        make_command(
            AdminOpcode.GET_LOG_PAGE, prp1=host.mem.alloc(PAGE), cdw10=15 << 16 | LogId.ERROR_INFO
        ),
    )
    host.run()
    done = host.reap(0)
    assert [c.cid for c in done] == [read.cid, aer2.cid]


def test_async_event_request_limit(host: Host, ctrl: NvmeController) -> None:
    for _ in range(ctrl.config.aerl + 1):
        host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    assert host.reap(0) == []
    cqe = host.admin(AdminOpcode.ASYNC_EVENT_REQUEST)
    assert cqe.status == status(CS, CommandSpecific.AER_LIMIT_EXCEEDED)


def test_abort(host: Host) -> None:
    aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    abort = host.submit(0, make_command(AdminOpcode.ABORT, cdw10=aer.cid << 16))
    host.run()
    done = {c.cid: c for c in host.reap(0)}
    assert done[aer.cid].status == status(G, Generic.ABORT_REQUESTED)
    assert done[abort.cid].status == 0 and done[abort.cid].dw0 & 1 == 0
    # nothing outstanding with that id any more: "not aborted"
    cqe = host.admin(AdminOpcode.ABORT, cdw10=aer.cid << 16)
    assert cqe.status == 0 and cqe.dw0 & 1 == 1


def test_keep_alive_timer(host: Host, ctrl: NvmeController, clock: FakeClock) -> None:
    assert set_feature(host, FeatureId.KEEP_ALIVE_TIMER, 1500)[0] == 0
    assert get_feature(host, FeatureId.KEEP_ALIVE_TIMER) == (0, 2000)  # rounded to 1 s units
    clock.now += 1.5
    assert host.admin(AdminOpcode.KEEP_ALIVE).status == 0
    clock.now += 1.5
    ctrl.tick()
    assert not ctrl.csts & CSTS_CFS
    deadline = ctrl.next_deadline()
    assert deadline is not None
    clock.now = deadline
    ctrl.tick()
    assert ctrl.csts & CSTS_CFS
    # Expired for good: no deadline stays in the past, or an owner that
    # ticks whenever the deadline has passed would spin forever.
    assert ctrl.next_deadline() is None


def test_events_delivered_into_a_nearly_full_admin_cq_are_not_lost(
    host: Host, ctrl: NvmeController
) -> None:
    cqe = host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIG, cdw11=0x100)
    assert cqe.status == 0
    # two events of different types wait for AERs
    ctrl.post_event(AsyncEventType.ERROR, 0, LogId.ERROR_INFO)
    ctrl.post_event(AsyncEventType.NOTICE, 0, 4)
    # admin CQ (16 slots, 15 usable) gets 14 unreaped completions, then two AERs
    for _ in range(6):
        host.submit(0, make_command(AdminOpcode.KEEP_ALIVE))
    host.run()
    for _ in range(8):
        host.submit(0, make_command(AdminOpcode.KEEP_ALIVE))
    aers = [host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST)) for _ in range(2)]
    host.run()
    done = host.reap(0)  # rings the new CQ head: room for the second event
    host.run()
    done += host.reap(0)
    assert len(done) == 16
    events = {c.cid: c.dw0 & 0x7 for c in done[14:]}
    assert events == {aers[0].cid: AsyncEventType.ERROR, aers[1].cid: AsyncEventType.NOTICE}

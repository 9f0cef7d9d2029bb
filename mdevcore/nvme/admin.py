"""Admin command set: one function per opcode, each checking every field it uses.

A handler returns the completion's DW0 (or ``HELD`` for an Asynchronous
Event Request that completes later) and raises ``NvmeError`` to fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from mdevcore.nvme import identify, logpages, shadow
from mdevcore.nvme.context import ControllerContext
from mdevcore.nvme.features import DEFAULT_ARBITRATION
from mdevcore.nvme.prp import translate, write_guest
from mdevcore.nvme.queues import HELD, Command, CompletionQueue, SubmissionQueue
from mdevcore.nvme.spec import (
    BROADCAST_NSID,
    CC_IOCQES_MASK,
    CC_IOCQES_SHIFT,
    CC_IOSQES_MASK,
    CC_IOSQES_SHIFT,
    CQES_LOG2,
    SQES_LOG2,
    AdminOpcode,
    Cns,
    CommandSpecific,
    FeatureId,
    Generic,
    LogId,
    NvmeError,
    generic,
    specific,
)

log = logging.getLogger(__name__)

Handler = Callable[["ControllerContext", Command], object]


def execute(ctrl: ControllerContext, cmd: Command) -> object:
    handler = _HANDLERS.get(cmd.opcode)
    if handler is None:
        raise generic(Generic.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
    return handler(ctrl, cmd)


# --- queues ---------------------------------------------------------------


def _check_new_queue(
    ctrl: ControllerContext, cmd: Command, existing: Mapping[int, object], limit: int
) -> tuple[int, int]:
    qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    if qid == 0 or qid > limit or qid in existing:
        raise specific(CommandSpecific.INVALID_QUEUE_ID, f"queue id {qid}")
    if size < 2 or size > ctrl.config.max_queue_entries:
        raise specific(CommandSpecific.INVALID_QUEUE_SIZE, f"queue size {size}")
    if cmd.prp1 & (ctrl.page_size - 1):
        raise generic(Generic.PRP_OFFSET_INVALID, f"queue base {cmd.prp1:#x} not page aligned")
    if not cmd.cdw11 & 1:
        # CAP.CQR: only physically contiguous queues
        raise generic(Generic.INVALID_FIELD, "PC bit clear")
    return qid, size


def create_io_cq(ctrl: ControllerContext, cmd: Command) -> int:
    if (ctrl.cc >> CC_IOCQES_SHIFT & CC_IOCQES_MASK) != CQES_LOG2:
        raise generic(Generic.INVALID_FIELD, "CC.IOCQES is not 16 bytes")
    qid, size = _check_new_queue(ctrl, cmd, ctrl.cqs, ctrl.features.cq_allocated)
    vector = cmd.cdw11 >> 16
    if vector >= ctrl.irq_vectors():
        raise specific(CommandSpecific.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    cq = CompletionQueue(qid, cmd.prp1, size, vector=vector, irq_enabled=bool(cmd.cdw11 & 2))
    # Publish first: if the EventIdx page is gone the command fails with no queue made.
    if ctrl.shadow is not None:
        ctrl.shadow.publish_cq(ctrl.dma, cq, level_irq=ctrl.level_irq())
    ctrl.cqs[qid] = cq
    ctrl.doorbells[2 * qid + 1] = 0
    ctrl.features.queues_set_locked = True
    return 0


def create_io_sq(ctrl: ControllerContext, cmd: Command) -> int:
    if (ctrl.cc >> CC_IOSQES_SHIFT & CC_IOSQES_MASK) != SQES_LOG2:
        raise generic(Generic.INVALID_FIELD, "CC.IOSQES is not 64 bytes")
    cqid = cmd.cdw11 >> 16
    if cqid == 0 or cqid not in ctrl.cqs:
        raise specific(CommandSpecific.INVALID_CQ, f"completion queue {cqid}")
    qid, size = _check_new_queue(ctrl, cmd, ctrl.sqs, ctrl.features.sq_allocated)
    sq = SubmissionQueue(qid, cmd.prp1, size, cqid=cqid)
    if ctrl.shadow is not None:
        ctrl.shadow.publish_sq(ctrl.dma, sq)  # first, as for CQs
    ctrl.sqs[qid] = sq
    ctrl.cqs[cqid].sqids.add(qid)
    ctrl.doorbells[2 * qid] = 0
    ctrl.features.queues_set_locked = True
    return 0


def delete_io_sq(ctrl: ControllerContext, cmd: Command) -> int:
    qid = cmd.cdw10 & 0xFFFF
    sq = ctrl.sqs.get(qid)
    if qid == 0 or sq is None:
        raise specific(CommandSpecific.INVALID_QUEUE_ID, f"delete SQ {qid}")
    # Commands execute to completion as they are fetched: none is outstanding here.
    del ctrl.sqs[qid]
    ctrl.doorbells[2 * qid] = 0  # polled doorbells: a stale tail is no ring of a missing SQ
    cq = ctrl.cqs.get(sq.cqid)
    if cq is not None:
        cq.sqids.discard(qid)
    return 0


def delete_io_cq(ctrl: ControllerContext, cmd: Command) -> int:
    qid = cmd.cdw10 & 0xFFFF
    cq = ctrl.cqs.get(qid)
    if qid == 0 or cq is None:
        raise specific(CommandSpecific.INVALID_QUEUE_ID, f"delete CQ {qid}")
    if cq.sqids:
        raise specific(
            CommandSpecific.INVALID_QUEUE_DELETION, f"CQ {qid} still used by SQs {sorted(cq.sqids)}"
        )
    del ctrl.cqs[qid]
    ctrl.doorbells[2 * qid + 1] = 0
    return 0


# --- identify ---------------------------------------------------------------


def identify_cmd(ctrl: ControllerContext, cmd: Command) -> int:
    cns = cmd.cdw10 & 0xFF
    nsids = list(range(1, len(ctrl.namespaces) + 1))
    if cns == Cns.CONTROLLER:
        data = identify.identify_controller(ctrl.config, len(ctrl.namespaces))
    elif cns == Cns.NAMESPACE:
        data = identify.identify_namespace(ctrl.require_namespace(cmd.nsid))
    elif cns == Cns.ACTIVE_NS_LIST:
        if cmd.nsid >= 0xFFFFFFFE:
            raise generic(Generic.INVALID_NAMESPACE, f"active list after {cmd.nsid:#x}")
        data = identify.active_namespace_list(nsids, cmd.nsid)
    elif cns == Cns.NS_DESCRIPTORS:
        data = identify.namespace_descriptors(ctrl.require_namespace(cmd.nsid))
    else:
        raise generic(Generic.INVALID_FIELD, f"CNS {cns:#x}")
    write_guest(ctrl.dma, cmd.prp1, cmd.prp2, data, ctrl.page_size)
    return 0


# --- features -------------------------------------------------------------

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
CAPABILITY_CHANGEABLE = 1 << 2


def _feature_value(ctrl: ControllerContext, fid: int, cdw11: int, *, default: bool) -> int:
    feats, irq = ctrl.features, ctrl.irq
    if fid == FeatureId.ARBITRATION:
        return DEFAULT_ARBITRATION if default else feats.arbitration
    if fid == FeatureId.VOLATILE_WRITE_CACHE:
        return 1 if default else int(all(ns.write_cache for ns in ctrl.namespaces))
    if fid == FeatureId.NUMBER_OF_QUEUES:
        n = ctrl.config.max_io_queues
        sq, cq = (n, n) if default else (feats.sq_allocated, feats.cq_allocated)
        return (cq - 1) << 16 | (sq - 1)
    if fid == FeatureId.INTERRUPT_COALESCING:
        return 0 if default else irq.time_100us << 8 | irq.threshold
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
        vector = cdw11 & 0xFFFF
        if vector >= ctrl.irq_vectors():
            raise generic(Generic.INVALID_FIELD, f"vector {vector}")
        disabled = not default and vector in irq.coalescing_disabled
        return vector | int(disabled) << 16
    if fid == FeatureId.ASYNC_EVENT_CONFIG:
        return 0 if default else ctrl.events.config
    if fid == FeatureId.KEEP_ALIVE_TIMER:
        return 0 if default else feats.keep_alive_ms
    raise generic(Generic.INVALID_FIELD, f"feature {fid:#x}")


def get_features(ctrl: ControllerContext, cmd: Command) -> int:
    fid, sel = cmd.cdw10 & 0xFF, cmd.cdw10 >> 8 & 0x7
    if sel > SEL_CAPABILITIES:
        raise generic(Generic.INVALID_FIELD, f"SEL {sel}")
    value = _feature_value(ctrl, fid, cmd.cdw11, default=sel in (SEL_DEFAULT, SEL_SAVED))
    return CAPABILITY_CHANGEABLE if sel == SEL_CAPABILITIES else value


def set_features(ctrl: ControllerContext, cmd: Command) -> int:
    fid, save = cmd.cdw10 & 0xFF, cmd.cdw10 >> 31
    _feature_value(ctrl, fid, cmd.cdw11, default=True)  # unknown FID / bad vector -> Invalid Field
    if save:
        raise specific(CommandSpecific.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
    value, feats = cmd.cdw11, ctrl.features
    if fid == FeatureId.ARBITRATION:
        feats.arbitration = value
    elif fid == FeatureId.VOLATILE_WRITE_CACHE:
        for ns in ctrl.namespaces:
            if ns.write_cache and not value & 1:
                ns.flush()  # turning the cache off must not lose what it held
            ns.write_cache = bool(value & 1)
    elif fid == FeatureId.NUMBER_OF_QUEUES:
        nsqr, ncqr = value & 0xFFFF, value >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            raise generic(Generic.INVALID_FIELD, "65536 queues requested")
        if feats.queues_set_locked:
            raise generic(Generic.COMMAND_SEQUENCE_ERROR, "I/O queues already created")
        limit = ctrl.config.max_io_queues
        feats.sq_allocated, feats.cq_allocated = min(nsqr + 1, limit), min(ncqr + 1, limit)
    elif fid == FeatureId.INTERRUPT_COALESCING:
        ctrl.irq.threshold, ctrl.irq.time_100us = value & 0xFF, value >> 8 & 0xFF
    elif fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
        vector = value & 0xFFFF
        if value >> 16 & 1:
            ctrl.irq.coalescing_disabled.add(vector)
        else:
            ctrl.irq.coalescing_disabled.discard(vector)
    elif fid == FeatureId.ASYNC_EVENT_CONFIG:
        ctrl.events.config = value
    elif fid == FeatureId.KEEP_ALIVE_TIMER:
        # KATO rounds up to the keep-alive granularity (KAS, 100 ms units)
        granule = ctrl.config.kas * 100
        feats.keep_alive_ms = -(-value // granule) * granule if value else 0
        ctrl.last_keep_alive = ctrl.clock()
    return (
        _feature_value(ctrl, fid, cmd.cdw11, default=False)
        if fid == FeatureId.NUMBER_OF_QUEUES
        else 0
    )


# --- log pages --------------------------------------------------------------


def get_log_page(ctrl: ControllerContext, cmd: Command) -> int:
    lid, rae = cmd.cdw10 & 0xFF, cmd.cdw10 >> 15 & 1
    numd = ((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1
    offset = cmd.cdw13 << 32 | cmd.cdw12
    length = numd * 4
    if lid == LogId.ERROR_INFO:
        page = ctrl.error_log.page()
    elif lid == LogId.SMART:
        if cmd.nsid not in (0, BROADCAST_NSID):
            raise generic(Generic.INVALID_FIELD, "per-namespace SMART not supported")
        page = ctrl.smart.page(ctrl.error_log.count)
    elif lid == LogId.FIRMWARE_SLOT:
        page = logpages.firmware_slot_page(ctrl.config.firmware)
    else:
        raise specific(CommandSpecific.INVALID_LOG_PAGE, f"log {lid:#x}")
    if offset % 4 or offset > len(page):
        raise generic(Generic.INVALID_FIELD, f"log offset {offset}")
    if length > ctrl.config.max_transfer:
        raise generic(Generic.INVALID_FIELD, f"log length {length}")
    data = page[offset : offset + length].ljust(length, b"\0")
    write_guest(ctrl.dma, cmd.prp1, cmd.prp2, data, ctrl.page_size)
    if not rae:
        ctrl.events.log_read(lid)
    return 0


# --- events, abort, keep alive ------------------------------------------------


def async_event_request(ctrl: ControllerContext, cmd: Command) -> object:
    if len(ctrl.events.requests) > ctrl.config.aerl:
        raise specific(CommandSpecific.AER_LIMIT_EXCEEDED, "too many AERs")
    ctrl.events.requests.append(cmd.cid)
    return HELD


def abort(ctrl: ControllerContext, cmd: Command) -> int:
    sqid, cid = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
    # Only held AERs are ever outstanding; everything else already completed.
    if sqid == 0 and cid in ctrl.events.requests:
        ctrl.events.requests.remove(cid)
        admin_sq = ctrl.sqs[0]
        err = generic(Generic.ABORT_REQUESTED, "aborted")
        ctrl.complete(admin_sq, cid, err.status)
        return 0
    return 1  # DW0 bit 0: command not aborted


def doorbell_buffer_config(ctrl: ControllerContext, cmd: Command) -> int:
    if not ctrl.config.shadow_doorbells:
        raise generic(Generic.INVALID_OPCODE, "shadow doorbells not offered")
    for what, addr in (("shadow doorbell", cmd.prp1), ("EventIdx", cmd.prp2)):
        if not addr or addr & (ctrl.page_size - 1):
            raise generic(Generic.INVALID_FIELD, f"{what} buffer {addr:#x} not page aligned")
        translate(ctrl.dma, addr, shadow.PAGE, what == "EventIdx").release()
    ctrl.shadow = shadow.ShadowDoorbells(cmd.prp1, cmd.prp2)
    # Queues that exist already: their shadow values are the host's from now on.
    for sq in ctrl.sqs.values():
        if sq.qid:
            ctrl.shadow.publish_sq(ctrl.dma, sq)
    for cq in ctrl.cqs.values():
        if cq.qid:
            ctrl.shadow.publish_cq(ctrl.dma, cq, level_irq=ctrl.level_irq())
    return 0


def keep_alive(ctrl: ControllerContext, cmd: Command) -> int:
    ctrl.last_keep_alive = ctrl.clock()
    return 0


_HANDLERS: dict[int, Handler] = {
    AdminOpcode.DELETE_IO_SQ: delete_io_sq,
    AdminOpcode.CREATE_IO_SQ: create_io_sq,
    AdminOpcode.GET_LOG_PAGE: get_log_page,
    AdminOpcode.DELETE_IO_CQ: delete_io_cq,
    AdminOpcode.CREATE_IO_CQ: create_io_cq,
    AdminOpcode.IDENTIFY: identify_cmd,
    AdminOpcode.ABORT: abort,
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
    AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    AdminOpcode.KEEP_ALIVE: keep_alive,
    AdminOpcode.DOORBELL_BUFFER_CONFIG: doorbell_buffer_config,
}

__all__ = ["execute", "NvmeError"]

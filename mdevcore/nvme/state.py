"""Controller state as plain data, for live migration.

``snapshot`` captures everything a stopped controller needs to continue
elsewhere: the limits the host was shown (the destination refuses to differ),
registers, queues with their heads/tails/phases, the doorbells
it has not acted on yet, features, held AERs and queued events, the error
log and SMART counters.  Namespace *data* is not included: the backing file
is shared storage, as with pds VFs.

After ``restore`` the owner calls ``NvmeController.kick_interrupts`` once
interrupts can be delivered again (the source may have stopped between
posting a completion and its interrupt).

``restore`` trusts nothing: the blob comes from a migration stream a
compromised source could craft, so every number is range-checked against
this controller's configuration before anything changes.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from mdevcore.nvme.logpages import AsyncEvent, ErrorEntry
from mdevcore.nvme.queues import CompletionQueue, SubmissionQueue
from mdevcore.nvme.shadow import ShadowDoorbells
from mdevcore.nvme.spec import CSTS_RDY, AsyncEventType

if TYPE_CHECKING:
    from mdevcore.nvme.controller import NvmeController

STATE_VERSION = 2  # 2: limits
_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


def snapshot(ctrl: NvmeController) -> dict[str, Any]:
    used = [2 * q for q in ctrl.sqs] + [2 * q + 1 for q in ctrl.cqs]
    return {
        "version": STATE_VERSION,
        "limits": _limits(ctrl),
        "namespaces": [[ns.nlbas, ns.lba_size, ns.write_cache] for ns in ctrl.namespaces],
        "regs": [ctrl.cc, ctrl.csts, ctrl.aqa, ctrl.asq, ctrl.acq, ctrl.page_size],
        "irq": {
            "mask": ctrl.irq.mask,
            "threshold": ctrl.irq.threshold,
            "time": ctrl.irq.time_100us,
            "no_coalescing": sorted(ctrl.irq.coalescing_disabled),
        },
        "features": [
            ctrl.features.arbitration,
            ctrl.features.sq_allocated,
            ctrl.features.cq_allocated,
            ctrl.features.queues_set_locked,
            ctrl.features.keep_alive_ms,
        ],
        "sqs": [[sq.qid, sq.base, sq.size, sq.cqid, sq.head, sq.tail] for sq in ctrl.sqs.values()],
        "cqs": [
            [
                cq.qid,
                cq.base,
                cq.size,
                cq.vector,
                cq.irq_enabled,
                cq.head,
                cq.tail,
                cq.phase,
                [list(entry) for entry in cq.overflow],
            ]
            for cq in ctrl.cqs.values()
        ],  # fmt: skip
        "doorbells": {str(i): ctrl.doorbells[i] for i in sorted(used)},
        "shadow": [ctrl.shadow.doorbells, ctrl.shadow.eventidx] if ctrl.shadow else None,
        "events": {
            "requests": list(ctrl.events.requests),
            "queued": [[int(e.type), e.info, e.log_id] for e in ctrl.events.queued],
            "masked": sorted(int(t) for t in ctrl.events.masked),
            "config": ctrl.events.config,
        },
        "errors": [ctrl.error_log.count]
        + [
            [e.count, e.sqid, e.cid, e.status, e.lba, e.nsid]
            for e in reversed(ctrl.error_log.entries)
        ],
        "smart": [
            ctrl.smart.bytes_read,
            ctrl.smart.bytes_written,
            ctrl.smart.read_commands,
            ctrl.smart.write_commands,
        ],
    }


def _limits(ctrl: NvmeController) -> list[int]:
    """The controller limits a host has read (CAP, Identify): both ends must agree."""
    cfg = ctrl.config
    return [cfg.max_io_queues, cfg.max_queue_entries, cfg.mdts, cfg.aerl, cfg.acl]


class _Bad(ValueError):
    pass


def _int(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Bad(f"{what}: {value!r} not in {low}..{high}")
    return value


def _list(value: Any, length: int | None, what: str) -> list[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise _Bad(f"{what}: expected a list of {length}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what}: expected an object")
    return value


def restore(ctrl: NvmeController, state: Any) -> None:
    """Replace ``ctrl``'s state with ``state``; OSError(EINVAL) if it does not fit."""
    try:
        _restore(ctrl, _dict(state, "state"))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise OSError(errno.EINVAL, f"NVMe controller state rejected: {exc}") from None


def _restore(ctrl: NvmeController, state: dict[str, Any]) -> None:
    cfg = ctrl.config
    if state.get("version") != STATE_VERSION:
        raise _Bad(f"version {state.get('version')!r}")
    if state.get("limits") != _limits(ctrl):
        raise _Bad(f"controller limits {state.get('limits')!r} != {_limits(ctrl)}")
    namespaces = _list(state["namespaces"], len(ctrl.namespaces), "namespaces")
    caches = []
    for ns, saved in zip(ctrl.namespaces, namespaces, strict=True):
        nlbas, lba_size, cache = _list(saved, 3, "namespace")
        if nlbas != ns.nlbas or lba_size != ns.lba_size:
            raise _Bad(f"namespace geometry {nlbas}x{lba_size} != {ns.nlbas}x{ns.lba_size}")
        caches.append(bool(cache))
    cc, csts, aqa, asq, acq, page_size = _list(state["regs"], 6, "regs")
    regs = [_int(v, 0, _U32, "register") for v in (cc, csts, aqa)]
    asq, acq = _int(asq, 0, _U64, "ASQ"), _int(acq, 0, _U64, "ACQ")
    if page_size not in [4096 << n for n in range(5)]:
        raise _Bad(f"page size {page_size!r}")
    irq = _dict(state["irq"], "irq")
    mask = _int(irq["mask"], 0, _U32, "INTMS")
    threshold = _int(irq["threshold"], 0, 255, "THR")
    time_100us = _int(irq["time"], 0, 255, "TIME")
    vectors = ctrl.irq_vectors()
    no_coalescing = {_int(v, 0, _U16, "vector") for v in _list(irq["no_coalescing"], None, "iv")}
    arbitration, sq_alloc, cq_alloc, locked, kato = _list(state["features"], 5, "features")
    features = (
        _int(arbitration, 0, _U32, "arbitration"),
        _int(sq_alloc, 1, cfg.max_io_queues, "SQs allocated"),
        _int(cq_alloc, 1, cfg.max_io_queues, "CQs allocated"),
        bool(locked),
        _int(kato, 0, _U32, "KATO"),
    )

    cqs: dict[int, CompletionQueue] = {}
    for raw in _list(state["cqs"], None, "cqs"):
        qid, base, size, vector, ien, head, tail, phase, overflow = _list(raw, 9, "cq")
        limit = features[2] if qid else 0
        qid = _int(qid, 0, limit, "CQ id")
        size = _int(size, 2, cfg.max_queue_entries if qid else 4096, "CQ size")
        cq = CompletionQueue(
            qid,
            _int(base, 0, _U64, "CQ base"),
            size,
            vector=_int(vector, 0, max(vectors, 1) - 1, "CQ vector"),
            irq_enabled=bool(ien),
            head=_int(head, 0, size - 1, "CQ head"),
            tail=_int(tail, 0, size - 1, "CQ tail"),
            phase=_int(phase, 0, 1, "CQ phase"),
        )
        for entry in _list(overflow, None, "overflow")[: cfg.max_queue_entries]:
            dw0, sqhd, sqid, cid, status = _list(entry, 5, "overflow entry")
            cq.overflow.append(
                (
                    _int(dw0, 0, _U32, "dw0"),
                    _int(sqhd, 0, _U16, "sqhd"),
                    _int(sqid, 0, _U16, "sqid"),
                    _int(cid, 0, _U16, "cid"),
                    _int(status, 0, 0x7FFF, "status"),
                )
            )
        if qid in cqs:
            raise _Bad(f"CQ {qid} twice")
        cqs[qid] = cq
    sqs: dict[int, SubmissionQueue] = {}
    for raw in _list(state["sqs"], None, "sqs"):
        qid, base, size, cqid, head, tail = _list(raw, 6, "sq")
        qid = _int(qid, 0, features[1] if qid else 0, "SQ id")
        size = _int(size, 2, cfg.max_queue_entries if qid else 4096, "SQ size")
        cqid = _int(cqid, 0, _U16, "SQ cqid")
        if cqid not in cqs or (cqid == 0) != (qid == 0) or qid in sqs:
            raise _Bad(f"SQ {qid} -> CQ {cqid}")
        sqs[qid] = SubmissionQueue(
            qid,
            _int(base, 0, _U64, "SQ base"),
            size,
            cqid=cqid,
            head=_int(head, 0, size - 1, "SQ head"),
            tail=_int(tail, 0, size - 1, "SQ tail"),
        )
        cqs[cqid].sqids.add(qid)
    if bool(regs[1] & CSTS_RDY) != (0 in sqs and 0 in cqs):
        raise _Bad("ready controller without admin queues (or the reverse)")
    doorbells = {}
    for key, value in _dict(state["doorbells"], "doorbells").items():
        index = _int(int(key), 0, 2 * cfg.max_io_queues + 1, "doorbell index")
        doorbells[index] = _int(value, 0, _U32, "doorbell")

    shadow = None
    if state.get("shadow") is not None:
        dbs, eventidx = _list(state["shadow"], 2, "shadow")
        shadow = ShadowDoorbells(_int(dbs, 1, _U64, "shadow"), _int(eventidx, 1, _U64, "eventidx"))

    events = _dict(state["events"], "events")
    requests = [_int(c, 0, _U16, "AER cid") for c in _list(events["requests"], None, "aers")]
    if len(requests) > cfg.aerl + 1:
        raise _Bad("too many held AERs")
    queued = []
    for raw in _list(events["queued"], None, "queued")[:256]:
        etype, info, lid = _list(raw, 3, "event")
        queued.append(
            AsyncEvent(AsyncEventType(_int(etype, 0, 2, "event type")), _int(info, 0, 255, "info"),
                       _int(lid, 0, 255, "log id"))
        )  # fmt: skip
    masked = {AsyncEventType(_int(t, 0, 2, "masked")) for t in _list(events["masked"], None, "m")}
    event_config = _int(events["config"], 0, _U32, "AEC")
    errors = _list(state["errors"], None, "errors")
    error_count = _int(errors[0], 0, _U64, "error count")
    error_entries = [
        ErrorEntry(*(_int(v, 0, _U64, "error entry") for v in _list(e, 6, "error entry")))
        for e in errors[1 : 1 + cfg.error_log_entries]
    ]
    smart = [_int(v, 0, _U64, "SMART") for v in _list(state["smart"], 4, "smart")]

    # Everything checked: apply.
    ctrl.reset()
    for ns, cache in zip(ctrl.namespaces, caches, strict=True):
        ns.write_cache = cache
    ctrl.cc, ctrl.csts, ctrl.aqa = regs
    ctrl.asq, ctrl.acq, ctrl.page_size = asq, acq, page_size
    ctrl.irq.mask, ctrl.irq.threshold, ctrl.irq.time_100us = mask, threshold, time_100us
    ctrl.irq.coalescing_disabled = no_coalescing
    f = ctrl.features
    f.arbitration, f.sq_allocated, f.cq_allocated, f.queues_set_locked, f.keep_alive_ms = features
    ctrl.sqs, ctrl.cqs = sqs, cqs
    ctrl.shadow = shadow
    for index, value in doorbells.items():
        ctrl.doorbells[index] = value
    ctrl.events.requests.extend(requests)
    ctrl.events.queued.extend(queued)
    ctrl.events.masked = masked
    ctrl.events.config = event_config
    ctrl.error_log.count = error_count
    # Saved oldest first; the log keeps the newest at the left.  Clear it
    # first: a controller reset keeps the error log.
    ctrl.error_log.entries.clear()
    for entry in error_entries:
        ctrl.error_log.entries.appendleft(entry)
    (ctrl.smart.bytes_read, ctrl.smart.bytes_written, ctrl.smart.read_commands,
     ctrl.smart.write_commands) = smart  # fmt: skip
    ctrl.last_keep_alive = ctrl.clock()

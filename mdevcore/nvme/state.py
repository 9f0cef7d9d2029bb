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
this controller's configuration before anything changes.  Each component
(queues, interrupts, features, events, logs, shadow doorbells) snapshots
and checks its own part; this module only composes them and applies the
result once every part has passed.
"""

from __future__ import annotations

import errno
from typing import Any

from mdevcore.nvme.checks import U32, U64, Invalid, dict_of, int_in, list_of
from mdevcore.nvme.context import ControllerContext
from mdevcore.nvme.queues import CompletionQueue, SubmissionQueue
from mdevcore.nvme.shadow import ShadowDoorbells
from mdevcore.nvme.spec import CSTS_RDY

STATE_VERSION = 2  # 2: limits


def snapshot(ctrl: ControllerContext) -> dict[str, Any]:
    used = [2 * q for q in ctrl.sqs] + [2 * q + 1 for q in ctrl.cqs]
    return {
        "version": STATE_VERSION,
        "limits": _limits(ctrl),
        "namespaces": [[ns.nlbas, ns.lba_size, ns.write_cache] for ns in ctrl.namespaces],
        "regs": [ctrl.cc, ctrl.csts, ctrl.aqa, ctrl.asq, ctrl.acq, ctrl.page_size],
        "irq": ctrl.irq.snapshot(),
        "features": ctrl.features.snapshot(),
        "sqs": [sq.snapshot() for sq in ctrl.sqs.values()],
        "cqs": [cq.snapshot() for cq in ctrl.cqs.values()],
        "doorbells": {str(i): ctrl.doorbells[i] for i in sorted(used)},
        "shadow": ctrl.shadow.snapshot() if ctrl.shadow else None,
        "events": ctrl.events.snapshot(),
        "errors": ctrl.error_log.snapshot(),
        "smart": ctrl.smart.snapshot(),
    }


def _limits(ctrl: ControllerContext) -> list[int]:
    """The controller limits a host has read (CAP, Identify): both ends must agree."""
    cfg = ctrl.config
    return [cfg.max_io_queues, cfg.max_queue_entries, cfg.mdts, cfg.aerl, cfg.acl]


def restore(ctrl: ControllerContext, state: Any) -> None:
    """Replace ``ctrl``'s state with ``state``; OSError(EINVAL) if it does not fit."""
    try:
        _restore(ctrl, dict_of(state, "state"))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise OSError(errno.EINVAL, f"NVMe controller state rejected: {exc}") from None


def _restore(ctrl: ControllerContext, state: dict[str, Any]) -> None:
    cfg = ctrl.config
    if state.get("version") != STATE_VERSION:
        raise Invalid(f"version {state.get('version')!r}")
    if state.get("limits") != _limits(ctrl):
        raise Invalid(f"controller limits {state.get('limits')!r} != {_limits(ctrl)}")
    namespaces = list_of(state["namespaces"], len(ctrl.namespaces), "namespaces")
    caches = []
    for ns, saved in zip(ctrl.namespaces, namespaces, strict=True):
        nlbas, lba_size, cache = list_of(saved, 3, "namespace")
        if nlbas != ns.nlbas or lba_size != ns.lba_size:
            raise Invalid(f"namespace geometry {nlbas}x{lba_size} != {ns.nlbas}x{ns.lba_size}")
        caches.append(bool(cache))
    cc, csts, aqa, asq, acq, page_size = list_of(state["regs"], 6, "regs")
    regs = [int_in(v, 0, U32, "register") for v in (cc, csts, aqa)]
    asq, acq = int_in(asq, 0, U64, "ASQ"), int_in(acq, 0, U64, "ACQ")
    if page_size not in [4096 << n for n in range(5)]:
        raise Invalid(f"page size {page_size!r}")
    irq = ctrl.irq.check_snapshot(state["irq"])
    features = ctrl.features.check_snapshot(state["features"])
    _, sq_allocated, cq_allocated, _, _ = features

    cqs: dict[int, CompletionQueue] = {}
    for raw in list_of(state["cqs"], None, "cqs"):
        cq = CompletionQueue.from_snapshot(
            raw, max_qid=cq_allocated, max_entries=cfg.max_queue_entries, vectors=ctrl.irq_vectors()
        )
        if cq.qid in cqs:
            raise Invalid(f"CQ {cq.qid} twice")
        cqs[cq.qid] = cq
    sqs: dict[int, SubmissionQueue] = {}
    for raw in list_of(state["sqs"], None, "sqs"):
        sq = SubmissionQueue.from_snapshot(
            raw, max_qid=sq_allocated, max_entries=cfg.max_queue_entries
        )
        if sq.cqid not in cqs or (sq.cqid == 0) != (sq.qid == 0) or sq.qid in sqs:
            raise Invalid(f"SQ {sq.qid} -> CQ {sq.cqid}")
        sqs[sq.qid] = sq
        cqs[sq.cqid].sqids.add(sq.qid)
    if bool(regs[1] & CSTS_RDY) != (0 in sqs and 0 in cqs):
        raise Invalid("ready controller without admin queues (or the reverse)")
    doorbells = {}
    for key, value in dict_of(state["doorbells"], "doorbells").items():
        index = int_in(int(key), 0, 2 * cfg.max_io_queues + 1, "doorbell index")
        doorbells[index] = int_in(value, 0, U32, "doorbell")
    saved_shadow = state.get("shadow")
    shadow = None if saved_shadow is None else ShadowDoorbells.from_snapshot(saved_shadow)
    events = ctrl.events.check_snapshot(state["events"], cfg.aerl)
    errors = ctrl.error_log.check_snapshot(state["errors"])
    smart = ctrl.smart.check_snapshot(state["smart"])

    # Everything checked: apply.
    ctrl.reset()
    for ns, cache in zip(ctrl.namespaces, caches, strict=True):
        ns.write_cache = cache
    ctrl.cc, ctrl.csts, ctrl.aqa = regs
    ctrl.asq, ctrl.acq, ctrl.page_size = asq, acq, page_size
    ctrl.irq.load(irq)
    ctrl.features.load(features)
    ctrl.sqs, ctrl.cqs = sqs, cqs
    ctrl.shadow = shadow
    for index, value in doorbells.items():
        ctrl.doorbells[index] = value
    ctrl.events.load(events)
    ctrl.error_log.load(errors)
    ctrl.smart.load(smart)
    ctrl.last_keep_alive = ctrl.clock()

"""The vfio-user connection engine: bytes and fds in, backend calls, bytes out.

No sockets here (h11 style).  The server feeds what it received with
``receive_data`` and calls ``process``; the engine parses every whole
message, calls the backend once per request, queues replies, and reports
replies to the server's own DMA_READ/DMA_WRITE requests as ``DmaResult``
events.  ``outgoing`` hands back what to send, split so that a message
carrying fds always starts its own sendmsg (the receiver binds fds to the
first byte of a sendmsg).

The client is untrusted.  Structure (sizes, argsz, flags, fd counts) is
checked here; device knowledge (index, offset, overlap) is the backend's,
which raises OSError(errno).  Nothing raised by a backend escapes: an
OSError becomes its errno, anything else is logged and answered EIO.
A message that cannot be framed (msg_size < 16 or too big) or a failed
VERSION negotiation ends the connection (``closed`` becomes true).

Everything a client can provoke is counted and logged through the
device's :class:`~mdevcore.vfio_user.stats.DeviceStats` (rate-limited),
never straight to the logger: a flood of bad requests costs counters, not
disk.  ``process(limit)`` handles at most ``limit`` messages, so the
server can let other devices run between turns.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mdevcore.vfio_user import wire
from mdevcore.vfio_user.backend import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    REGION_FLAG_MMAP,
    DeviceBackend,
    DmaMapping,
)
from mdevcore.vfio_user.constants import (
    DMA_MAP_FLAG_FILE_IO,
    DMA_MAP_FLAG_MMAP,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_REPLY,
    FLAG_TYPE_MASK,
    HEADER_SIZE,
    MSG_SIZE_SLACK,
    SERVER_MAX_DATA_XFER_SIZE,
    SERVER_MAX_MSG_FDS,
    VERSION_MAJOR,
    VERSION_MINOR,
    WRITE_MULTI_DATA_SIZE,
    WRITE_MULTI_MAX,
    Command,
)
from mdevcore.vfio_user.negotiate import (
    ClientCaps,
    VersionError,
    caps_from_json,
    parse_version_json,
    server_caps_json,
)
from mdevcore.vfio_user.stats import DeviceStats, failure_kind
from mdevcore.vfio_user.validate import check_device_feature, check_set_irqs
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS, RawMessage

_DMA_MAP_KNOWN = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE | DMA_MAP_FLAG_MMAP | DMA_MAP_FLAG_FILE_IO


class RequestError(Exception):
    """A request fails with ``errno``; ``close`` also ends the connection."""

    def __init__(self, errno_value: int, why: str, *, close: bool = False) -> None:
        super().__init__(why)
        self.errno = errno_value
        self.close = close


@dataclasses.dataclass(frozen=True, slots=True)
class DmaResult:
    """The client answered our DMA_READ/DMA_WRITE ``msg_id``.

    ``error`` is 0 on success; ``data`` is what a DMA_READ returned.
    """

    msg_id: int
    error: int
    data: bytes = b""


def _bad(why: str) -> RequestError:
    return RequestError(errno.EINVAL, why)


def _fixed_request(p: bytes, layout: Any, size: int, what: str) -> Any:
    """Parse the fixed part of a control request whose argsz must cover it."""
    if len(p) < size:
        raise _bad(f"{what} body too short")
    req = layout.parse(p[:size])
    if req.argsz < size:
        raise _bad(f"{what} argsz {req.argsz}")
    return req


_Handler = Callable[["Connection", RawMessage], tuple[bytes, Sequence[int]]]


class Connection:
    """One client connection's protocol state (sans-IO).

    ``name`` says which device and client in every log line; ``stats`` is
    the device's (shared by its successive connections), a private one if
    not given.  ``handled`` counts the messages processed, ``replies`` the
    ones among them that were replies (to our DMA requests).
    """

    def __init__(
        self,
        backend: DeviceBackend,
        *,
        name: str = "vfio-user",
        max_data_xfer_size: int = SERVER_MAX_DATA_XFER_SIZE,
        stats: DeviceStats | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.stats = stats if stats is not None else DeviceStats(name)
        self.handled = 0
        self.replies = 0
        self.stats.attach(self)
        self.max_data_xfer_size = max_data_xfer_size
        self.framer = wire.Framer(max_data_xfer_size + MSG_SIZE_SLACK)
        self.negotiated = False
        self.client_caps = ClientCaps()
        self.closed = False
        self.close_reason = ""
        # Output: segments of (buffers, fds); a segment with fds starts with
        # the message those fds belong to.
        self._out: list[tuple[list[bytes], list[int]]] = []
        self._next_dma_id = 0
        self._dma_pending: dict[int, tuple[int, int, int]] = {}  # id -> cmd, addr, count

    # --- input ----------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        if self.closed:
            wire.close_fds(fds)
            return
        self.framer.feed(data, fds)

    def process(self, limit: int = 0) -> list[DmaResult]:
        """Handle the whole messages buffered, at most ``limit`` (0: all).

        Returns the DMA replies seen.  If ``limit`` messages were handled
        (``handled`` grew by ``limit``), whole messages may be left: call again.
        """
        results: list[DmaResult] = []
        framer = self.framer
        budget = limit or 1 << 62
        handled = 0
        while handled < budget and not self.closed:
            if self.negotiated and not framer.holds_fds:
                handled += self._fast_region_accesses(budget - handled)
                if handled >= budget:
                    break
            try:
                msg = framer.next_message()
            except wire.FramingError as e:
                self._close(str(e))
                break
            if msg is None:
                break
            handled += 1
            try:
                if msg.flags & FLAG_TYPE_MASK == FLAG_REPLY:
                    self.replies += 1
                    result = self._on_reply(msg)
                    if result is not None:
                        results.append(result)
                else:
                    self._on_request(msg)
            finally:
                if msg.fds:
                    wire.close_fds(msg.fds)
        self.handled += handled
        return results

    def _fast_region_accesses(self, budget: int) -> int:
        """REGION_READ/WRITE straight from the buffer, the common case.

        Handles up to ``budget`` messages until one is unusual - another
        command, incomplete, odd-sized, a reply - and leaves that one to the
        general path with its full checks; returns how many it handled.  The
        device is called exactly once per message: the message is consumed
        first and a failure is answered here.
        """
        framer = self.framer
        backend = self.backend
        limit = self.max_data_xfer_size
        pack = HEADER.pack
        queue = self._queue
        done = 0
        while done < budget:
            buf, pos, avail = framer.peek()
            if avail < 32:
                return done
            msg_id, command, size, flags, _ = HEADER.unpack_from(buf, pos)
            if avail < size or flags & FLAG_TYPE_MASK:
                return done
            if command == Command.REGION_READ and size == 32:
                head = bytes(buf[pos + HEADER_SIZE : pos + 32])
                offset, region, count = REGION_ACCESS.unpack(head)
                if count > limit:
                    return done
                framer.consume(32)
                done += 1
                try:
                    data = backend.region_read(region, offset, count)
                    if len(data) != count:
                        raise OSError(errno.EIO, f"device read {len(data)} of {count} bytes")
                except Exception as e:
                    self._fast_fail(msg_id, command, flags, e)
                    continue
                if not flags & FLAG_NO_REPLY:
                    queue(pack(msg_id, command, 32 + count, FLAG_REPLY, 0) + head + data)
            elif command == Command.REGION_WRITE and size >= 32:
                offset, region, count = REGION_ACCESS.unpack_from(buf, pos + HEADER_SIZE)
                if count != size - 32 or count > limit:
                    return done
                head = bytes(buf[pos + HEADER_SIZE : pos + 32])
                data = bytes(buf[pos + 32 : pos + size])
                framer.consume(size)
                done += 1
                try:
                    backend.region_write(region, offset, data)
                except Exception as e:
                    self._fast_fail(msg_id, command, flags, e)
                    continue
                if not flags & FLAG_NO_REPLY:
                    queue(pack(msg_id, command, 32, FLAG_REPLY, 0) + head)
            else:
                return done
        return done

    def _fast_fail(self, msg_id: int, command: int, flags: int, e: Exception) -> None:
        msg = RawMessage(msg_id, command, flags, 0, b"", [])
        if isinstance(e, OSError):
            self._fail(msg, e.errno or errno.EIO, e.strerror or str(e))
        else:
            self._device_bug(msg, e)

    # --- output ---------------------------------------------------------

    def outgoing(self) -> list[tuple[list[bytes], list[int]]]:
        """Take what is queued to send: [(buffers, fds)], one sendmsg each."""
        out = self._out
        self._out = []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def _queue(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds or not self._out:
            self._out.append(([data], list(fds)))
        else:
            self._out[-1][0].append(data)

    # --- server-originated DMA -------------------------------------------

    def dma_read_request(self, address: int, count: int) -> int:
        """Queue a DMA_READ; returns the msg_id its DmaResult will carry."""
        return self._dma_request(Command.DMA_READ, address, count, b"")

    def dma_write_request(self, address: int, data: bytes) -> int:
        return self._dma_request(Command.DMA_WRITE, address, len(data), data)

    def _dma_request(self, command: int, address: int, count: int, data: bytes) -> int:
        if self.closed or not self.negotiated:
            raise OSError(errno.ENOTCONN, "no negotiated client")
        if count > self.client_caps.max_data_xfer_size:
            raise OSError(errno.E2BIG, "DMA transfer larger than the client accepts")
        if command == Command.DMA_READ and count > self.max_data_xfer_size:
            # The reply carries the data: our framer would refuse it and drop the client.
            raise OSError(errno.E2BIG, "DMA_READ reply larger than we accept")
        if not 0 <= address < 1 << 64 or address + count > 1 << 64:
            raise OSError(errno.EINVAL, "DMA address out of range")
        if len(self._dma_pending) > 0xFFFF:
            # Every msg_id is waiting for a reply: the search below would not end.
            raise OSError(errno.EBUSY, "65536 DMA requests already in flight")
        msg_id = self._next_dma_id
        while msg_id in self._dma_pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_dma_id = (msg_id + 1) & 0xFFFF
        self._dma_pending[msg_id] = (command, address, count)
        body = wire.DMA_ACCESS.pack(address, count) + data
        self._queue(HEADER.pack(msg_id, command, HEADER_SIZE + len(body), 0, 0) + body)
        return msg_id

    def _on_reply(self, msg: RawMessage) -> DmaResult | None:
        pending = self._dma_pending.pop(msg.msg_id, None)
        if pending is None or pending[0] != msg.command:
            if pending is not None:
                self._dma_pending[msg.msg_id] = pending
            self.stats.error(
                "unsolicited reply",
                "%s: unsolicited reply msg %#x cmd %d dropped",
                self.name,
                msg.msg_id,
                msg.command,
                level=logging.WARNING,
            )
            return None
        command, address, count = pending
        if msg.fds:
            self.stats.error(
                "DMA reply with fds",
                "%s: DMA reply %#x carried fds; closed",
                self.name,
                msg.msg_id,
                level=logging.WARNING,
            )
        if msg.flags & FLAG_ERROR:
            return DmaResult(msg.msg_id, msg.error or errno.EIO)
        p = msg.payload
        if len(p) < wire.DMA_ACCESS.size:
            return DmaResult(msg.msg_id, errno.EIO)
        r_addr, r_count = wire.DMA_ACCESS.unpack_from(p)
        data = p[wire.DMA_ACCESS.size :]
        if command == Command.DMA_READ:
            if r_addr != address or r_count != count or len(data) != count:
                self._reply_mismatch(msg)
                return DmaResult(msg.msg_id, errno.EIO)
            return DmaResult(msg.msg_id, 0, data)
        if r_addr != address or r_count != count:
            self._reply_mismatch(msg)
            return DmaResult(msg.msg_id, errno.EIO)
        return DmaResult(msg.msg_id, 0)

    def _reply_mismatch(self, msg: RawMessage) -> None:
        self.stats.error(
            "DMA reply mismatch",
            "%s: DMA reply %#x (cmd %d) does not match its request",
            self.name,
            msg.msg_id,
            msg.command,
            level=logging.WARNING,
        )

    def fail_pending_dma(self) -> list[DmaResult]:
        """On disconnect: every outstanding DMA request fails ENOTCONN."""
        out = [DmaResult(i, errno.ENOTCONN) for i in self._dma_pending]
        self._dma_pending.clear()
        return out

    # --- requests ---------------------------------------------------------

    def _on_request(self, msg: RawMessage) -> None:
        command = msg.command
        try:
            if not self.negotiated:
                if command != Command.VERSION:
                    raise RequestError(errno.EINVAL, "request before VERSION", close=True)
                payload, fds = self._version(msg)
            else:
                handler = _HANDLERS.get(command)
                if handler is None:
                    raise _bad(f"unknown or misdirected command {command}")
                if msg.fds and (command not in _FD_COMMANDS or len(msg.fds) > SERVER_MAX_MSG_FDS):
                    raise _bad(f"{len(msg.fds)} fds with command {command}")
                payload, fds = handler(self, msg)
        except RequestError as e:
            self._fail(msg, e.errno, str(e))
            if e.close:
                self._close(str(e))
            return
        except OSError as e:
            self._fail(msg, e.errno or errno.EIO, e.strerror or str(e))
            return
        except Exception as e:
            self._device_bug(msg, e)
            return
        if not msg.flags & FLAG_NO_REPLY:
            self._queue(
                HEADER.pack(msg.msg_id, command, HEADER_SIZE + len(payload), FLAG_REPLY, 0)
                + payload,
                fds,
            )

    def _fail(self, msg: RawMessage, errno_value: int, why: str) -> None:
        # Info, not warning: refusals are cheap and expected; the errno goes back.
        self.stats.error(
            failure_kind(errno_value, msg.command),
            "%s: msg %#x cmd %d failed: %s (%s)",
            self.name,
            msg.msg_id,
            msg.command,
            errno.errorcode.get(errno_value, str(errno_value)),
            why,
        )
        if not msg.flags & FLAG_NO_REPLY:
            self._queue(wire.error_reply(msg.msg_id, msg.command, errno_value))

    def _device_bug(self, msg: RawMessage, e: Exception) -> None:
        """The device raised something other than OSError: EIO, with its traceback."""
        self.stats.error(
            failure_kind(errno.EIO, msg.command) + " (device bug)",
            "%s: device failed on command %d (msg %#x)",
            self.name,
            msg.command,
            msg.msg_id,
            level=logging.ERROR,
            exc_info=e,
        )
        if not msg.flags & FLAG_NO_REPLY:
            self._queue(wire.error_reply(msg.msg_id, msg.command, errno.EIO))

    def _close(self, why: str) -> None:
        if not self.closed:
            self.stats.error(
                "connection closed",
                "%s: closing connection: %s",
                self.name,
                why,
                level=logging.WARNING,
            )
        self.closed = True
        self.close_reason = why
        self.framer.close()

    # --- VERSION ----------------------------------------------------------

    def _version(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        def refuse(why: str) -> RequestError:
            return RequestError(errno.EINVAL, why, close=True)

        if msg.fds:
            raise refuse("VERSION with fds")
        p = msg.payload
        if len(p) < wire.VERSION_HEAD_SIZE:
            raise refuse("VERSION too short")
        head = wire.VersionHead.parse(p[: wire.VERSION_HEAD_SIZE])
        if head.major != VERSION_MAJOR:
            raise refuse(f"client major {head.major}, ours {VERSION_MAJOR}")
        try:
            caps = caps_from_json(
                head.major, head.minor, parse_version_json(p[wire.VERSION_HEAD_SIZE :])
            )
        except VersionError as e:
            raise refuse(str(e)) from None
        self.client_caps = caps
        self.negotiated = True
        self.stats.event(
            "version",
            "%s: client version %d.%d, max_msg_fds %d, max_data_xfer_size %d",
            self.name,
            head.major,
            head.minor,
            caps.max_msg_fds,
            caps.max_data_xfer_size,
        )
        minor = min(head.minor, VERSION_MINOR)
        return wire.VersionHead.build(
            {"major": VERSION_MAJOR, "minor": minor}
        ) + server_caps_json(), ()

    # --- region access (hot path) ----------------------------------------

    def _region_read(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) != REGION_ACCESS.size:
            raise _bad("REGION_READ body size")
        offset, region, count = REGION_ACCESS.unpack(p)
        if count > self.max_data_xfer_size:
            raise _bad(f"REGION_READ count {count} above max_data_xfer_size")
        data = self.backend.region_read(region, offset, count)
        if len(data) != count:
            raise OSError(errno.EIO, f"device read {len(data)} of {count} bytes")
        return p + data, ()

    def _region_write(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) < REGION_ACCESS.size:
            raise _bad("REGION_WRITE body too short")
        offset, region, count = REGION_ACCESS.unpack_from(p)
        if count > self.max_data_xfer_size or len(p) != REGION_ACCESS.size + count:
            raise _bad("REGION_WRITE count does not match its data")
        self.backend.region_write(region, offset, p[REGION_ACCESS.size :])
        return p[: REGION_ACCESS.size], ()

    def _write_multi(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) < wire.WRITE_MULTI_COUNT.size:
            raise _bad("REGION_WRITE_MULTI body too short")
        (n,) = wire.WRITE_MULTI_COUNT.unpack_from(p)
        if not 1 <= n <= WRITE_MULTI_MAX:
            raise _bad(f"REGION_WRITE_MULTI wr_cnt {n}")
        if len(p) != wire.WRITE_MULTI_COUNT.size + n * wire.WRITE_MULTI_ENTRY.size:
            raise _bad("REGION_WRITE_MULTI size does not match wr_cnt")
        entries = list(wire.WRITE_MULTI_ENTRY.iter_unpack(p[wire.WRITE_MULTI_COUNT.size :]))
        for _offset, _region, count, _data in entries:
            if not 1 <= count <= WRITE_MULTI_DATA_SIZE:
                raise _bad(f"REGION_WRITE_MULTI entry count {count}")
        for offset, region, count, data in entries:
            self.backend.region_write(region, offset, data[:count])
        return p[: wire.WRITE_MULTI_COUNT.size], ()

    # --- info -------------------------------------------------------------

    def _device_info(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        _fixed_request(p, wire.DeviceInfoMsg, wire.DEVICE_INFO_SIZE, "DEVICE_GET_INFO")
        info = self.backend.device_info()
        return wire.DeviceInfoMsg.build(
            {
                "argsz": wire.DEVICE_INFO_SIZE,
                "flags": info.flags,
                "num_regions": info.num_regions,
                "num_irqs": info.num_irqs,
            }
        ), ()

    def _region_info(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.RegionInfoMsg, wire.REGION_INFO_SIZE, "GET_REGION_INFO")
        info = self.backend.region_info(req.index)
        payload, complete = wire.region_info_reply(info, req.argsz)
        # The fd goes with the complete answer only: QEMU asks twice when
        # there are capabilities and would otherwise get (and leak) two.
        fds = (
            [info.fd] if complete and info.fd is not None and info.flags & REGION_FLAG_MMAP else []
        )
        if len(fds) > self.client_caps.max_msg_fds:
            raise OSError(errno.EINVAL, "client accepts no fds but the region needs one")
        return payload, fds

    def _region_io_fds(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.RegionIoFds, wire.REGION_IO_FDS_SIZE, "GET_REGION_IO_FDS")
        if req.flags:
            raise _bad("GET_REGION_IO_FDS flags must be 0")
        self.backend.region_info(req.index)  # validates the index
        # No ioeventfd offload yet: every region reports zero sub-regions.
        return wire.RegionIoFds.build(
            {"argsz": wire.REGION_IO_FDS_SIZE, "flags": 0, "index": req.index, "count": 0}
        ), ()

    def _irq_info(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.IrqInfoMsg, wire.IRQ_INFO_SIZE, "GET_IRQ_INFO")
        info = self.backend.irq_info(req.index)
        return wire.IrqInfoMsg.build(
            {
                "argsz": wire.IRQ_INFO_SIZE,
                "flags": info.flags,
                "index": info.index,
                "count": info.count,
            }
        ), ()

    # --- IRQs -------------------------------------------------------------

    def _set_irqs(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) < wire.SET_IRQS_SIZE:
            raise _bad("SET_IRQS body too short")
        req = wire.SetIrqs.parse(p[: wire.SET_IRQS_SIZE])
        data = p[wire.SET_IRQS_SIZE :]
        if req.argsz < wire.SET_IRQS_SIZE or req.argsz != len(p):
            raise _bad(f"SET_IRQS argsz {req.argsz} for a {len(p)}-byte body")
        info = self.backend.irq_info(req.index)
        check_set_irqs(req.flags, req.start, req.count, len(data), len(msg.fds), info.count)
        self.backend.set_irqs(req.index, req.flags, req.start, req.count, data, msg.fds)
        return b"", ()

    # --- DMA --------------------------------------------------------------

    def _dma_map(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.DmaMap, wire.DMA_MAP_SIZE, "DMA_MAP")
        if req.flags & ~_DMA_MAP_KNOWN:
            raise _bad(f"DMA_MAP unknown flags {req.flags:#x}")
        if len(msg.fds) > 1:
            raise _bad(f"DMA_MAP with {len(msg.fds)} fds")
        if req.size == 0 or req.address + req.size > 1 << 64:
            raise _bad(f"DMA_MAP range {req.address:#x}+{req.size:#x}")
        fd = msg.fds[0] if msg.fds else None
        self.backend.dma_map(DmaMapping(req.address, req.size, req.flags, fd, req.offset))
        return b"", ()

    def _dma_unmap(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.DmaUnmap, wire.DMA_UNMAP_SIZE, "DMA_UNMAP")
        # Dirty bitmaps on unmap belong to migration v1, which is gone.
        if req.flags & ~DMA_UNMAP_FLAG_ALL:
            raise _bad(f"DMA_UNMAP flags {req.flags:#x} not supported")
        if req.flags & DMA_UNMAP_FLAG_ALL and (req.address or req.size):
            raise _bad("DMA_UNMAP ALL with an address or size")
        self.backend.dma_unmap(req.address, req.size, req.flags)
        return p[: wire.DMA_UNMAP_SIZE], ()

    def _reset(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        if msg.payload:
            raise _bad("DEVICE_RESET carries no payload")
        self.backend.reset()
        return b"", ()

    # --- features and migration -----------------------------------------

    def _device_feature(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        req = _fixed_request(p, wire.DeviceFeature, wire.DEVICE_FEATURE_SIZE, "DEVICE_FEATURE")
        flags = req.flags
        check_device_feature(flags)
        result = self.backend.device_feature(flags, p[wire.DEVICE_FEATURE_SIZE :])
        needed = wire.DEVICE_FEATURE_SIZE + len(result)
        if req.argsz < needed:
            # Too small for the answer: say how much is needed, send no data.
            return wire.DeviceFeature.build({"argsz": needed, "flags": flags}), ()
        return wire.DeviceFeature.build({"argsz": needed, "flags": flags}) + result, ()

    def _mig_data_read(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) != wire.MIG_DATA_SIZE:
            raise _bad("MIG_DATA_READ body size")
        req = wire.MigData.parse(p)
        if req.size > self.max_data_xfer_size:
            raise _bad(f"MIG_DATA_READ size {req.size} above max_data_xfer_size")
        if req.argsz < wire.MIG_DATA_SIZE + req.size:
            raise _bad(f"MIG_DATA_READ argsz {req.argsz} cannot hold {req.size} bytes")
        data = self.backend.mig_data_read(req.size)
        if len(data) > req.size:
            raise OSError(errno.EIO, f"device returned {len(data)} > {req.size} migration bytes")
        head = wire.MigData.build({"argsz": wire.MIG_DATA_SIZE + len(data), "size": len(data)})
        return head + data, ()

    def _mig_data_write(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        p = msg.payload
        if len(p) < wire.MIG_DATA_SIZE:
            raise _bad("MIG_DATA_WRITE body too short")
        req = wire.MigData.parse(p[: wire.MIG_DATA_SIZE])
        if req.size > self.max_data_xfer_size:
            raise _bad(f"MIG_DATA_WRITE size {req.size} above max_data_xfer_size")
        if req.size != len(p) - wire.MIG_DATA_SIZE or req.argsz < wire.MIG_DATA_SIZE + req.size:
            raise _bad("MIG_DATA_WRITE size/argsz do not match the data")
        self.backend.mig_data_write(p[wire.MIG_DATA_SIZE :])
        return b"", ()  # the spec's MIG_DATA_WRITE reply carries no payload

    def _version_again(self, msg: RawMessage) -> tuple[bytes, Sequence[int]]:
        raise _bad("VERSION after negotiation")


_HANDLERS: dict[int, _Handler] = {
    Command.VERSION: Connection._version_again,
    Command.DMA_MAP: Connection._dma_map,
    Command.DMA_UNMAP: Connection._dma_unmap,
    Command.DEVICE_GET_INFO: Connection._device_info,
    Command.DEVICE_GET_REGION_INFO: Connection._region_info,
    Command.DEVICE_GET_REGION_IO_FDS: Connection._region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: Connection._irq_info,
    Command.DEVICE_SET_IRQS: Connection._set_irqs,
    Command.REGION_READ: Connection._region_read,
    Command.REGION_WRITE: Connection._region_write,
    Command.DEVICE_RESET: Connection._reset,
    Command.REGION_WRITE_MULTI: Connection._write_multi,
    Command.DEVICE_FEATURE: Connection._device_feature,
    Command.MIG_DATA_READ: Connection._mig_data_read,
    Command.MIG_DATA_WRITE: Connection._mig_data_write,
}
# Commands that may carry fds; the handler checks the exact count.
_FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})

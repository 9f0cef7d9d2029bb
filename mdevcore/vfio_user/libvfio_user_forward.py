"""What libvfio-user answers without telling the device, forwarded to it.

libvfio-user keeps the client's eventfds and runs DMA logging itself, with
no hook for either.  Before each ``vfu_run_ctx`` the server peeks at the
next request (MSG_PEEK: nothing is consumed); a SET_IRQS is peeked whole
with its fds (the kernel installs copies) and given to the device first,
when libvfio-user will accept it; a DEVICE_FEATURE DMA_LOGGING_START/STOP
goes to the device after libvfio-user answered it, and before a
DMA_LOGGING_REPORT the device's dirty pages are marked in libvfio-user's
bitmap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.constants import HEADER_SIZE, Command
from mdevcore.vfio_user.libvfio_user_dma import mark_device_dirty

if TYPE_CHECKING:
    from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

log = logging.getLogger("mdevcore.vfio_user.libvfio_user")

HEADER = struct.Struct("<HHIII")
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_PEEK_MAX = 64 * 1024
_CMSG_SPACE = socket.CMSG_SPACE(64 * 4)
_SET_IRQS = int(Command.DEVICE_SET_IRQS)
_DEVICE_FEATURE = int(Command.DEVICE_FEATURE)


def peek_request(server: LibvfioUserServer, sock: socket.socket, head: bytes) -> Peeked | None:
    """The next request, if it is one the device must also see (module doc)."""
    _msg_id, command, size, _flags, _err = HEADER.unpack(head)
    if command not in (_SET_IRQS, _DEVICE_FEATURE):
        return None
    if not HEADER_SIZE < size <= _PEEK_MAX:
        return None
    try:
        data, ancdata, _msg_flags, _ = sock.recvmsg(size, _CMSG_SPACE, _PEEK)
    except OSError:
        return None
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(blob) - len(blob) % 4
            fds.extend(struct.unpack(f"<{usable // 4}i", blob[:usable]))
    peeked = Peeked(command, data[HEADER_SIZE:], fds)
    if len(data) < size:
        # All of it is queued (the server waited), but a peek stops where
        # fds were attached mid-message: not something QEMU sends.
        log.warning("%s: request %d peeked short; the device is not told", server.name, command)
        peeked.close()
        return None
    peeked.before(server)
    return peeked


class Peeked:
    """A peeked SET_IRQS or DEVICE_FEATURE, with the fd copies the peek installed."""

    def __init__(self, command: int, payload: bytes, fds: list[int]) -> None:
        self.command = command
        self.payload = payload
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def before(self, server: LibvfioUserServer) -> None:
        """What the device must see before libvfio-user answers the client.

        SET_IRQS: the client may look at its eventfds as soon as the reply
        arrives (UNMASK delivers a pending interrupt), so the device gets
        it first, when libvfio-user will accept it.  DMA_LOGGING_REPORT:
        the device's dirty pages go into libvfio-user's bitmap first.
        """
        if self.command == _SET_IRQS:
            try:
                if lvu_accepts_set_irqs(
                    self.payload, len(self.fds), server.irq_counts
                ) and not _lvu_signals_itself(self.payload):
                    self._set_irqs(server)
            finally:
                self.close()
            return
        p = self.payload
        if len(p) < 8 + 24:
            return
        _argsz, flags = struct.unpack_from("<II", p)
        feature = flags & vfio.DEVICE_FEATURE_MASK
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT and flags & vfio.DEVICE_FEATURE_GET:
            iova, length, _page = struct.unpack_from("<QQQ", p, 8)
            mark_device_dirty(server, iova, length)

    def forward(self, server: LibvfioUserServer) -> None:
        """After libvfio-user answered it: the same request to the device."""
        try:
            if self.command == _DEVICE_FEATURE:
                self._feature(server)
        finally:
            self.close()

    def _set_irqs(self, server: LibvfioUserServer) -> None:
        p = self.payload
        if len(p) < 20:
            return
        _argsz, flags, index, start, count = struct.unpack_from("<IIIII", p)
        try:
            server.backend.set_irqs(index, flags, start, count, p[20:], self.fds)
        except OSError as e:
            log.debug("%s: device refused SET_IRQS libvfio-user took: %s", server.name, e)

    def _feature(self, server: LibvfioUserServer) -> None:
        p = self.payload
        if len(p) < 8:
            return
        _argsz, flags = struct.unpack_from("<II", p)
        feature = flags & vfio.DEVICE_FEATURE_MASK
        if not flags & vfio.DEVICE_FEATURE_SET or flags & vfio.DEVICE_FEATURE_PROBE:
            return
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_START:
            try:
                reply = server.backend.device_feature(flags, p[8:])
                server.device_dirty_page_size = struct.unpack_from("<Q", reply)[0]
            except OSError as e:
                log.debug("%s: device DMA logging start: %s", server.name, e)
        elif feature == vfio.DEVICE_FEATURE_DMA_LOGGING_STOP:
            server.device_dirty_page_size = 0
            with contextlib.suppress(OSError):
                server.backend.device_feature(flags, p[8:])


def _lvu_signals_itself(payload: bytes) -> bool:
    """TRIGGER with DATA_NONE/DATA_BOOL on some vectors: a software trigger.

    libvfio-user writes the eventfds itself (it holds the same client
    eventfds as the device), so the device is not asked to signal them again.
    """
    _argsz, flags, _index, _start, count = struct.unpack_from("<IIIII", payload)
    data = flags & (vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_DATA_BOOL)
    return bool(flags & vfio.IRQ_SET_ACTION_TRIGGER and data and count)


_MAX_FDS = 8  # libvfio-user's SERVER_MAX_FDS: more fds in one message are refused


def lvu_accepts_set_irqs(payload: bytes, nr_fds: int, irq_counts: list[int]) -> bool:
    """Whether libvfio-user will accept this SET_IRQS (lib/irq.c's validation, rule by rule).

    The device trusts the transport for the message's structure, so only
    requests libvfio-user takes reach it.
    """
    if len(payload) < 20 or nr_fds > _MAX_FDS:
        return False
    argsz, flags, index, start, count = struct.unpack_from("<IIIII", payload)
    action = flags & (
        vfio.IRQ_SET_ACTION_MASK | vfio.IRQ_SET_ACTION_UNMASK | vfio.IRQ_SET_ACTION_TRIGGER
    )
    data = flags & (vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_DATA_BOOL | vfio.IRQ_SET_DATA_EVENTFD)
    err_or_req = index in (vfio.PCI_ERR_IRQ_INDEX, vfio.PCI_REQ_IRQ_INDEX)
    return not (
        argsz < 20
        or (data == vfio.IRQ_SET_DATA_BOOL and len(payload) - 20 != count)
        or index >= vfio.PCI_NUM_IRQS
        or action
        not in (vfio.IRQ_SET_ACTION_MASK, vfio.IRQ_SET_ACTION_UNMASK, vfio.IRQ_SET_ACTION_TRIGGER)
        or data not in (vfio.IRQ_SET_DATA_NONE, vfio.IRQ_SET_DATA_BOOL, vfio.IRQ_SET_DATA_EVENTFD)
        or start >= irq_counts[index]
        or start + count > irq_counts[index]
        or (err_or_req and (action != vfio.IRQ_SET_ACTION_TRIGGER or count > 1))
        or (count == 0 and start != 0)
        or (
            count == 0 and (action != vfio.IRQ_SET_ACTION_TRIGGER or data != vfio.IRQ_SET_DATA_NONE)
        )
        or (nr_fds and (data != vfio.IRQ_SET_DATA_EVENTFD or nr_fds != count))
    )

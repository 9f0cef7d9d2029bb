"""The second vfio-user transport: any DeviceBackend served through libvfio-user (C).

:class:`LibvfioUserServer` has the interface of ``server.DeviceServer``
(``serve``, ``disconnect``, ``connected``), so the daemon can use either.
libvfio-user parses and answers the protocol; the device behind it is the
same Python object the native engine serves.  How each concept is mapped:

- **Socket and trio**: ``vfu_create_ctx(VFU_TRANS_SOCK, path,
  LIBVFIO_USER_FLAG_ATTACH_NB)``; ``vfu_attach_ctx`` once a client's
  VERSION has arrived (see below), then the task waits on
  ``vfu_get_poll_fd`` with ``trio.lowlevel.wait_readable`` and calls
  ``vfu_run_ctx`` (one request per call in non-blocking mode) from the trio
  thread: no thread per device.  When libvfio-user drops the connection
  (``vfu_get_poll_fd`` is the listening socket again; ENOTCONN)
  ``backend.disconnected()`` runs (device state kept) and the next client
  is accepted.
- **Config space** (region 7) and BARs: region callbacks
  (``VFU_REGION_FLAG_ALWAYS_CB`` for config) call ``backend.region_read`` /
  ``region_write``, so the device keeps owning config space, capabilities
  and write masks; libvfio-user's own config emulation is never reached.
  Sparse mmap areas and fds come from ``backend.region_info``.
- **IRQs**: counts per index from ``backend.irq_info``.  libvfio-user keeps
  the client's eventfds to itself and offers no hook when SET_IRQS changes
  them, so each SET_IRQS is peeked whole, with its fds (the kernel installs
  copies), and given to ``backend.set_irqs`` before ``vfu_run_ctx``
  answers it, when libvfio-user's own checks will accept it
  (``libvfio_user_forward``).  The device's ``raise_irq`` therefore
  signals the client's eventfds exactly as under the native engine (INTx
  auto-mask, MSI-X masking and PBA included); only a software trigger
  (DATA_NONE/DATA_BOOL TRIGGER) is left to libvfio-user, which signals the
  same eventfds itself.
- **DMA**: the register/unregister callbacks feed ``backend.dma_map`` /
  ``dma_unmap``.  libvfio-user mmaps fd-backed regions itself and keeps the
  fd in a private cache; the device gets an fd for the same file by opening
  ``/proc/self/map_files/<vma>`` (root only) with the file offset from
  ``/proc/self/maps``, and mmaps it as it does under the native engine.
  Regions without an fd go through ``vfu_sgl_read`` / ``vfu_sgl_write`` via
  the DmaPort handed to ``backend.connected``.  Those calls are synchronous
  in libvfio-user (it sends DMA_READ/WRITE and blocks reading the reply on
  the same socket), so a client must not have requests in flight meanwhile.
- **Reset**: ``VFU_RESET_DEVICE`` / ``VFU_RESET_PCI_FLR`` -> ``backend.reset()``.
- **Migration**: libvfio-user runs the FSM (its own arc table) and calls
  ``transition`` once per arc, mapped onto ``backend.device_feature(SET
  MIG_DEVICE_STATE)``; ``read_data``/``write_data`` map onto
  ``mig_data_read``/``mig_data_write``.
- **Dirty logging**: libvfio-user answers DMA_LOGGING_START/STOP/REPORT
  itself, with one bitmap per fd-backed DMA region; its pages become dirty
  only through ``vfu_sgl_put``/``vfu_sgl_mark_dirty`` (message-based DMA is
  not logged).  The device's writes through its own mapping are invisible
  to it, so a peeked DMA_LOGGING_START/STOP is also forwarded to the device
  (which logs its writes as under the native engine), and before a peeked
  DMA_LOGGING_REPORT the device's report for that range is drained into
  libvfio-user's bitmap with ``vfu_sgl_mark_dirty``.

Untrusted clients: libvfio-user reads with blocking calls on the trio
thread.  So the server accepts clients itself and hands one to libvfio-user
only once its VERSION is all there (``libvfio_user_accept``); a request is
handed to ``vfu_run_ctx`` only once it is all queued (up to 128 KiB; a
client that leaves one half-sent for ``io_timeout`` is dropped); and
SO_RCVTIMEO/SO_SNDTIMEO bound what remains (a DMA reply, a reply the client
does not read).  Modules: ``libvfio_user_ffi`` (cffi declarations, loader),
``libvfio_user_accept`` (clients to libvfio-user), ``libvfio_user_dma``
(DMA), ``libvfio_user_forward`` (what the device must also see).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import trio

from mdevcore.unix_listener import unlink_stale_socket
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user import libvfio_user_ffi as ffi_mod
from mdevcore.vfio_user.backend import DeviceBackend, DmaMapping
from mdevcore.vfio_user.constants import HEADER_SIZE, SERVER_MAX_DMA_MAPS
from mdevcore.vfio_user.libvfio_user_accept import Acceptor, queued
from mdevcore.vfio_user.libvfio_user_dma import (
    PROT_READ,
    PROT_WRITE,
    VfuDmaPort,
    mapping_file,
    oserror,
)
from mdevcore.vfio_user.libvfio_user_forward import HEADER, peek_request

log = logging.getLogger(__name__)

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_DEFAULT_IO_TIMEOUT = 5.0  # seconds, as QEMU's default x-msg-timeout
# Requests handled back to back before other trio tasks get a turn.
_BATCH = 64
# A request up to this size is handed to libvfio-user only once it is all
# queued (a UNIX socket queues about the sender's SO_SNDBUF, ~208 KiB).
_WHOLE_MAX = 128 * 1024
_PEEK_WINDOW = 4096  # bytes peeked to see a whole small request at once
_PARTIAL_POLL = 0.0005  # seconds between looks at a request still arriving

# vfu_migr_state_t -> VFIO migration v2 state
_MIG_STATES = {
    ffi_mod.VFU_MIGR_STATE_STOP: 1,
    ffi_mod.VFU_MIGR_STATE_RUNNING: 2,
    ffi_mod.VFU_MIGR_STATE_STOP_AND_COPY: 3,
    ffi_mod.VFU_MIGR_STATE_RESUME: 4,
    ffi_mod.VFU_MIGR_STATE_PRE_COPY: 6,
}


def _interrupt_only(signum: int, frame: object) -> None:
    """SIGALRM handler whose only job is to make a blocking syscall return EINTR."""


class LibvfioUserServer:
    """Serves one DeviceBackend on one UNIX socket through libvfio-user."""

    def __init__(
        self,
        backend: DeviceBackend,
        path: str | os.PathLike[str],
        *,
        name: str,
        io_timeout: float = _DEFAULT_IO_TIMEOUT,
    ) -> None:
        self.ffi, self.lib = ffi_mod.load()  # LibvfioUserMissing says how to install
        self.backend = backend
        self.path = os.fspath(path)
        self.name = name
        self.io_timeout = io_timeout
        self.ctx: Any = None
        self.sg_size = int(self.lib.dma_sg_size())
        self._listen_fd = -1
        self._conn_fd = -1
        self._peek_sock: socket.socket | None = None
        self._keep: list[Any] = []  # cffi callbacks and structs libvfio-user points to
        self._scope: trio.CancelScope | None = None
        self._clients_served = 0
        self.device_dirty_page_size = 0  # the device's own DMA log page size, 0 = off
        self._dropping = False  # the client is being dropped: no more waiting for it
        # What the last peek saw of the queue: requests at [_window_pos,
        # _window_len) are known whole; _next_size is the one about to go.
        self._peek_buf = bytearray(_PEEK_WINDOW)
        self._window_pos = self._window_len = self._next_size = 0
        self.requests = 0
        self.irq_counts = [0] * vfio.PCI_NUM_IRQS

    # --- DeviceServer interface ------------------------------------------

    def status(self) -> dict[str, object]:
        """What ``mdevd status`` shows (as the native server's; libvfio-user
        answers refused requests itself, so no per-kind error counts)."""
        return {
            "socket": self.path,
            "connected": self.connected,
            "client": f"{self.name}#{self._clients_served}" if self.connected else None,
            "clients": self._clients_served,
            "requests": self.requests,
            "errors": {},
            "failure": None,
            "transport": "libvfio-user",
        }

    def errors_text(self) -> str:
        """The ``vfio_user/errors`` attribute: libvfio-user keeps no counts."""
        return "total 0 (libvfio-user transport: errors are not counted)\n"

    @property
    def connected(self) -> bool:
        return self._conn_fd >= 0

    def disconnect(self) -> None:
        """Drop the current client now (device removal)."""
        if self._peek_sock is not None:
            log.info("%s: disconnecting the client", self.name)
            with contextlib.suppress(OSError):
                self._peek_sock.shutdown(socket.SHUT_RDWR)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then serve clients one after another until cancelled (as DeviceServer)."""
        ffi, lib = self.ffi, self.lib
        unlink_stale_socket(self.path)
        ctx = lib.vfu_create_ctx(
            ffi_mod.VFU_TRANS_SOCK,
            os.fsencode(self.path),
            ffi_mod.LIBVFIO_USER_FLAG_ATTACH_NB,
            ffi.NULL,
            ffi_mod.VFU_DEV_TYPE_PCI,
        )
        if ctx == ffi.NULL:
            raise oserror(ffi, f"vfu_create_ctx({self.path})")
        self.ctx = ctx
        try:
            self._setup()
            if lib.vfu_realize_ctx(ctx) < 0:
                raise oserror(ffi, "vfu_realize_ctx")
            self._listen_fd = lib.vfu_get_poll_fd(ctx)
            self._set_timeouts(self._listen_fd)
            log.info("%s: listening on %s (libvfio-user)", self.name, self.path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.backend.run)
                task_status.started()
                await self._accept_loop()
        finally:
            if self.connected:
                self._client_gone()
            self.ctx = None
            lib.vfu_destroy_ctx(ctx)  # unmaps DMA (callbacks run), unlinks the socket
            self._keep.clear()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # --- set-up -----------------------------------------------------------

    def _setup(self) -> None:
        ffi, lib, ctx = self.ffi, self.lib, self.ctx
        config = self.backend.region_info(vfio.PCI_CONFIG_REGION_INDEX)
        pci_type = (
            ffi_mod.VFU_PCI_TYPE_EXPRESS if config.size > 256 else ffi_mod.VFU_PCI_TYPE_CONVENTIONAL
        )
        if lib.vfu_pci_init(ctx, pci_type, ffi_mod.PCI_HEADER_TYPE_NORMAL, 0) < 0:
            raise oserror(ffi, "vfu_pci_init")
        for index in range(vfio.PCI_NUM_REGIONS):
            self._setup_region(index)
        for index in range(vfio.PCI_NUM_IRQS):
            try:
                count = self.backend.irq_info(index).count
            except OSError:
                count = 0  # the device has none of this kind (mtty: no MSI-X)
            self.irq_counts[index] = count
            if lib.vfu_setup_device_nr_irqs(ctx, index, count) < 0:
                raise oserror(ffi, f"vfu_setup_device_nr_irqs({index}, {count})")
        reg = self._callback("vfu_dma_register_cb_t *", self._dma_register)
        unreg = self._callback("vfu_dma_unregister_cb_t *", self._dma_unregister)
        if lib.vfu_setup_device_dma(ctx, SERVER_MAX_DMA_MAPS, reg, unreg) < 0:
            raise oserror(ffi, "vfu_setup_device_dma")
        reset = self._callback("vfu_reset_cb_t *", self._reset, error=-1)
        if lib.vfu_setup_device_reset_cb(ctx, reset) < 0:
            raise oserror(ffi, "vfu_setup_device_reset_cb")
        if self._offers_migration():
            callbacks = ffi.new(
                "vfu_migration_callbacks_t *",
                {
                    "version": ffi_mod.VFU_MIGR_CALLBACKS_VERS,
                    "transition": self._callback(
                        "int (*)(vfu_ctx_t *, vfu_migr_state_t)", self._transition, error=-1
                    ),
                    "read_data": self._callback(
                        "ssize_t (*)(vfu_ctx_t *, void *, uint64_t)", self._mig_read, error=-1
                    ),
                    "write_data": self._callback(
                        "ssize_t (*)(vfu_ctx_t *, void *, uint64_t)", self._mig_write, error=-1
                    ),
                },
            )
            self._keep.append(callbacks)
            if lib.vfu_setup_device_migration_callbacks(ctx, callbacks) < 0:
                raise oserror(ffi, "vfu_setup_device_migration_callbacks")
        level = ffi_mod.LOG_DEBUG if log.isEnabledFor(logging.DEBUG) else ffi_mod.LOG_INFO
        lib.vfu_setup_log(ctx, self._callback("vfu_log_fn_t *", self._log), level)

    def _callback(self, ctype: str, fn: Callable[..., Any], error: Any = None) -> Any:
        cb = self.ffi.callback(ctype, fn, error=error)
        self._keep.append(cb)
        return cb

    def _setup_region(self, index: int) -> None:
        ffi, lib = self.ffi, self.lib
        try:
            info = self.backend.region_info(index)
        except OSError:
            return
        if info.size == 0:
            return
        flags = 0
        if info.flags & vfio.REGION_FLAG_READ:
            flags |= ffi_mod.VFU_REGION_FLAG_READ
        if info.flags & vfio.REGION_FLAG_WRITE:
            flags |= ffi_mod.VFU_REGION_FLAG_WRITE
        if index == vfio.PCI_CONFIG_REGION_INDEX:
            flags |= ffi_mod.VFU_REGION_FLAG_ALWAYS_CB
        elif index <= 5:
            flags |= self._bar_flags(index)
        areas: Any = ffi.NULL
        nr_areas = 0
        fd = -1
        if info.flags & vfio.REGION_FLAG_MMAP and info.fd is not None:
            fd = info.fd
            if info.sparse_areas:
                nr_areas = len(info.sparse_areas)
                areas = ffi.new("struct iovec[]", nr_areas)
                for i, area in enumerate(info.sparse_areas):
                    areas[i].iov_base = ffi.cast("void *", area.offset)
                    areas[i].iov_len = area.size
        access = self._callback(
            "vfu_region_access_cb_t *",
            lambda _ctx, buf, count, offset, is_write: self._access(
                index, buf, count, offset, is_write
            ),
            error=-1,
        )
        if (
            lib.vfu_setup_region(
                self.ctx, index, info.size, access, flags, areas, nr_areas, fd, info.fd_offset
            )
            < 0
        ):
            raise oserror(ffi, f"vfu_setup_region({index}, size {info.size:#x})")

    def _bar_flags(self, index: int) -> int:
        """libvfio-user's BAR kind flags, from the device's own BAR register."""
        low = int.from_bytes(
            self.backend.region_read(vfio.PCI_CONFIG_REGION_INDEX, 0x10 + 4 * index, 4), "little"
        )
        if low & 1:  # I/O space
            return 0
        flags = ffi_mod.VFU_REGION_FLAG_MEM
        if low & 0x6 == 0x4:
            flags |= ffi_mod.VFU_REGION_FLAG_64_BITS
        if low & 0x8:
            flags |= ffi_mod.VFU_REGION_FLAG_PREFETCH
        return flags

    def _offers_migration(self) -> bool:
        try:
            self.backend.device_feature(
                vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_MIGRATION, b""
            )
        except OSError:
            return False
        return True

    def _set_timeouts(self, fd: int) -> None:
        # Accepted sockets inherit these: a client that stalls mid-message
        # costs at most io_timeout of the trio thread, not forever.
        sec = int(self.io_timeout)
        usec = int((self.io_timeout - sec) * 1e6)
        tv = struct.pack("@ll", sec, usec)
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        finally:
            sock.close()

    # --- callbacks (run inside vfu_run_ctx, on the trio thread) ------------

    def _fail(self, what: str, exc: BaseException) -> int:
        if isinstance(exc, OSError) and exc.errno:
            log.debug("%s: %s: %s", self.name, what, exc)
            self.ffi.errno = exc.errno
        else:
            log.error("%s: device failed in %s", self.name, what, exc_info=exc)
            self.ffi.errno = errno.EIO
        return -1

    def _access(self, index: int, buf: Any, count: int, offset: int, is_write: bool) -> int:
        try:
            if is_write:
                self.backend.region_write(index, offset, bytes(self.ffi.buffer(buf, count)))
            else:
                data = self.backend.region_read(index, offset, count)
                if len(data) != count:
                    raise OSError(errno.EIO, f"device returned {len(data)} of {count} bytes")
                self.ffi.memmove(buf, data, count)
        except BaseException as exc:
            return self._fail(f"region {index} access at {offset:#x}", exc)
        return count

    def _dma_register(self, _ctx: Any, info: Any) -> None:
        iova = int(self.ffi.cast("uintptr_t", info.iova.iov_base))
        size = int(info.iova.iov_len)
        flags = (vfio.DMA_MAP_FLAG_READ if info.prot & PROT_READ else 0) | (
            vfio.DMA_MAP_FLAG_WRITE if info.prot & PROT_WRITE else 0
        )
        fd: int | None = None
        offset = 0
        if info.vaddr != self.ffi.NULL:
            try:
                fd, offset = mapping_file(int(self.ffi.cast("uintptr_t", info.vaddr)))
            except OSError as e:
                # Without the fd the device still reaches it, by vfu_sgl_read/write
                # (a memcpy for a region libvfio-user mapped).
                log.warning("%s: DMA %#x: no fd for the device (%s)", self.name, iova, e)
        try:
            self.backend.dma_map(DmaMapping(iova, size, flags, fd, offset))
        except BaseException as exc:
            # libvfio-user already accepted the map; the device will refuse DMA there.
            self._fail(f"DMA map {iova:#x}+{size:#x}", exc)
        finally:
            if fd is not None:
                os.close(fd)

    def _dma_unregister(self, _ctx: Any, info: Any) -> None:
        iova = int(self.ffi.cast("uintptr_t", info.iova.iov_base))
        try:
            self.backend.dma_unmap(iova, int(info.iova.iov_len), 0)
        except BaseException as exc:
            self._fail(f"DMA unmap {iova:#x}", exc)

    def _reset(self, _ctx: Any, kind: int) -> int:
        if kind == ffi_mod.VFU_RESET_LOST_CONN:
            return 0  # the serve loop calls backend.disconnected()
        try:
            self.backend.reset()
        except BaseException as exc:
            return self._fail("reset", exc)
        return 0

    def _transition(self, _ctx: Any, state: int) -> int:
        try:
            wanted = _MIG_STATES[state]
            self.backend.device_feature(
                vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE,
                struct.pack("<II", wanted, 0),
            )
        except BaseException as exc:
            return self._fail(f"migration transition to {state}", exc)
        return 0

    def _mig_read(self, _ctx: Any, buf: Any, count: int) -> int:
        try:
            data = self.backend.mig_data_read(count)
            if len(data) > count:
                raise OSError(errno.EIO, "device returned more migration data than asked")
            self.ffi.memmove(buf, data, len(data))
        except BaseException as exc:
            return self._fail("migration data read", exc)
        return len(data)

    def _mig_write(self, _ctx: Any, buf: Any, count: int) -> int:
        try:
            self.backend.mig_data_write(bytes(self.ffi.buffer(buf, count)))
        except BaseException as exc:
            return self._fail("migration data write", exc)
        return count

    def _log(self, _ctx: Any, level: int, msg: Any) -> None:
        text = self.ffi.string(msg).decode(errors="replace")
        # LOG_ERR and worse are mostly refused client requests: info, not errors.
        pylevel = logging.DEBUG if level > 3 else logging.INFO
        log.log(pylevel, "%s: libvfio-user: %s", self.name, text)

    # --- serving ----------------------------------------------------------

    async def _accept_loop(self) -> None:
        acceptor = Acceptor(self._listen_fd, self.path, self.io_timeout)
        try:
            while True:
                if not acceptor.waiting:
                    await trio.lowlevel.wait_readable(self._listen_fd)
                acceptor.take_pending()
                if not acceptor.waiting:
                    continue
                client = acceptor.waiting.popleft()
                try:
                    attached = await self._hand_over(acceptor, client)
                except BaseException:
                    client.close()  # cancelled while waiting for its VERSION
                    raise
                if not attached:
                    continue
                await self._serve_attached()
        finally:
            acceptor.close()

    async def _hand_over(self, acceptor: Acceptor, client: socket.socket) -> bool:
        """Attach ``client`` to libvfio-user (libvfio_user_accept's module doc)."""
        first = await acceptor.first_message(client)
        if first is None:
            log.info("%s: client sent no whole first message in %ss", self.name, self.io_timeout)
            client.close()
            return False
        try:
            helper = acceptor.connect_helper(*first)
        except OSError as e:
            log.warning("%s: cannot reach libvfio-user's socket: %s", self.name, e)
            client.close()
            return False
        with helper:
            ret = self._attach()
            code = self.ffi.errno
            acceptor.relay_reply(helper, client)
            if ret < 0:
                log.info("%s: client refused: %s", self.name, os.strerror(code))
                client.close()
                return False
            Acceptor.swap_in(client, self.lib.vfu_get_poll_fd(self.ctx))
        return True

    async def _serve_attached(self) -> None:
        self._clients_served += 1
        label = f"{self.name}#{self._clients_served}"
        self._conn_fd = self.lib.vfu_get_poll_fd(self.ctx)
        # A dup shares O_NONBLOCK with libvfio-user's fd, which it reads
        # blocking: never set it, peek with MSG_DONTWAIT instead.
        self._peek_sock = socket.socket(fileno=os.dup(self._conn_fd))
        self._set_timeouts(self._conn_fd)
        log.info("%s: client connected", label)
        try:
            self._scope = trio.CancelScope()
            with self._scope:
                try:
                    self.backend.connected(VfuDmaPort(self))
                except Exception:
                    log.exception("%s: device failed in connected()", label)
                    self.disconnect()
                await self._serve_client(label)
        finally:
            self._scope = None
            if self.connected:
                self._client_gone()

    def _attach(self) -> int:
        """vfu_attach_ctx, bounded by io_timeout should it ever wait.

        The helper connection has the VERSION queued, so it should not; but
        libvfio-user's recv is blocking and an AF_UNIX socket inherits no
        SO_RCVTIMEO, so a SIGALRM stands guard (EINTR: libvfio-user gives
        up).  Only the main thread may set signal handlers; elsewhere
        (tests in worker threads) it runs unguarded.
        """
        if threading.current_thread() is not threading.main_thread():
            return int(self.lib.vfu_attach_ctx(self.ctx))
        previous = signal.signal(signal.SIGALRM, _interrupt_only)
        signal.setitimer(signal.ITIMER_REAL, self.io_timeout)
        try:
            return int(self.lib.vfu_attach_ctx(self.ctx))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    async def _serve_client(self, label: str) -> None:
        lib, ffi, ctx = self.lib, self.ffi, self.ctx
        while True:
            await trio.lowlevel.wait_readable(self._conn_fd)
            # Other tasks ran meanwhile (a DmaPort transfer reads the socket):
            # what was peeked before may be gone.
            self._window_len = 0
            for _ in range(_BATCH):
                head, missing = self._next_message()
                if missing < 0:
                    break  # nothing more to read now
                if missing:
                    # libvfio-user would block reading it (or read it short and
                    # lose the stream): let the rest arrive in trio first.
                    if not await self._wait_for(missing):
                        log.warning(
                            "%s: request incomplete after %ss: dropped", label, self.io_timeout
                        )
                        # Shut down: libvfio-user then reads what is there,
                        # finds the end and resets the connection (ENOTCONN).
                        self.disconnect()
                        self._dropping = True
                    continue
                sock = self._peek_sock
                peeked = peek_request(self, sock, head) if head and sock else None
                ret = lib.vfu_run_ctx(ctx)
                code = ffi.errno
                if lib.vfu_get_poll_fd(ctx) != self._conn_fd:
                    # libvfio-user reset the connection (EOF, or a reply it
                    # could not send); it may still have returned >= 0.
                    if peeked is not None:
                        peeked.close()
                    log.info("%s: client gone (%s)", label, os.strerror(code))
                    return
                if ret == 1 and self._next_size:
                    self._window_pos += self._next_size  # libvfio-user took exactly that
                else:
                    self._window_len = 0
                if ret < 0:
                    if peeked is not None:
                        peeked.close()
                    if code not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        log.info("%s: vfu_run_ctx: %s", label, os.strerror(code))
                    break
                if peeked is not None:
                    peeked.forward(self)
                if ret == 0:
                    break
                self.requests += 1
            else:
                await trio.lowlevel.checkpoint()

    def _queued(self) -> int:
        sock = self._peek_sock
        return queued(sock) if sock is not None else 0

    def _next_message(self) -> tuple[bytes, int]:
        """(the next request's header if queued, bytes to wait for; -1: nothing to read).

        At EOF it is (b"", 0): vfu_run_ctx then finds the client gone.
        Requests larger than a socket can queue are
        not waited for (libvfio-user reads them as they come).
        """
        sock = self._peek_sock
        assert sock is not None
        if self._dropping:
            return b"", 0
        self._next_size = 0
        pos, end = self._window_pos, self._window_len
        if end - pos >= HEADER_SIZE:
            # Still in what was peeked: no syscall while a burst lasts.
            head = bytes(self._peek_buf[pos : pos + HEADER_SIZE])
            size = HEADER.unpack(head)[2]
            if HEADER_SIZE <= size <= end - pos:
                self._next_size = size
                return head, 0
        # Peek afresh: the next whole requests, as many as fit the window.
        self._window_pos = self._window_len = 0
        try:
            n = sock.recv_into(self._peek_buf, _PEEK_WINDOW, _PEEK)
        except BlockingIOError:
            # Nothing queued.  A request arriving before vfu_run_ctx would be
            # handled unpeeked: wait for it in trio instead.
            return b"", -1
        except OSError:
            # ECONNRESET and the like: the client is gone, like EOF (it may
            # not crash the server: the next client must be served).
            return b"", 0
        if n == 0:
            return b"", 0  # EOF
        if n < HEADER_SIZE:
            return b"", HEADER_SIZE
        head = bytes(self._peek_buf[:HEADER_SIZE])
        size = HEADER.unpack(head)[2]
        if HEADER_SIZE <= size <= n:
            self._window_len, self._next_size = n, size
            return head, 0
        if not HEADER_SIZE < size <= _WHOLE_MAX:
            return head, 0  # libvfio-user refuses it, or reads it as it comes
        # Larger than the window, or a peek that stopped where fds were
        # attached: ask for the queue's length.
        return head, size if self._queued() < size else 0

    async def _wait_for(self, total: int) -> bool:
        """Until ``total`` bytes are queued; False after io_timeout or when the client left."""
        deadline = trio.current_time() + self.io_timeout
        while self._queued() < total:
            if trio.current_time() > deadline or self._peek_sock is None:
                return False
            await trio.sleep(_PARTIAL_POLL)
        return True

    def _client_gone(self) -> None:
        if self._peek_sock is not None:
            self._peek_sock.close()
            self._peek_sock = None
        self._conn_fd = -1
        self._dropping = False
        self.device_dirty_page_size = 0
        try:
            self.backend.disconnected()
        except Exception:
            log.exception("%s: device failed in disconnected()", self.name)

    # --- what libvfio-user does not tell the device ------------------------


async def serve_forever(
    backend: DeviceBackend, path: str | os.PathLike[str], *, name: str = "vfio-user"
) -> None:
    """Serve through libvfio-user until SIGTERM or SIGINT (as server.serve_forever)."""
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(LibvfioUserServer(backend, path, name=name).serve)
            async for signum in signals:
                log.info("%s: signal %d, shutting down", name, signum)
                nursery.cancel_scope.cancel()
                break

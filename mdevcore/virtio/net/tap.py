"""A TAP device as a frame backend: the VF's wire is a host network interface.

The daemon opens ``/dev/net/tun`` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
so each read or write is one whole Ethernet frame behind a virtio_net_hdr
of 12 bytes (TUNSETVNETHDRSZ: the version 1 header, num_buffers
included, little-endian with TUNSETVNETLE), exactly the header the guest
wrote or will read.  The host kernel then does the offloads: it finishes
the checksum of a NEEDS_CSUM packet and cuts a GSO packet into segments
where it has to (forwarding, or an interface without them), and, once
the driver's features are known (TUNSETOFFLOAD from ``set_offload``:
TUN_F_CSUM/TSO4/TSO6/TSO_ECN for GUEST_CSUM/TSO4/TSO6/ECN), hands over
large TCP segments and unfinished checksums itself.  So the device
offers CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6 and ECN with this backend,
and CTRL_GUEST_OFFLOADS (the driver switching its RX offloads at run
time is one more TUNSETOFFLOAD).
``vnet_hdr=False`` gives bare frames and no offloads.

The TAP may be placed in a network namespace (``netns``: a name under
``/run/netns``, as ``ip netns add`` makes, or a path such as
``/proc/PID/ns/net``).  A TAP belongs to the namespace of the thread that
creates it, so a short-lived thread joins the namespace, opens the TAP
and exits; the daemon's own threads never change namespace.  An existing
(persistent) TAP of that name is attached to, as the kernel does.

Closing the backend closes the fd; a non-persistent TAP disappears with it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
from pathlib import Path

import trio

from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import MAX_FRAME, BackendStats
from mdevcore.virtio.net.offload import OFFLOAD_FEATURES, tun_offload_flags

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
NETNS_DIR = Path("/run/netns")
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): the flags by value
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUNSETVNETLE = 0x400454DC  # _IOW('T', 220, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
# Writes the kernel refuses for reasons of the moment (queue full, interface
# down or going): the frame is dropped, as on a busy wire.
_DROP_ERRNOS = (errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL, errno.EBADFD)


def check_ifname(name: str) -> str:
    """A Linux interface name: 1-15 bytes, no '/', ':' or whitespace, not . or .."""
    raw = name.encode()
    if (
        not 0 < len(raw) < IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:%")
        or any(c.isspace() for c in name)
    ):
        raise OSError(errno.EINVAL, f"{name!r} is not a valid interface name")
    return name


def netns_path(netns: str) -> Path:
    """``NAME`` -> /run/netns/NAME (a plain name only); an absolute path as given."""
    if netns.startswith("/"):
        return Path(netns)
    if not netns or "/" in netns or netns in (".", ".."):
        raise OSError(errno.EINVAL, f"{netns!r} is not a network namespace name")
    return NETNS_DIR / netns


def _open_here(name: str, vnet_hdr: bool) -> int:
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags).ljust(40, b"\0")
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", spec.NET_HDR_SIZE))
            _little_endian_header(fd)
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)  # nothing until a driver says what it takes
    except BaseException:
        os.close(fd)
        raise
    return fd


def _little_endian_header(fd: int) -> None:
    """VERSION_1 headers are little-endian; the TAP's default is the host's order."""
    try:
        fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
    except OSError as exc:
        # Kernels without cross-endian support refuse it; on a little-endian
        # host the default order is the right one anyway.
        if exc.errno != errno.EINVAL or struct.pack("=H", 1) != b"\1\0":
            raise


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_tap(name: str, netns: str | None = None, *, vnet_hdr: bool = True) -> int:
    """The fd of TAP ``name`` (created if absent), in ``netns`` if given."""
    check_ifname(name)
    if netns is None:
        return _open_here(name, vnet_hdr)
    path = netns_path(netns)
    outcome: list[int | BaseException] = []

    def in_namespace() -> None:
        try:
            nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(nsfd)  # this thread only; it ends right after
            finally:
                os.close(nsfd)
            outcome.append(_open_here(name, vnet_hdr))
        except BaseException as e:  # handed to the caller's thread
            outcome.append(e)

    worker = threading.Thread(target=in_namespace, name=f"tap-{name}")
    worker.start()
    worker.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        if isinstance(result, OSError):
            raise OSError(result.errno, f"TAP {name} in {path}: {result.strerror}") from None
        raise result
    return result


class TapBackend:
    """Frames to and from a TAP interface (see the module doc)."""

    def __init__(self, name: str, netns: str | None = None, *, vnet_hdr: bool = True) -> None:
        self.name = name
        self.netns = netns
        self.vnet_hdr = vnet_hdr
        self.offloads = OFFLOAD_FEATURES if vnet_hdr else 0
        self.fd = open_tap(name, netns, vnet_hdr=vnet_hdr)
        self.stats = BackendStats()
        self.tun_offload = 0  # TUNSETOFFLOAD flags in force

    def set_offload(self, features: int) -> None:
        """What the kernel may hand over (GSO, unfinished checksums) for these features."""
        if not self.vnet_hdr or self.fd < 0:
            return
        flags = tun_offload_flags(features & self.offloads)
        if flags == self.tun_offload:
            return
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            # The TAP went away (EBADFD): a dead wire needs no offloads.
            log.warning("TAP %s: TUNSETOFFLOAD %#x: %s", self.name, flags, exc.strerror)
            return
        self.tun_offload = flags

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            self.stats.tx_dropped += 1
            return
        self.stats.tx_frames += 1

    async def receive(self) -> bytes:
        """The next frame the host sent into the TAP (oversized ones are dropped).

        If the interface goes away under us (its namespace deleted: the fd
        then answers EBADFD), the wire is dead: this waits forever, like a
        cable pulled out, instead of failing the device.
        """
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                frame = os.read(self.fd, self._limit + 1)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("TAP %s: %s; no more frames from it", self.name, exc.strerror)
                await trio.sleep_forever()
            if not frame:
                continue
            if len(frame) > self._limit:
                self.stats.rx_truncated += 1
                continue
            self.stats.rx_frames += 1
            return frame

    @property
    def _limit(self) -> int:
        return MAX_FRAME + (spec.NET_HDR_SIZE if self.vnet_hdr else 0)

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            trio.lowlevel.notify_closing(fd)  # wake a receive() still waiting on it
        except RuntimeError:
            pass  # not in a trio run: nobody can be waiting
        os.close(fd)

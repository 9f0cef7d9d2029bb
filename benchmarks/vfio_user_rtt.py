"""vfio-user round-trip benchmark: our server against a minimal C responder.

    .venv/bin/python benchmarks/vfio_user_rtt.py [--reads 20000] [--writes 100000]
    .venv/bin/python benchmarks/vfio_user_rtt.py --profile

Prints figures, asserts nothing.  Servers, each in its own process:
  C responder        benchmarks/c/responder.c (the floor)
  C responder spin 200  the same, polling 200 us for the next request before it blocks
  trio echo spin 0   the server's socket pattern in trio, no engine (trio's floor)
  thread echo        the same answers from a blocking loop (a connection thread's floor)
  raw trio           DeviceServer --io trio + a bytearray-backed DeviceBackend
  raw thread         the same, each connection on its own thread (--io thread)
  raw trio spin 20   --io trio, polling up to 20 us before parking in trio
  PciDevice trio     DeviceServer --io trio + a PciDevice with one MEM32 BAR
  PciDevice thread   the same with --io thread
  PciDevice thread spin 200  --io thread --spin-us 200: a connection thread polls
                     200 us for a bursting client's next request before it sleeps
  libvfio-user PciDevice  the same PciDevice served through libvfio-user (cffi),
                     when the library is installed (setup.sh)
Clients: the project's blocking Client (Python) and benchmarks/c/client.c.
Measured: REGION_READ of 4 bytes (median and p99 round trip over --reads
requests after 1000 warm-up) and REGION_WRITE with No_reply (msgs/s, ended
by one read so every write was processed).  Ratios: to the C responder
with the same client ("x C"), and to libvfio-user's server with the same
client ("x lvu").  Binaries go to benchmarks/build/.

``--profile`` serves the PciDevice once per I/O mode with the server's
``--profile`` and prints its per-command table (engine, device and socket
calls per message; mdevcore.vfio_user.profile) after each client.
"""

from __future__ import annotations

import argparse
import errno
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
sys.path.insert(0, str(ROOT))

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity  # noqa: E402
from mdevcore.vfio_user.backend import (  # noqa: E402
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    DeviceInfo,
    DmaMapping,
    DmaPort,
    IrqInfo,
    RegionInfo,
)
from mdevcore.vfio_user.client import Client  # noqa: E402
from mdevcore.vfio_user.constants import Command  # noqa: E402
from mdevcore.vfio_user.server import DEFAULT_SPIN_US  # noqa: E402
from mdevcore.vfio_user.wire import REGION_ACCESS  # noqa: E402


class RawDevice:
    """The least a DeviceBackend can do: one 4 KiB RW region 0."""

    # Plain memory, no trio objects: a connection thread may serve it.
    serve_in_thread = True

    def __init__(self) -> None:
        self.mem = bytearray(4096)
        self.device_lock = threading.RLock()

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(0, 9, 5)

    def region_info(self, index: int) -> RegionInfo:
        if index == 0:
            return RegionInfo(0, REGION_FLAG_READ | REGION_FLAG_WRITE, 4096)
        if 0 <= index < 9:
            return RegionInfo(index, 0, 0)
        raise OSError(errno.EINVAL, "no region")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index != 0 or offset + count > 4096:
            raise OSError(errno.EINVAL, "bad access")
        return bytes(self.mem[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0 or offset + len(data) > 4096:
            raise OSError(errno.EINVAL, "bad access")
        self.mem[offset : offset + len(data)] = data

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(index, 1, 0)

    def set_irqs(self, *args: object) -> None:
        raise OSError(errno.EINVAL, "no IRQs")

    def dma_map(self, mapping: DmaMapping) -> None:
        raise OSError(errno.EINVAL, "no DMA")

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        raise OSError(errno.EINVAL, "no DMA")

    def reset(self) -> None:
        self.mem[:] = bytes(4096)

    def device_feature(self, flags: int, data: bytes) -> bytes:
        raise OSError(errno.ENOTTY, "none")

    def mig_data_read(self, size: int) -> bytes:
        raise OSError(errno.EINVAL, "no migration")

    def mig_data_write(self, data: bytes) -> None:
        raise OSError(errno.EINVAL, "no migration")

    def connected(self, port: DmaPort) -> None:
        pass

    def disconnected(self) -> None:
        pass

    async def run(self) -> None:
        return


class PciBench(PciDevice):
    """A PciDevice whose BAR0 is plain memory (the default handlers)."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0xBEEF, class_code=0xFF0000))
        self.add_bar(0, 0x1000, BarKind.MEM32)


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    for name in ("responder", "client"):
        src, out = HERE / "c" / f"{name}.c", BUILD / name
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)


C_FLOOR = "C responder"
LIBVFIO_USER = "libvfio-user PciDevice"
SERVERS = (
    # label, device class (None = the C responder, "echo" = bare trio or thread), spin_us,
    # transport, io
    (C_FLOOR, None, 0.0, "native", ""),
    ("C responder spin 200", None, 200.0, "native", ""),
    ("trio echo spin 0", "echo", 0.0, "native", "trio"),
    ("thread echo", "echo", 0.0, "native", "thread"),
    ("raw trio", "RawDevice", DEFAULT_SPIN_US, "native", "trio"),
    ("raw thread", "RawDevice", DEFAULT_SPIN_US, "native", "thread"),
    ("raw trio spin 20", "RawDevice", 20.0, "native", "trio"),
    ("PciDevice trio", "PciBench", DEFAULT_SPIN_US, "native", "trio"),
    ("PciDevice thread", "PciBench", DEFAULT_SPIN_US, "native", "thread"),
    ("PciDevice thread spin 200", "PciBench", 200.0, "native", "thread"),
    (LIBVFIO_USER, "PciBench", 0.0, "libvfio-user", ""),
)


def _listening(path: str) -> bool:
    """Whether a UNIX socket at ``path`` listens (/proc/net/unix: __SO_ACCEPTCON)."""
    with open("/proc/net/unix") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[-1] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def start_server(
    device: str | None,
    spin_us: float,
    path: str,
    transport: str = "native",
    io: str = "",
    profile: bool = False,
) -> subprocess.Popen[bytes]:
    if device is None:
        cmd = [str(BUILD / "responder"), path] + ([str(spin_us)] if spin_us else [])
    elif device == "echo":
        cmd = [sys.executable, __file__, "--serve-echo", path, "--io", io]
    else:
        cmd = [sys.executable, "-m", "mdevcore.vfio_user", "--device", f"vfio_user_rtt:{device}",
               "--socket", path, "--spin-us", str(spin_us), "--transport", transport]  # fmt: skip
        cmd += ["--io", io] if io else []
        cmd += ["--profile"] if profile else []
    pythonpath = os.pathsep.join(filter(None, (str(HERE), str(ROOT), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 30
    while not _listening(path):  # bound is not enough: connect() is refused until listen()
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server {cmd} did not start")
        time.sleep(0.01)
    return proc


def python_client(path: str, reads: int, writes: int) -> tuple[float, float, float]:
    with Client(path, timeout=None) as c:
        c.negotiate()
        times = []
        req = REGION_ACCESS.pack(0, 0, 4)
        clock = time.perf_counter_ns
        for i in range(1000 + reads):
            t0 = clock()
            c.wait_reply(c.send(Command.REGION_READ, req))
            if i >= 1000:
                times.append(clock() - t0)
        times.sort()
        median = statistics.median(times) / 1000
        p99 = times[int(len(times) * 0.99)] / 1000
        body = REGION_ACCESS.pack(0, 0, 4) + b"abcd"
        t0 = clock()
        for _ in range(writes):
            c.send(Command.REGION_WRITE, body, no_reply=True)
        c.region_read(0, 0, 4)  # every write before it has been handled
        rate = writes / ((clock() - t0) / 1e9)
        return median, p99, rate


def c_client(path: str, reads: int, writes: int) -> tuple[float, float, float]:
    out = subprocess.run(
        [str(BUILD / "client"), path, str(reads), str(writes)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    fields = dict(zip(out[::2], map(float, out[1::2]), strict=True))
    return fields["rtt_median_us"], fields["rtt_p99_us"], fields["posted_msgs_per_s"]


def _echo_answers(pending: bytearray) -> list[bytes]:
    """Answer the whole messages in ``pending`` (consumed) like the C responder."""
    from mdevcore.vfio_user.wire import HEADER

    out = []
    while len(pending) >= 16:
        msg_id, cmd, size, flags, _ = HEADER.unpack_from(pending)
        if len(pending) < size:
            break
        body = bytes(pending[16:size])
        del pending[:size]
        if cmd == Command.VERSION:
            out.append(HEADER.pack(msg_id, cmd, 23, 1, 0) + b"\0\0\0\0{}\0")
        elif cmd == Command.REGION_READ:
            count = REGION_ACCESS.unpack(body)[2]
            out.append(HEADER.pack(msg_id, cmd, 32 + count, 1, 0) + body + bytes(count))
        elif not flags & 0x10:
            out.append(HEADER.pack(msg_id, cmd, 32, 1, 0) + body[:16])
    return out


async def serve_echo(path: str) -> None:
    """The trio floor: same socket pattern as DeviceServer, no engine, no device.

    Answers VERSION, REGION_READ (zeros) and REGION_WRITE like the C responder.
    """
    import socket

    import trio

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    rbuf = memoryview(bytearray(1 << 18))
    while True:
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
        sock.setblocking(False)
        pending = bytearray()
        while True:
            try:
                n = sock.recv_into(rbuf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not n:
                break
            pending += rbuf[:n]
            out = _echo_answers(pending)
            if out:
                sock.sendall(b"".join(out))
        sock.close()


def serve_echo_blocking(path: str) -> None:
    """The thread floor: the same answers from a blocking receive and send."""
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    rbuf = memoryview(bytearray(1 << 18))
    while True:
        sock, _ = listener.accept()
        pending = bytearray()
        while n := sock.recv_into(rbuf):
            pending += rbuf[:n]
            out = _echo_answers(pending)
            if out:
                sock.sendall(b"".join(out))
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--writes", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server")
    parser.add_argument(
        "--profile", action="store_true", help="per-command costs of the PciDevice rows instead"
    )
    parser.add_argument("--serve-echo", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--io", default="trio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        import trio

        if args.io == "thread":
            serve_echo_blocking(args.serve_echo)
        else:
            trio.run(serve_echo, args.serve_echo)
        return
    build()
    if args.profile:
        profile(args.reads, args.writes)
        return
    from mdevcore.vfio_user.libvfio_user_ffi import available

    missing = available()
    servers = [s for s in SERVERS if s[3] == "native" or missing is None]
    if missing is not None:
        print(f"(no libvfio-user row: {missing})")
    # samples[(label, client)] = [(median, p99, rate), ...], one per round.
    # Rounds interleave the servers so a noisy neighbour hits them alike.
    samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vu-bench-") as d:
        for round_ in range(args.rounds):
            for i, (label, device, spin_us, transport, io) in enumerate(servers):
                path = os.path.join(d, f"{round_}-{i}.sock")
                proc = start_server(device, spin_us, path, transport, io)
                try:
                    for client_name, fn in (("python", python_client), ("C", c_client)):
                        result = fn(path, args.reads, args.writes)
                        samples.setdefault((label, client_name), []).append(result)
                finally:
                    proc.terminate()
                    proc.wait()
    rows = [
        (label, client, *(statistics.median(col) for col in zip(*runs, strict=True)))
        for (label, client), runs in samples.items()
    ]
    floor = {client: med for label, client, med, _, _ in rows if label == C_FLOOR}
    peer = {client: med for label, client, med, _, _ in rows if label == LIBVFIO_USER}
    print(
        f"REGION_READ 4 bytes: {args.reads} round trips; REGION_WRITE No_reply: {args.writes}; "
        f"median of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'server':<26}{'client':<8}{'median us':>10}{'p99 us':>9}{'x C':>7}{'x lvu':>7}"
          f"{'posted msg/s':>14}")  # fmt: skip
    for label, client, med, p99, rate in rows:
        ratio = med / floor[client]
        lvu = f"{med / peer[client]:>7.2f}" if client in peer else f"{'-':>7}"
        print(f"{label:<26}{client:<8}{med:>10.2f}{p99:>9.2f}{ratio:>7.2f}{lvu}{rate:>14,.0f}")


def profile(reads: int, writes: int) -> None:
    """The PciDevice rows with the server's --profile: its tables go to stderr."""
    with tempfile.TemporaryDirectory(prefix="vu-prof-") as d:
        for io in ("trio", "thread"):
            path = os.path.join(d, f"{io}.sock")
            proc = start_server("PciBench", 0.0, path, "native", io, profile=True)
            try:
                for client_name, fn in (("python", python_client), ("C", c_client)):
                    med, _, rate = fn(path, reads, writes)
                    print(f"--- io {io}, {client_name} client: median {med:.2f} us, "
                          f"posted {rate:,.0f} msg/s (profiled)", flush=True)  # fmt: skip
                    time.sleep(0.2)  # the server prints its table when the client leaves
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()

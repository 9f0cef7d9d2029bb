"""Reliability soak: real workloads on several devices of one daemon while
another device is fuzzed and clients are killed at random.

    .venv/bin/python benchmarks/reliability_soak.py [--seconds 600] [--seed N]

One ``mdevd serve`` process (the real daemon, its mirror mounted) holds:

* a pds NVMe VF (bound to pds_vfio through the mirror) driven by the NVMe
  guest-driver workload (write/verify against a journal);
* two mtty-2 cards, each carrying the mtty byte-stream workload (every
  byte checked, some always in flight in the RX FIFOs);
* an mtty-1 card fed random and mutated vfio-user streams (with fds), over
  connections that are often cut in the middle;
* an mtty-1 card whose clients are killed mid-request (a request sent, the
  socket closed before the reply), then reconnect and check the card.

At the end every workload is verified, every device must still answer, and
the daemon's open fds, RSS and log size are compared with the start.  Prints
the figures; exits 1 on any mismatch, dead device, leaked fd or daemon exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "vfio_user")]

from vfio_user_fuzzgen import make_fds, mutate, random_message  # noqa: E402

from mdevcore.migration.guest_memory import GuestMemory  # noqa: E402
from mdevcore.migration.workloads.mtty import MttyWorkload  # noqa: E402
from mdevcore.migration.workloads.nvme import NvmeWorkload  # noqa: E402
from mdevcore.vfio_user.client import Client  # noqa: E402
from mdevcore.vfio_user.constants import FLAG_ERROR, Command  # noqa: E402
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS, Framer  # noqa: E402

MDEVD = [sys.executable, "-c", "import sys; from mdevcore.daemon.cli import main; sys.exit(main())"]
MTTY_TYPES = "devices/virtual/mtty/mtty/mdev_supported_types"
PF, VF = "0000:60:00.0", "0000:60:00.1"
CONFIG = 7
MTTY_ID = bytes.fromhex("48435332")  # vendor 4348, device 3253, little-endian


@dataclasses.dataclass
class Report:
    seconds: float = 0.0
    fuzz_messages: int = 0
    fuzz_connections: int = 0
    fuzz_errnos: Counter[str] = dataclasses.field(default_factory=Counter)
    kills: int = 0
    churn_checks: int = 0
    workload_stats: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    mismatches: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    rss_kib: tuple[int, int] = (0, 0)
    log_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.failures


# --- the daemon -------------------------------------------------------------------


class Daemon:
    def __init__(self, base: Path) -> None:
        self.sysfs, self.run_dir = base / "sys", base / "run"
        self.log_path = base / "mdevd.log"
        args = ["serve", "--sysfs", str(self.sysfs), "--run-dir", str(self.run_dir),
                "--parent-opt", "pds.total_vfs=2", "--parent-opt", "pds.ns_size=64M",
                "--parent-opt", "pds.doorbells=mmap"]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*MDEVD, *args], stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        out = b""
        while b"mdevd: ready\n" not in out:
            ready, _, _ = select.select([self.proc.stdout], [], [], 60)
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                self.proc.kill()
                raise RuntimeError(f"mdevd did not start: {self.log_path.read_text()[-2000:]}")
            out += chunk

    def write(self, rel: str, text: str) -> None:
        (self.sysfs / rel).write_text(text)

    def mtty(self, kind: str) -> str:
        dev = uuid.uuid4()
        self.write(f"{MTTY_TYPES}/mtty-{kind}/create", f"{dev}\n")
        return str(self.run_dir / f"{dev}.sock")

    def pds_vf(self) -> str:
        # The seed's setup flow (tests/pds/pds_setup.sh), without live migration.
        self.write(f"class/pci_bus/0000:60/device/{PF}/sriov_drivers_autoprobe", "0\n")
        self.write(f"bus/pci/drivers/pds_core/{PF}/sriov_numvfs", "1\n")
        self.write(f"class/pci_bus/0000:60/device/{VF}/driver_override", "pds_vfio\n")
        self.write("bus/pci/drivers/pds_vfio/bind", f"{VF}\n")
        return str(self.run_dir / f"{VF}.sock")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# --- the workers --------------------------------------------------------------------


def run_workload(name: str, wl: NvmeWorkload | MttyWorkload, sock: str, mem_size: int,
                 deadline: float, report: Report, lock: threading.Lock) -> None:  # fmt: skip
    try:
        with GuestMemory(mem_size, name=name) as mem:
            client = Client(sock, timeout=30)
            try:
                client.negotiate()
                mem.map_into(client)
                wl.start(client, mem)
                while time.monotonic() < deadline:
                    wl.run_for(0.5)
                wl.quiesce()
                if isinstance(wl, NvmeWorkload):
                    wl.drain()
                try:
                    wl.verify()
                except AssertionError as e:
                    with lock:
                        report.mismatches.append(f"{name}: {e}")
                with lock:
                    report.workload_stats[name] = wl.stats()
            finally:
                wl.close()
                client.close()
    except Exception as e:  # a dead device or daemon shows here
        with lock:
            report.failures.append(f"{name}: {e!r}")


def fuzz(sock: str, rng: random.Random, deadline: float, report: Report,
         lock: threading.Lock) -> None:  # fmt: skip
    """Random and mutated streams, each on a fresh connection, often cut short."""
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        sent = 0
        try:
            s.connect(sock)
            body = struct.pack("<HH", 0, 0) + b'{"capabilities":{"max_msg_fds":8}}\0'
            s.sendall(HEADER.pack(0xFFFF, Command.VERSION, 16 + len(body), 0, 0) + body)
            for i in range(rng.choice([1, 10, 100, 400])):
                _flags, raw = random_message(rng, i)
                if rng.random() < 0.1:
                    raw = mutate(rng, raw)
                fds = make_fds(rng) if rng.random() < 0.05 else []
                try:
                    if fds:
                        s.sendmsg(
                            [raw],
                            [
                                (
                                    socket.SOL_SOCKET,
                                    socket.SCM_RIGHTS,
                                    struct.pack(f"{len(fds)}i", *fds),
                                )
                            ],
                        )
                    else:
                        s.sendall(raw)
                finally:
                    for fd in fds:
                        os.close(fd)
                sent += 1
            kill = rng.random() < 0.3  # cut the connection without reading the replies
            errnos = Counter[str]() if kill else _drain_errors(s)
        except OSError:
            kill, errnos = True, Counter()  # the server closed a framing-broken stream
        finally:
            s.close()
        with lock:
            report.fuzz_messages += sent
            report.fuzz_connections += 1
            report.kills += int(kill)
            report.fuzz_errnos.update(errnos)


def _drain_errors(s: socket.socket) -> Counter[str]:
    """Read what the server answered (briefly) and count the error replies by errno."""
    framer = Framer(1 << 30)
    found: Counter[str] = Counter()
    s.settimeout(0.2)
    try:
        while chunk := s.recv(1 << 16):
            framer.feed(chunk)
    except (TimeoutError, OSError):
        pass
    while (m := framer.next_message()) is not None:
        if m.flags & FLAG_ERROR:
            found[errno.errorcode.get(m.error, str(m.error))] += 1
    framer.close()
    return found


def churn(sock: str, rng: random.Random, deadline: float, report: Report,
          lock: threading.Lock) -> None:  # fmt: skip
    """Clients killed mid-request; each next client must find the card intact."""
    while time.monotonic() < deadline:
        try:
            with Client(sock, timeout=10) as c:
                c.negotiate()
                if c.region_read(CONFIG, 0, 4) != MTTY_ID:
                    raise AssertionError("mtty identity changed")
                for _ in range(rng.randrange(1, 50)):
                    c.region_write(rng.choice([0]), rng.randrange(8), bytes([rng.randrange(256)]))
                c.send(Command.REGION_READ, REGION_ACCESS.pack(0, CONFIG, 4))  # never read
            with lock:
                report.kills += 1
                report.churn_checks += 1
        except Exception as e:
            with lock:
                report.failures.append(f"churn: {e!r}")
            return


# --- the soak -------------------------------------------------------------------------


def soak(seconds: float, seed: int, base: Path, *, nvme: bool = True) -> Report:
    report = Report()
    daemon = Daemon(base)
    try:
        vf = daemon.pds_vf()
        streams = [daemon.mtty("2"), daemon.mtty("2")]
        fuzzed, churned = daemon.mtty("1"), daemon.mtty("1")
        time.sleep(0.2)
        fds_before, rss_before = daemon.fds(), daemon.rss_kib()
        log_before = daemon.log_path.stat().st_size
        lock = threading.Lock()
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        start = time.monotonic()
        workers = [
            *([threading.Thread(target=run_workload, args=(
                "nvme", NvmeWorkload(queues=4, depth=16, span_bytes=32 << 20, seed=seed),
                vf, 32 << 20, deadline, report, lock))] if nvme else []),
            *(threading.Thread(target=run_workload, args=(
                f"mtty{i}", MttyWorkload(), sock, 4 << 20, deadline, report, lock))
              for i, sock in enumerate(streams)),
            threading.Thread(target=fuzz, args=(
                fuzzed, random.Random(rng.random()), deadline, report, lock)),
            threading.Thread(target=churn, args=(
                churned, random.Random(rng.random()), deadline, report, lock)),
        ]  # fmt: skip
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        report.seconds = time.monotonic() - start
        if daemon.proc.poll() is not None:
            report.failures.append(f"mdevd exited with {daemon.proc.returncode}")
            return report
        for sock in [vf, *streams, fuzzed, churned]:  # every device still answers
            try:
                with Client(sock, timeout=10) as c:
                    c.negotiate()
                    c.region_read(CONFIG, 0, 4)
            except Exception as e:
                report.failures.append(f"{Path(sock).name} does not answer: {e!r}")
        time.sleep(0.5)  # let the daemon close what the last clients left
        report.fds = (fds_before, daemon.fds())
        report.rss_kib = (rss_before, daemon.rss_kib())
        report.log_bytes = daemon.log_path.stat().st_size - log_before
        if report.fds[1] > report.fds[0]:
            report.failures.append(f"daemon fds {report.fds[0]} -> {report.fds[1]}")
    finally:
        rc = daemon.stop()
        if rc != 0:
            report.failures.append(f"mdevd stopped with {rc}")
    return report


def show(report: Report, seed: int) -> None:
    print(f"soak seed {seed}: {report.seconds:.0f} s")
    rate = report.fuzz_messages / max(report.seconds, 1e-9)
    print(f"  fuzzed device: {report.fuzz_messages:,} messages ({rate:,.0f}/s) "
          f"over {report.fuzz_connections:,} connections")  # fmt: skip
    top = ", ".join(f"{k} {v:,}" for k, v in report.fuzz_errnos.most_common(6)) or "none read"
    print(f"    error replies read: {top}")
    print(f"  clients killed: {report.kills:,} (churn card checked intact {report.churn_checks:,}"
          " times)")  # fmt: skip
    for name, stats in sorted(report.workload_stats.items()):
        print(f"  {name}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())))
    print(f"  daemon fds: {report.fds[0]} -> {report.fds[1]}; RSS: {report.rss_kib[0]:,} KiB -> "
          f"{report.rss_kib[1]:,} KiB; log: {report.log_bytes:,} bytes")  # fmt: skip
    for line in report.mismatches + report.failures:
        print(f"  FAIL {line}")
    print("  result: " + ("ok" if report.ok else "FAILED"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-nvme", action="store_true", help="leave the NVMe workload out")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    with tempfile.TemporaryDirectory(prefix="soak-") as d:
        report = soak(args.seconds, seed, Path(d), nvme=not args.no_nvme)
        if not report.ok:  # keep the daemon's log for the post-mortem
            kept = Path(tempfile.gettempdir()) / f"soak-{seed}-mdevd.log"
            shutil.copyfile(Path(d) / "mdevd.log", kept)
            print(f"  daemon log kept at {kept}")
    show(report, seed)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a served request's time goes: engine, device, socket calls, per command.

``--profile`` (``python -m mdevcore.vfio_user``, benchmarks/vfio_user_rtt.py)
serves each connection with a :class:`ConnectionProfile`: every message is
handled on its own (``Connection.process(1)``) between two
``time.perf_counter_ns`` reads, the backend is wrapped so each of its calls
is timed too, and the server times its receive and send calls (not the
wait for the client: it polls before a timed receive).  Per command:

* device   -- inside the backend's methods (the PciDevice layer and the
  parent's hooks);
* engine   -- the rest of ``process``: framing, parsing, checks, the reply;
* syscalls -- recvmsg and send, shared evenly by the messages of one batch.

The table gives medians (a loaded machine's preemptions land in the
means; the last column is the mean of the sum, to show them).  What is
left of a round trip beyond these is the client, the kernel's wake-ups
and (trio I/O) the scheduler.  Profiling adds two clock reads per message
and per backend call, about 0.2 us each: compare profiled runs with each
other, not with unprofiled ones.  Samples are kept for the first
``MAX_SAMPLES`` messages of each command.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from mdevcore.vfio_user.backend import REQUEST_METHODS
from mdevcore.vfio_user.constants import HEADER_SIZE, Command
from mdevcore.vfio_user.wire import HEADER

_TIMED = REQUEST_METHODS  # the backend methods the engine calls
_NAMES = {int(c): c.name for c in Command}
MAX_SAMPLES = 1 << 20


@dataclasses.dataclass(slots=True)
class CommandCost:
    """Per-message samples (ns) of one command."""

    count: int = 0
    engine: list[int] = dataclasses.field(default_factory=list)
    device: list[int] = dataclasses.field(default_factory=list)
    syscalls: list[int] = dataclasses.field(default_factory=list)

    def add(self, total_ns: int, device_ns: int) -> None:
        self.count += 1
        if len(self.engine) < MAX_SAMPLES:
            self.engine.append(total_ns - device_ns)
            self.device.append(device_ns)


class _TimedBackend:
    """The backend with each engine-called method timed into the current command."""

    def __init__(self, backend: Any, profile: ConnectionProfile) -> None:
        self._backend = backend
        for name in _TIMED:
            setattr(self, name, self._timed(getattr(backend, name), profile))

    @staticmethod
    def _timed(method: Callable[..., Any], profile: ConnectionProfile) -> Callable[..., Any]:
        clock = time.perf_counter_ns

        def timed(*args: Any) -> Any:
            t0 = clock()
            try:
                return method(*args)
            finally:
                profile.device_ns += clock() - t0

        return timed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class ConnectionProfile:
    """Per-command costs of one connection (see the module doc)."""

    def __init__(self) -> None:
        self.commands: dict[int, CommandCost] = {}
        self.device_ns = 0  # the timed backend adds here; moved to the command after each
        self.recv_ns = 0
        self.send_ns = 0
        self.recvs = 0
        self.sends = 0
        self._batch: list[CommandCost] = []
        self._batch_sys = 0

    def wrap(self, backend: Any) -> Any:
        return _TimedBackend(backend, self)

    def process(self, conn: Any, limit: int) -> list[Any]:
        """``conn.process(limit)``, one message at a time, each timed."""
        clock = time.perf_counter_ns
        results: list[Any] = []
        framer = conn.framer
        for _ in range(limit):
            buf, pos, avail = framer.peek()
            command = HEADER.unpack_from(buf, pos)[1] if avail >= HEADER_SIZE else -1
            before = conn.handled
            self.device_ns = 0
            t0 = clock()
            results += conn.process(1)
            elapsed = clock() - t0
            if conn.handled == before:
                break
            cost = self.commands.get(command)
            if cost is None:
                cost = self.commands[command] = CommandCost()
            cost.add(elapsed, self.device_ns)
            self._batch.append(cost)
        return results

    def syscall(self, ns: int) -> None:
        """A receive or send of the current batch took ``ns``."""
        self._batch_sys += ns

    def end_batch(self) -> None:
        """Share the batch's socket time among its messages."""
        if self._batch:
            share = self._batch_sys // len(self._batch)
            for cost in self._batch:
                if len(cost.syscalls) < len(cost.engine):
                    cost.syscalls.append(share)
        self._batch.clear()
        self._batch_sys = 0

    def report(self, title: str) -> str:
        """A table: per command, median microseconds per message."""
        lines = [
            f"profile {title}: median us per message ({self.recvs} receives, {self.sends} sends)",
            f"{'command':<26}{'count':>9}{'engine':>9}{'device':>9}{'syscalls':>10}"
            f"{'sum':>9}{'mean sum':>10}",
        ]
        for command, c in sorted(self.commands.items(), key=lambda kv: -kv[1].count):
            if not c.engine:
                continue
            syscalls = c.syscalls or [0]
            engine, device, sys_us = (
                statistics.median(v) / 1000 for v in (c.engine, c.device, syscalls)
            )
            mean = (sum(c.engine) + sum(c.device)) / len(c.engine) + sum(syscalls) / len(syscalls)
            name = _NAMES.get(command, f"command {command}")
            lines.append(
                f"{name:<26}{c.count:>9}{engine:>9.2f}{device:>9.2f}{sys_us:>10.2f}"
                f"{engine + device + sys_us:>9.2f}{mean / 1000:>10.2f}"
            )
        return "\n".join(lines)

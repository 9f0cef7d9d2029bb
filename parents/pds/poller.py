"""Polling mmapped doorbells on a thread of their own, with a back-off.

Why a thread: in mmap mode the guest's doorbell writes land in shared
memory and nothing tells us, so someone must look.  From trio, every wait
is an epoll timeout, and anything below 1 ms costs 1 ms, so a poller there
either spins on the scheduler (a core burnt) or adds a millisecond to a
queue-depth-1 round trip.  A thread sleeps with nanosleep: tens of
microseconds after activity, growing to ``SLEEP_MAX`` when the queues are
quiet, and blocking on the VF's wake-up eventfd (register writes, reset,
migration) when there is nothing to poll.

It runs only when the VF is served on a connection thread
(``mdevcore.vfio_user.locking``): then every other access to the device
holds ``device_lock``, which the poller takes for each look.  Served by
trio alone, hooks run without that lock, so the VF keeps its trio loop.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Callable
from typing import Protocol

from mdevcore.nvme import NvmeController
from mdevcore.parents.pds.wakeup import Wakeup
from mdevcore.vfio_user.locking import DeviceLock

# After the last command, sleep STEP_ACTIVE between looks for ``spin``
# seconds (a guest at queue depth 1 rings again well within that), then
# double the sleep each idle look up to SLEEP_MAX.  With Linux's default
# 50 us timer slack a look comes about every 70 us.  A 1 us slack (prctl)
# looks every 30 us but costs a core's worth of wake-ups; one try of it was
# drowned in the host's load (trapped, untouched by it, fell as much), so
# it is left out until measured on a quiet machine.
STEP_ACTIVE = 20e-6
SLEEP_MAX = 8e-3


class PolledDevice(Protocol):
    @property
    def controller(self) -> NvmeController: ...

    @property
    def device_lock(self) -> DeviceLock: ...

    def executing(self) -> bool: ...


def poll_loop(
    device: PolledDevice, wake: Wakeup, spin: float, stopping: Callable[[], bool]
) -> None:
    """The thread's body: process doorbells until ``stopping()`` (then wake it)."""
    ctrl = device.controller
    clock = time.monotonic
    idle_since = clock()
    backoff = STEP_ACTIVE
    poller = select.poll()
    poller.register(wake.fd, select.POLLIN)
    while True:
        with device.device_lock:
            # Under the lock: on_close (which sets it) may have run since the last look.
            if stopping():
                return
            if not device.executing():
                deadline: float | None = math.inf  # stopped for migration: touch nothing
                more = active = False
            else:
                before = ctrl.commands_done
                more = ctrl.process()
                active = ctrl.commands_done != before
                deadline = ctrl.next_deadline()
                if deadline is not None and ctrl.clock() >= deadline:
                    ctrl.tick()
                    continue
                if ctrl.ready:
                    deadline = min(
                        deadline or math.inf, _poll_at(clock(), idle_since, spin, backoff)
                    )
        if more:
            continue
        now = clock()
        if active:
            idle_since, backoff = now, STEP_ACTIVE
        elif now - idle_since >= spin:
            backoff = min(backoff * 2, SLEEP_MAX)
        wait = math.inf if deadline is None else deadline - now
        if wait < 1e-3:
            # poll() counts milliseconds; nanosleep is finer.  A wake-up
            # meanwhile is seen on the next look anyway.
            if wait > 0:
                time.sleep(wait)
            wake.clear()
        else:
            poller.poll(None if wait == math.inf else math.ceil(wait * 1000))
            wake.clear()


def _poll_at(now: float, idle_since: float, spin: float, backoff: float) -> float:
    """When the doorbells should next be looked at."""
    if now - idle_since < spin:
        return now + STEP_ACTIVE
    return now + backoff

"""Connections served on their own thread (``DeviceServer(io="thread")``).

What the protocol answers is covered by test_vfio_user_server.py, which
runs in both I/O modes; here what only the thread mode has: which thread
runs the device, the device lock held by both sides, cancellation ending
the thread, the trio side never waiting on a client, and the profile.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from mdevcore.daemon import cli
from mdevcore.daemon.servers import TransportChoice
from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.vfio_user import threaded
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.constants import Command
from mdevcore.vfio_user.locking import in_locked_run, run_locked
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.vfio_user.threaded import ThreadedClient
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

T = TypeVar("T")
IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x0042, class_code=0xFF0000)


class Recorder(PciDevice):
    """BAR0 of plain memory; its hooks note their thread and the lock."""

    def __init__(self) -> None:
        super().__init__(IDENTITY)
        self.add_bar(0, 0x10000, BarKind.MEM32)
        self.hook_threads: set[int] = set()
        self.lock_held: list[bool] = []

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        self.hook_threads.add(threading.get_ident())
        self.lock_held.append(self.device_lock._is_owned())  # type: ignore[attr-defined]
        return super().bar_read(bar, offset, size)

    def on_reset(self) -> None:
        self.lock_held.append(self.device_lock._is_owned())  # type: ignore[attr-defined]


class WithBackground(Recorder):
    """A background of its own: assumed to talk to it through trio."""

    async def background(self) -> None:
        await trio.sleep_forever()


class DeclaredSafe(WithBackground):
    """The same, declaring its hooks touch no trio object."""

    thread_safe_hooks = True


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@asynccontextmanager
async def serving(device: PciDevice, path: str, **kw: object) -> AsyncIterator[DeviceServer]:
    async with trio.open_nursery() as nursery:
        server = DeviceServer(device, path, name="dev", **kw)  # type: ignore[arg-type]
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def connect(path: str) -> Client:
    c = Client(path)
    c.negotiate()
    return c


async def test_hooks_run_on_the_connection_thread_with_the_lock_held(sockdir: str) -> None:
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path) as server:  # thread is the default
        assert server.io == "thread" and server.status()["io"] == "thread"

        def go() -> None:
            with connect(path) as c:
                c.region_write(0, 0x10, b"abcd")
                assert c.region_read(0, 0x10, 4) == b"abcd"
                c.reset()

        await in_thread(go)
    assert dev.hook_threads and threading.get_ident() not in dev.hook_threads
    assert dev.lock_held and all(dev.lock_held)


@pytest.mark.parametrize(
    ("cls", "io", "expected"),
    [
        (Recorder, "trio", "trio"),
        (WithBackground, "thread", "trio"),
        (DeclaredSafe, "thread", "thread"),
    ],
)
async def test_which_devices_get_a_thread(
    sockdir: str, cls: type[Recorder], io: str, expected: str
) -> None:
    dev = cls()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path, io=io) as server:
        assert server.io == expected

        def go() -> None:
            with connect(path) as c:
                assert c.region_read(0, 0, 4) == bytes(4)

        await in_thread(go)
    on_trio = threading.get_ident() in dev.hook_threads
    assert on_trio == (expected == "trio")


async def test_background_holds_the_lock_except_while_it_awaits() -> None:
    lock = threading.RLock()
    go = trio.Event()
    seen: list[bool] = []

    async def background() -> str:
        seen.append(lock._is_owned())  # type: ignore[attr-defined]
        await go.wait()
        seen.append(lock._is_owned())  # type: ignore[attr-defined]
        with pytest.raises(trio.TooSlowError):  # trio's exceptions come through
            with trio.fail_after(0):
                await trio.sleep(1)
        return "done"

    def other_thread_takes_it() -> bool:
        if not lock.acquire(timeout=5):
            return False
        lock.release()
        return True

    async with trio.open_nursery() as nursery:
        result: list[str] = []

        async def run() -> None:
            result.append(await run_locked(background, lock))

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        assert await in_thread(other_thread_takes_it)  # free while background awaits
        go.set()
    assert seen == [True, True] and result == ["done"]
    assert not lock._is_owned()  # type: ignore[attr-defined]


async def test_a_task_knows_it_runs_locked_and_its_siblings_do_not() -> None:
    """What a device's background asks to learn its connections are on threads."""
    lock = threading.RLock()
    seen: dict[str, bool] = {}

    async def background() -> None:
        await trio.sleep(0)
        seen["locked"] = in_locked_run()

    async def sibling() -> None:
        await trio.sleep(0)
        seen["sibling"] = in_locked_run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_locked, background, lock)
        nursery.start_soon(sibling)
    assert seen == {"locked": True, "sibling": False}
    assert not in_locked_run()


async def test_cancelling_run_locked_cancels_the_coroutine() -> None:
    lock = threading.RLock()
    cleaned: list[bool] = []

    async def background() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(lock._is_owned())  # type: ignore[attr-defined]

    with trio.move_on_after(0.05):
        await run_locked(background, lock)
    assert cleaned == [True]


async def test_disconnect_and_cancel_end_the_thread(sockdir: str) -> None:
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    with trio.fail_after(10):
        await _disconnect_then_cancel(dev, path)


async def _disconnect_then_cancel(dev: Recorder, path: str) -> None:
    async with serving(dev, path) as server:
        c = await in_thread(lambda: connect(path))
        await in_thread(lambda: c.region_read(0, 0, 4))
        assert server.connected
        server.disconnect()  # the thread is blocked in recvmsg: shut down, joined
        with pytest.raises((EOFError, ConnectionResetError)):
            await in_thread(c.recv_message)
        c.close()
        with trio.fail_after(5):
            while server.connected:
                await trio.sleep(0.005)
        # The next client is served as usual; then cancel with it connected.
        c = await in_thread(lambda: connect(path))
        assert await in_thread(lambda: c.region_read(0, 0, 4)) == bytes(4)
    # serving() cancelled the nursery with a client connected: serve()
    # returned, so the thread was stopped and joined.
    c.close()
    assert not os.path.exists(path)


async def test_trio_side_never_waits_for_a_client_that_does_not_read(sockdir: str) -> None:
    """The thread blocks in send (the client reads nothing) without the lock."""
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path) as server:
        c = await in_thread(lambda: connect(path))
        raw = c.sock
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        read = HEADER.pack(1, Command.REGION_READ, 32, 0, 0) + REGION_ACCESS.pack(0, 0, 0x8000)
        raw.setblocking(False)
        sent = 0
        with trio.fail_after(10):
            # Until our send buffer is full too: the server is stuck sending replies.
            while True:
                try:
                    raw.send(read)
                    sent += 1
                except BlockingIOError:
                    break
                if sent % 64 == 0:
                    await trio.sleep(0.001)
        await trio.sleep(0.1)
        assert sent > 4 and server.connected
        # The trio side takes the lock (reset, status) while the thread is blocked.
        assert dev.device_lock.acquire(timeout=2)
        dev.device_lock.release()
        dev.reset()
        assert server.status()["connected"]
        server.disconnect()  # ends the blocked send too
        with trio.fail_after(5):
            while server.connected:
                await trio.sleep(0.005)
        c.close()


async def test_profile_prints_per_command_costs(
    sockdir: str, capfd: pytest.CaptureFixture[str]
) -> None:
    for io in ("thread", "trio"):
        dev = Recorder()
        path = os.path.join(sockdir, f"{io}.sock")
        async with serving(dev, path, io=io, profile=True) as server:

            def go(path: str = path) -> None:
                with connect(path) as c:
                    for _ in range(10):
                        c.region_read(0, 0, 4)
                    c.region_write(0, 0, b"abcd")
                    with pytest.raises(OSError) as info:
                        c.region_read(9, 0, 4)
                    assert info.value.errno == errno.EINVAL

            await in_thread(go)
            with trio.fail_after(5):
                while server.connected:
                    await trio.sleep(0.005)
        err = capfd.readouterr().err
        rows = {line.split()[0]: line.split() for line in err.splitlines() if line}
        assert "profile" in rows and rows["REGION_READ"][1] == "11", err
        assert rows["REGION_WRITE"][1] == "1" and rows["VERSION"][1] == "1"
        engine, device, syscalls = map(float, rows["REGION_READ"][2:5])
        assert engine > 0 and device > 0 and syscalls > 0


async def test_both_sides_at_once_keep_the_device_whole(sockdir: str) -> None:
    """A client hammering the device while trio resets it and reads status."""
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path) as server:

        def client() -> int:
            done = 0
            with connect(path) as c:
                for i in range(300):
                    value = i.to_bytes(4, "little")
                    c.region_write(0, 0x100, value)
                    assert c.region_read(0, 0x100, 4) == value  # reset keeps BAR memory
                    done += 1
            return done

        async with trio.open_nursery() as nursery:
            results: list[int] = []

            async def run_client() -> None:
                results.append(await in_thread(client))

            nursery.start_soon(run_client)
            resets = 0
            while not results:
                dev.reset()  # trio side, under the lock
                resets += 1
                assert isinstance(server.status()["requests"], int)
                await trio.sleep(0)
    assert results == [300] and resets > 1
    assert dev.lock_held and all(dev.lock_held)  # every hook, either side, under the lock


def _burst(path: str, server: DeviceServer) -> ThreadedClient:
    """50 writes and reads back to back on one connection; its server side."""
    with connect(path) as c:
        for i in range(50):
            c.region_write(0, 4 * i, i.to_bytes(4, "little"))
            assert c.region_read(0, 4 * i, 4) == i.to_bytes(4, "little")
        client = server._client
        assert isinstance(client, ThreadedClient)
        return client


async def test_spinning_thread_catches_a_bursting_client(sockdir: str) -> None:
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path, spin_us=2000) as server:
        client = await in_thread(partial(_burst, path, server))
        # Each request follows our reply within microseconds: polled, not waited for.
        assert client.spin_hits > 50


class Spinner(Recorder):
    request_spin_us = 1500.0


def test_a_device_sets_how_long_its_connection_thread_spins(sockdir: str) -> None:
    path = os.path.join(sockdir, "d.sock")
    assert DeviceServer(Spinner(), path, name="s", io="thread").spin_ns == 1_500_000
    # A trio task never spins on a device's word: it would hold up the whole run.
    assert DeviceServer(Spinner(), path, name="s", io="trio").spin_ns == 0
    assert DeviceServer(Spinner(), path, name="s", spin_us=0).spin_ns == 0  # the caller's word wins
    assert DeviceServer(Recorder(), path, name="s").spin_ns == 0


async def test_posted_writes_keep_a_client_in_its_burst(sockdir: str) -> None:
    """A doorbell has no reply: the burst is timed from when a request was done with."""
    dev = Spinner()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path) as server:

        def go() -> None:
            with connect(path) as c:
                time.sleep(0.02)  # idle well past the spin: the last reply is long ago
                for i in range(100):
                    c.region_write(0, 4 * (i % 8), i.to_bytes(4, "little"), no_reply=True)
                    time.sleep(300e-6)  # one at a time, each well within the spin
                assert c.region_read(0, 0, 4) == (96).to_bytes(4, "little")  # all were served
                client = server._client
                assert isinstance(client, ThreadedClient)
                assert client.spin_hits > 50

        await in_thread(go)


def test_mdevd_serve_spin_us_reaches_every_native_server(sockdir: str) -> None:
    args = cli._parser().parse_args(["serve", "--spin-us", "20"])
    choice = TransportChoice(io="thread", spin_us=args.spin_us)
    server = choice(Spinner(), Path(sockdir) / "d.sock", "s")
    assert isinstance(server, DeviceServer) and server.spin_ns == 20_000  # over the device's
    default = TransportChoice()(Spinner(), Path(sockdir) / "e.sock", "s")
    assert isinstance(default, DeviceServer) and default.spin_ns == 1_500_000
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--spin-us", "-5"])


async def test_no_poll_without_a_free_spin_slot(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pollers are capped per process: with every slot taken a thread waits in recvmsg."""
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(threaded, "_spin_slots", slots)
    dev = Recorder()
    path = os.path.join(sockdir, "d.sock")
    async with serving(dev, path, spin_us=2000) as server:
        assert slots.acquire(blocking=False)  # another connection polls
        refused = await in_thread(partial(_burst, path, server))
        assert refused.spin_hits == 0 and refused.spin_refused > 50
        slots.release()
        polled = await in_thread(partial(_burst, path, server))
        assert polled.spin_hits > 50 and polled.spin_refused == 0
    # Every poll gave its slot back (BoundedSemaphore: one release too many raises).
    assert slots.acquire(blocking=False)

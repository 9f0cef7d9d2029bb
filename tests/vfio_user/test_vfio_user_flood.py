"""A client flooding its device: fair turns for the others, counters, a bounded log."""

from __future__ import annotations

import logging
import os

import pytest
import trio
from vfio_user_fakedev import FakeDevice

from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.constants import FLAG_NO_REPLY, Command
from mdevcore.vfio_user.server import TURN_MESSAGES, DeviceServer
from mdevcore.vfio_user.stats import LOG_BURST
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

PAIRS = 1000  # bad posted requests of each of two kinds: 52 KB, fits the socket buffer


def bad_posted_requests(pairs: int) -> bytes:
    bad_write = REGION_ACCESS.pack(0, 99, 4) + b"abcd"  # no region 99: EINVAL
    one = HEADER.pack(1, Command.REGION_WRITE, 16 + len(bad_write), FLAG_NO_REPLY, 0) + bad_write
    one += HEADER.pack(2, 99, 16, FLAG_NO_REPLY, 0)  # no command 99: EINVAL
    return one * pairs


class HookedDevice(FakeDevice):
    """A FakeDevice that calls ``hook`` on its region accesses (in the server's thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook = lambda: None

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self.hook()
        return super().region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.hook()
        super().region_write(index, offset, data)


async def test_a_flood_does_not_hold_up_another_device(sockdir: str) -> None:
    flooded_dev, victim_dev = HookedDevice(), HookedDevice()
    async with trio.open_nursery() as nursery:
        flooded = DeviceServer(flooded_dev, os.path.join(sockdir, "f.sock"), name="flooded")
        victim = DeviceServer(victim_dev, os.path.join(sockdir, "v.sock"), name="victim")
        await nursery.start(flooded.serve)
        await nursery.start(victim.serve)
        flooder = Client(flooded.path)
        victim_client = Client(victim.path)
        try:
            await trio.to_thread.run_sync(flooder.negotiate)
            await trio.to_thread.run_sync(victim_client.negotiate)
            # The victim's request arrives while the flood is being handled:
            # sent from inside the flooded device's first access.
            sent: list[int] = []
            request_sent = trio.Event()
            seen_by_victim: list[int] = []

            def send_victim_request() -> None:
                if not sent:
                    sent.append(
                        victim_client.send(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4))
                    )
                    request_sent.set()

            flooded_dev.hook = send_victim_request
            victim_dev.hook = lambda: seen_by_victim.append(flooded.stats.requests)
            flooder.sock.sendall(bad_posted_requests(PAIRS))
            await request_sent.wait()
            reply = await trio.to_thread.run_sync(victim_client.wait_reply, sent[0])
            assert reply.payload[16:] == bytes(4)
            # the flooder's reply comes after all it sent
            flooder_read = flooder.send(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4))
            await trio.to_thread.run_sync(flooder.wait_reply, flooder_read)
        finally:
            flooder.close()
            victim_client.close()
        nursery.cancel_scope.cancel()
    # Served within a few turns of the flood (TURN_MESSAGES each), not after
    # its 2000 messages as when one turn took all that had arrived.
    assert TURN_MESSAGES <= 50
    assert seen_by_victim and seen_by_victim[0] < 200, seen_by_victim
    assert flooded.stats.requests == 1 + 2 * PAIRS + 1  # VERSION, flood, read
    assert victim.stats.requests == 2
    flooded_dev.close()
    victim_dev.close()


async def test_failures_are_counted_and_logged_briefly(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    device = FakeDevice()
    async with trio.open_nursery() as nursery:
        server = DeviceServer(device, os.path.join(sockdir, "d.sock"), name="dev")
        await nursery.start(server.serve)
        with caplog.at_level(logging.INFO, logger="mdevcore.vfio_user"):
            for _ in range(2):  # a reconnecting client gets no fresh burst
                client = Client(server.path)

                def flood_then_read(client: Client = client) -> None:
                    client.negotiate()
                    client.sock.sendall(bad_posted_requests(PAIRS // 2))
                    client.wait_reply(client.send(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4)))

                try:
                    await trio.to_thread.run_sync(flood_then_read)
                finally:
                    client.close()
                while server.connected:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    device.close()
    assert server.stats.errors() == {"EINVAL REGION_WRITE": PAIRS, "EINVAL UNKNOWN": PAIRS}
    assert server.errors_text() == (
        f"EINVAL REGION_WRITE {PAIRS}\nEINVAL UNKNOWN {PAIRS}\ntotal {2 * PAIRS}\n"
    )
    assert server.stats.clients == 2
    assert server.stats.requests == 2 * (1 + PAIRS + 1)
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if "failed: EINVAL" in m]
    assert len(failed) == 2 * LOG_BURST
    assert failed[0].startswith("dev#1: msg 0x1 cmd 10 failed: EINVAL (")
    assert failed[1].startswith("dev#1: msg 0x2 cmd 99 failed: EINVAL (unknown or misdirected")
    # The first client's leaving summarises what was suppressed; the second
    # leaves within the interval, so its share waits for the next summary
    # (a client reconnecting in a loop buys no summary lines).
    summaries = [m.split(" in the last")[0] for m in messages if "more suppressed" in m]
    assert summaries == [
        f"dev: EINVAL REGION_WRITE: {PAIRS // 2 - LOG_BURST} more suppressed",
        f"dev: EINVAL UNKNOWN: {PAIRS // 2 - LOG_BURST} more suppressed",
    ]

"""Fuzz: random and mutated streams; nothing escapes, no fd leaks.

Over 100,000 messages through the sans-IO engine (the protocol rules), plus
a few thousand through the real socket server (framing, fds, reconnects).
``benchmarks/vfio_user_soak.py`` runs the same for as long as you like.
"""

from __future__ import annotations

import logging
import os
import random

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from vfio_user_fakedev import FakeDevice
from vfio_user_fuzzgen import FuzzRun, make_fds, mutate, random_message
from vfio_user_served import Served, open_fds

from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.engine import Connection

ENGINE_MESSAGES = 110_000


def test_engine_fuzz_100k_messages(caplog: object) -> None:
    logging.getLogger("mdevcore.vfio_user").setLevel(logging.ERROR)
    before = open_fds()
    device = FakeDevice()
    run = FuzzRun(device, random.Random(20261123))
    try:
        while run.messages < ENGINE_MESSAGES:
            rate = run.rng.choice([0.0, 0.0, 0.02, 0.3])
            run.stream(
                run.rng.choice([1, 10, 100, 500]),
                mutate_rate=rate,
                negotiate=run.rng.random() < 0.97,
            )
    finally:
        run.conn.framer.close()
        device.close()
        logging.getLogger("mdevcore.vfio_user").setLevel(logging.NOTSET)
    assert run.messages >= ENGINE_MESSAGES
    assert run.connections > 10  # the mutations did break framing now and then
    assert open_fds() == before


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_engine_survives_arbitrary_bytes(data: bytes, nfds: int) -> None:
    before = open_fds()
    device = FakeDevice()
    conn = Connection(device, name="hyp")
    try:
        # arbitrary bytes both before and after a valid negotiation
        conn.receive_data(data, [os.eventfd(0) for _ in range(nfds)])
        conn.process()
        conn.outgoing()
        conn2 = Connection(device, name="hyp2")
        flags_raw = random_message(random.Random(len(data)), 1)[1]
        conn2.receive_data(
            b"\1\0\1\0\x14\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0" + flags_raw + data,
            [os.eventfd(0) for _ in range(nfds)],
        )
        conn2.process()
        conn2.outgoing()
        conn2.framer.close()
    finally:
        conn.framer.close()
        device.close()
    assert open_fds() == before


SOCKET_FUZZ_MESSAGES = 1500


async def test_socket_fuzz_with_fds_and_reconnects(served: Served) -> None:
    logging.getLogger("mdevcore.vfio_user").setLevel(logging.ERROR)
    before = open_fds()
    rng = random.Random(7)

    def go() -> int:
        # How many messages get in before a mutated one makes the server
        # close the connection depends on timing: go on until enough did.
        sent = 0
        round_ = 0
        while sent < SOCKET_FUZZ_MESSAGES:
            round_ += 1
            assert round_ < 400, f"only {sent} messages got through in {round_} connections"
            with Client(served.path) as c:
                if round_ % 4:
                    c.negotiate()
                clean = True
                for i in range(100):
                    _, raw = random_message(rng, i)
                    if rng.random() < 0.1:
                        raw = mutate(rng, raw)
                        clean = False
                    fds = make_fds(rng) if rng.random() < 0.1 else []
                    try:
                        c.send_raw(raw, fds)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the server closed this connection: fine
                    finally:
                        for fd in fds:
                            os.close(fd)
                    sent += 1
                if clean and round_ % 4:
                    # well-framed traffic leaves the connection usable
                    assert c.device_info().num_regions == 10
        return sent

    try:
        sent = await trio.to_thread.run_sync(go)
        while served.server.connected:
            await trio.sleep(0)
    finally:
        logging.getLogger("mdevcore.vfio_user").setLevel(logging.NOTSET)
    assert sent >= SOCKET_FUZZ_MESSAGES
    # the device's client resources were all released; the server still works
    assert served.device.irq_fds == {} and served.device.dma == []
    assert open_fds() == before

    def check() -> None:
        with Client(served.path) as c:
            c.negotiate()
            assert c.device_info().num_regions == 10

    await trio.to_thread.run_sync(check)

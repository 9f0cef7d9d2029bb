"""Random and mutated vfio-user client streams (fuzz tests and the soak script).

``random_message`` builds a message of any command with field values drawn
near the edges that matter (valid, just invalid, absurd); ``mutate`` breaks
one at the byte level.  ``FuzzRun`` feeds streams into a sans-IO engine in
random chunks with random fds attached and checks what comes out.
"""

from __future__ import annotations

import json
import os
import random
import struct

from mdevcore.vfio_user import wire
from mdevcore.vfio_user.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_REPLY,
    FLAG_TYPE_MASK,
    Command,
)
from mdevcore.vfio_user.engine import Connection
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS, Framer

COMMANDS = [int(c) for c in Command] + [0, 14, 19, 0x7FFF, 0xFFFF]


def _pick(rng: random.Random, *choices: int) -> int:
    return rng.choice(choices)


def _u32(rng: random.Random) -> int:
    return _pick(rng, 0, 1, 4, 8, 16, 20, 24, 32, 4096, 0xFFFFFFFF, rng.getrandbits(32))


def _u64(rng: random.Random) -> int:
    return _pick(rng, 0, 1, 0x1000, 0x40000, 1 << 40, (1 << 64) - 1, rng.getrandbits(64))


def _small(rng: random.Random, hi: int) -> int:
    return rng.randrange(hi) if rng.random() < 0.8 else _u32(rng)


def random_body(rng: random.Random, cmd: int) -> bytes:
    if cmd == Command.VERSION:
        caps = rng.choice(
            [
                {},
                {"max_msg_fds": rng.choice([0, 8, 1025, -1, "x", True])},
                {"max_data_xfer_size": rng.choice([1, 4096, 0, 1 << 40])},
                {"migration": rng.choice([{}, {"pgsize": 4096}, 7, {"pgsize": "a"}])},
                {"write_multiple": rng.choice([True, 1, None])},
            ]
        )
        js = json.dumps({"capabilities": caps}).encode()
        return (
            struct.pack("<HH", _pick(rng, 0, 0, 1), rng.randrange(4))
            + js
            + (b"\0" if rng.random() < 0.9 else b"")
        )
    if cmd in (Command.REGION_READ, Command.REGION_WRITE):
        count = rng.choice([1, 2, 4, 8, 64, rng.randrange(0x5000), _u32(rng)])
        body = REGION_ACCESS.pack(_small(rng, 0x5000), _small(rng, 11), count)
        if cmd == Command.REGION_WRITE:
            n = count if count < 0x5000 and rng.random() < 0.8 else rng.randrange(64)
            body += rng.randbytes(n)
        return body
    if cmd == Command.REGION_WRITE_MULTI:
        n = rng.choice([0, 1, 3, 200, 201])
        entries = b"".join(
            wire.WRITE_MULTI_ENTRY.pack(
                _small(rng, 0x1000), _small(rng, 10), rng.randrange(10), rng.randbytes(8)
            )
            for _ in range(min(n, 201))
        )
        return wire.WRITE_MULTI_COUNT.pack(rng.choice([n, n, _u64(rng)])) + entries
    if cmd == Command.DMA_MAP:
        return wire.DmaMap.build(
            {
                "argsz": _pick(rng, 32, 32, 16),
                "flags": _pick(rng, 1, 3, 0, 16),
                "offset": _pick(rng, 0, 0x1000, 1 << 40),
                "address": rng.randrange(64) << 12 if rng.random() < 0.8 else _u64(rng),
                "size": _pick(rng, 0x1000, 0x2000, 0, (1 << 64) - 1),
            }
        )
    if cmd == Command.DMA_UNMAP:
        return wire.DmaUnmap.build(
            {
                "argsz": _pick(rng, 24, 24, 8),
                "flags": _pick(rng, 0, 0, 2, 1, 4),
                "address": rng.randrange(64) << 12,
                "size": _pick(rng, 0x1000, 0),
            }
        )
    if cmd == Command.DEVICE_SET_IRQS:
        count = _pick(rng, 0, 1, 2, 4, 5)
        flags = rng.choice([0x24, 0x21, 0x22, 0x11, 0x09, 0x0A, 0x14, 0x03, 0x40, _u32(rng)])
        data = bytes(rng.randrange(2) for _ in range(count)) if flags & 2 else b""
        body = wire.SetIrqs.build(
            {
                "argsz": 20 + len(data),
                "flags": flags,
                "index": _small(rng, 6),
                "start": _small(rng, 5),
                "count": count,
            }
        )
        return body + data
    if cmd == Command.DEVICE_FEATURE:
        flags = rng.choice([0x10001, 0x10002, 0x20002, 0x40001, 0x30001, 0x10009, _u32(rng)])
        return (
            wire.DeviceFeature.build({"argsz": _pick(rng, 8, 16, 4096, 4)})
            if False
            else (
                wire.DeviceFeature.build({"argsz": _pick(rng, 8, 16, 4096, 4), "flags": flags})
                + rng.randbytes(rng.choice([0, 8]))
            )
        )
    if cmd == Command.MIG_DATA_READ:
        size = _pick(rng, 0, 16, 4096, 1 << 21)
        return wire.MigData.build({"argsz": _pick(rng, 8 + size, 8), "size": size})
    if cmd == Command.MIG_DATA_WRITE:
        data = rng.randbytes(rng.randrange(32))
        return wire.MigData.build({"argsz": 8 + len(data), "size": _pick(rng, len(data), 3)}) + data
    if cmd in (
        Command.DEVICE_GET_INFO,
        Command.DEVICE_GET_REGION_INFO,
        Command.DEVICE_GET_REGION_IO_FDS,
        Command.DEVICE_GET_IRQ_INFO,
    ):
        size = {4: 16, 5: 32, 6: 16, 7: 16}[cmd]
        body = struct.pack(
            "<III", _pick(rng, size, 4096, 8, 31), 0 if rng.random() < 0.9 else 1, _small(rng, 11)
        )
        return (body + bytes(size))[: rng.choice([size, size, size - 1, 2])]
    if cmd in (Command.DMA_READ, Command.DMA_WRITE):
        return wire.DMA_ACCESS.pack(_u64(rng), _small(rng, 64)) + rng.randbytes(rng.randrange(16))
    return rng.randbytes(rng.choice([0, 0, 4, 16]))


def random_message(rng: random.Random, msg_id: int) -> tuple[int, bytes]:
    """(flags, bytes) of one well-framed random message."""
    cmd = rng.choice(COMMANDS)
    body = random_body(rng, cmd)
    r = rng.random()
    flags = FLAG_NO_REPLY if r < 0.15 else (FLAG_REPLY if r < 0.2 else 0)
    return flags, HEADER.pack(msg_id, cmd, 16 + len(body), flags, 0) + body


def mutate(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(4)
        if what == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif what == 1:
            del b[rng.randrange(len(b) + 1) :]
        elif what == 2:
            b += rng.randbytes(rng.randrange(32))
        elif len(b) >= 8:
            b[4:8] = struct.pack(
                "<I", rng.choice([0, 15, 16, len(b) + 4, 1 << 31, rng.getrandbits(32)])
            )
    return bytes(b)


def make_fds(rng: random.Random, memfd_size: int = 0x10000) -> list[int]:
    """A few real fds: eventfds and, sometimes, a memfd DMA can map."""
    fds = []
    for _ in range(rng.choice([1, 1, 2, 4, 9])):
        if rng.random() < 0.3:
            fd = os.memfd_create("fuzz")
            os.ftruncate(fd, memfd_size)
        else:
            fd = os.eventfd(0)
        fds.append(fd)
    return fds


def check_output(out: bytes) -> int:
    """Every message the server sent is well formed; returns how many."""
    framer = Framer(1 << 30)
    framer.feed(out)
    n = 0
    while (m := framer.next_message()) is not None:
        n += 1
        if m.flags & FLAG_TYPE_MASK == FLAG_REPLY:
            if m.flags & FLAG_ERROR:
                assert m.payload == b"" and m.error != 0, m
        else:
            # server-originated requests: only DMA_READ / DMA_WRITE
            assert m.command in (Command.DMA_READ, Command.DMA_WRITE), m
    assert framer.buffered == 0
    return n


class FuzzRun:
    """Feeds fuzz streams into engines over one device; counts messages."""

    def __init__(self, device: object, rng: random.Random) -> None:
        self.device = device
        self.rng = rng
        self.messages = 0
        self.connections = 0
        self.conn = self._new_conn()

    def _new_conn(self) -> Connection:
        self.connections += 1
        return Connection(self.device, name=f"fuzz#{self.connections}")  # type: ignore[arg-type]

    def _reconnect(self) -> None:
        self.conn.framer.close()
        self.device.disconnected()  # type: ignore[attr-defined]
        self.conn = self._new_conn()

    def stream(self, n: int, *, mutate_rate: float = 0.1, negotiate: bool = True) -> None:
        rng = self.rng
        parts = []
        expected_ids: list[int] = []
        # Bytes left by an earlier mutated stream make this one unpredictable.
        mutated = self.conn.framer.buffered > 0
        if negotiate and not self.conn.negotiated:
            body = struct.pack("<HH", 0, 0) + b'{"capabilities":{"max_msg_fds":8}}\0'
            parts.append(HEADER.pack(0xFFFF, Command.VERSION, 16 + len(body), 0, 0) + body)
            expected_ids.append(0xFFFF)
        for i in range(n):
            flags, raw = random_message(rng, i)
            if rng.random() < mutate_rate:
                raw = mutate(rng, raw)
                mutated = True
            elif flags == 0:
                expected_ids.append(i)
            parts.append(raw)
        data = b"".join(parts)
        self.messages += n
        conn = self.conn
        pos = 0
        out: list[bytes] = []
        while pos < len(data):
            step = rng.choice([len(data), 1, 7, 16, 100, 4096])
            fds = make_fds(rng) if rng.random() < 0.05 else []
            conn.receive_data(data[pos : pos + step], fds)
            pos += step
            conn.process()
            out.extend(b"".join(bufs) for bufs, fds in conn.outgoing())
            if conn.closed:
                break
        raw_out = b"".join(out)
        n_out = check_output(raw_out)
        if not mutated and not conn.closed:
            # Well-framed input: every request without No_reply got exactly
            # one reply, in order.
            framer = Framer(1 << 30)
            framer.feed(raw_out)
            ids = []
            while (m := framer.next_message()) is not None:
                ids.append(m.msg_id)
            assert ids == expected_ids, (ids[:10], expected_ids[:10])
            assert n_out == len(ids)
        if conn.closed or rng.random() < 0.05:
            self._reconnect()

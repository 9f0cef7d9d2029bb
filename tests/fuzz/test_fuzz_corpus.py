"""CI's fuzzing: every target replays its kept corpus plus a fixed set of mutations.

Deterministic (a seeded RNG, no libFuzzer): the same inputs run every time,
so a red run is a finding, not luck.  Corpus files named ``open-*`` hold
findings not fixed yet; ``test_fuzz_findings`` keeps them as expected
failures.  ``python -m mdevcore.tools.fuzz TARGET --seconds N`` is the real,
coverage-guided run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

import mdevcore.tools.fuzz as fuzz

MUTATIONS = {"engine": 400, "nvme": 400, "migration": 600, "sysfs": 2000, "virtio": 1000}


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One of libFuzzer's basic moves: flip, set, insert, erase, splice."""
    buf = bytearray(data or b"\0")
    for _ in range(rng.choice([1, 1, 2, 4])):
        if not buf:
            buf = bytearray(b"\0")
        move = rng.randrange(6)
        at = rng.randrange(len(buf))
        if move == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif move == 1:
            buf[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif move == 2:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif move == 3 and len(buf) > 1:
            del buf[at : at + rng.randrange(1, 9)]
        elif move == 4:
            buf[at : at + 4] = rng.randrange(1 << 32).to_bytes(4, "little")
        elif other:
            cut = rng.randrange(len(other))
            buf = buf[:at] + bytearray(other[cut:])
    return bytes(buf)


def inputs(name: str) -> Iterator[tuple[str, bytes]]:
    files = [p for p in fuzz.corpus_files(name) if not p.name.startswith("open-")]
    corpus = [p.read_bytes() for p in files]
    yield from ((p.name, d) for p, d in zip(files, corpus, strict=True))
    rng = random.Random(f"mdevcore-fuzz-{name}")
    for i in range(MUTATIONS[name]):
        yield f"mutation {i}", mutate(rng, rng.choice(corpus), rng.choice(corpus))


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_target_holds_its_invariants_on_the_corpus(name: str) -> None:
    assert len(fuzz.corpus_files(name)) >= 4, (
        "seed corpus missing: python -m mdevcore.tools.fuzz.seeds"
    )
    target = fuzz.load(name)
    try:
        for label, data in inputs(name):
            try:
                target.run(data)
            except Exception as exc:
                raise AssertionError(f"{name}: {label} ({data[:80]!r}...): {exc!r}") from exc
    finally:
        target.close()


def test_the_checks_are_not_vacuous() -> None:
    """The seeds reach the states the invariants are about (or the CI run proves little)."""
    counts = {}
    for name in fuzz.TARGETS:
        target = fuzz.load(name)
        try:
            for p in fuzz.corpus_files(name):
                if not p.name.startswith("open-"):
                    target.run(p.read_bytes())
            counts[name] = vars(target)
        finally:
            target.close()
    assert counts["engine"]["replies_checked"] > 500  # the recorded sessions
    assert counts["nvme"]["cqes_checked"] > 40
    assert counts["virtio"]["chains_compared"] >= 6
    assert all(n > 0 for n in counts["migration"]["outcomes"].values())

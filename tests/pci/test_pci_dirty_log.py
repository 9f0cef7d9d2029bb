"""DirtyLog against a reference model: nothing missed, nothing invented."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mdevcore.pci.dma import DirtyLog

PS = 4096
BASE = 0x10000000
SPAN = 300 * PS  # two logged ranges with a gap inside this span
RANGES = [(BASE, 100 * PS), (BASE + 150 * PS, 150 * PS)]


def logged(page: int) -> bool:
    addr = page * PS
    return any(start <= addr < start + size for start, size in RANGES)


def bits(report: bytes) -> set[int]:
    word = int.from_bytes(report, "little")
    return {i for i in range(word.bit_length()) if word >> i & 1}


marks = st.tuples(st.integers(0, SPAN - 1), st.integers(1, 40 * PS))
windows = st.tuples(st.integers(0, 299), st.integers(1, 300))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.tuples(st.just("mark"), marks), st.tuples(st.just("report"), windows)))
)
def test_same_page_size_reports_exactly_what_was_written(
    ops: list[tuple[str, tuple[int, int]]],
) -> None:
    log = DirtyLog(PS, list(RANGES))
    model: set[int] = set()
    for kind, (a, b) in ops:
        if kind == "mark":
            iova = BASE + a
            log.mark(iova, b)
            model |= {p for p in range(iova // PS, (iova + b - 1) // PS + 1) if logged(p)}
            continue
        first = BASE // PS + a
        npages = min(b, 300 - a)
        got = {first + i for i in bits(log.report(first * PS, npages * PS))}
        want = {p for p in model if first <= p < first + npages}
        assert got == want
        model -= want
    assert log.dirty_pages() == model


@settings(max_examples=200, deadline=None)
@given(st.lists(marks, max_size=20), st.sampled_from([512, 1024, 2048, 8192, 65536]))
def test_other_page_sizes_miss_nothing(writes: list[tuple[int, int]], page_size: int) -> None:
    log = DirtyLog(PS, list(RANGES))
    written: set[int] = set()  # bytes' 4 KiB pages
    for a, length in writes:
        log.mark(BASE + a, length)
        written |= {
            p for p in range((BASE + a) // PS, (BASE + a + length - 1) // PS + 1) if logged(p)
        }
    start = BASE - BASE % page_size
    length = ((BASE + SPAN - start + page_size - 1) // page_size) * page_size
    got = bits(log.report(start, length, page_size))
    for page in written:  # every written 4 KiB page shows in every page it overlaps
        lo = (page * PS - start) // page_size
        hi = ((page + 1) * PS - 1 - start) // page_size
        assert set(range(lo, hi + 1)) <= got
    # The report covered every logged page whole: nothing is left.
    assert log.dirty_pages() == set()
    # And nothing was invented: each reported page overlaps a written one.
    for bit in got:
        lo, hi = start + bit * page_size, start + (bit + 1) * page_size
        assert any(lo < (p + 1) * PS and p * PS < hi for p in written)


def test_huge_range_does_not_allocate_a_bitmap() -> None:
    log = DirtyLog(PS, [(0, 1 << 62)])
    log.mark(1 << 50, 3 * PS)
    assert len(log.report(1 << 50, 64 * PS)) == 8
    assert log.dirty_pages() == set()

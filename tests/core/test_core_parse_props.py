"""Properties of the create/remove parsers (hypothesis)."""

from __future__ import annotations

import errno
import uuid

from hypothesis import given
from hypothesis import strategies as st

from mdevcore.kernel_parse import kstrtoul as parse_remove
from mdevcore.kernel_parse import parse_uuid

ULONG = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(ULONG, st.sampled_from(["{:d}", "0x{:x}", "0X{:X}", "0{:o}", "+{:d}"]), st.booleans())
def test_remove_reads_every_unsigned_long(value: int, form: str, newline: bool) -> None:
    text = form.format(value) + ("\n" if newline else "")
    assert parse_remove(text) == value


@given(st.text(max_size=40))
def test_remove_accepts_only_numbers(text: str) -> None:
    try:
        value = parse_remove(text)
    except OSError as e:
        assert e.errno in (errno.EINVAL, errno.ERANGE)
    else:
        body = text.removesuffix("\n").removeprefix("+")
        assert body and body.isascii() and body[0].isdigit()
        assert 0 <= value < 1 << 64


@given(st.uuids(), st.booleans(), st.booleans())
def test_create_reads_every_uuid(u: uuid.UUID, upper: bool, newline: bool) -> None:
    text = str(u).upper() if upper else str(u)
    assert parse_uuid(text + ("\n" if newline else "")) == u


@given(st.text(max_size=45))
def test_create_accepts_only_canonical_uuids(text: str) -> None:
    try:
        u = parse_uuid(text)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        assert text.removesuffix("\n").lower() == str(u)

"""Parsing what userspace writes into ``create`` and ``remove``.

Both follow the kernel exactly, because tools (mdevctl, shell scripts)
depend on which inputs succeed and which errno the others get.
"""

from __future__ import annotations

import errno
import uuid

UUID_STRING_LEN = 36
_HEX = frozenset("0123456789abcdefABCDEF")
_DASHES = (8, 13, 18, 23)
_ULONG_MAX = (1 << 64) - 1
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: _HEX}


def parse_uuid(data: bytes | str) -> uuid.UUID:
    """Parse a ``create`` write: a UUID, optionally followed by one newline.

    Only the canonical 8-4-4-4-12 form is accepted (like the kernel's
    ``guid_parse``): no braces, no ``urn:uuid:`` prefix, no spaces.
    Anything else raises ``OSError(EINVAL)``.
    """
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if len(text) == UUID_STRING_LEN + 1 and text.endswith("\n"):
        text = text[:-1]
    if len(text) != UUID_STRING_LEN:
        raise OSError(errno.EINVAL, f"create: expected a UUID, got {len(data)} bytes")
    for i, ch in enumerate(text):
        ok = ch == "-" if i in _DASHES else ch in _HEX
        if not ok:
            raise OSError(errno.EINVAL, f"create: {text!r} is not a UUID")
    return uuid.UUID(text)


def parse_remove(data: bytes | str) -> int:
    """Parse a ``remove`` write like the kernel's ``kstrtoul(buf, 0, ...)``.

    Accepts an optional ``+``, a ``0x`` (hex) or leading ``0`` (octal)
    prefix, and one trailing newline.  Returns the value; non-numbers
    raise ``OSError(EINVAL)``, values beyond an unsigned long ``ERANGE``.
    """
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if text.endswith("\n"):
        text = text[:-1]
    if text.startswith("+"):
        text = text[1:]
    base = 10
    digits = text
    if len(text) > 1 and text[0] == "0" and text[1] in "xX":
        base, digits = 16, text[2:]
    elif len(text) > 1 and text[0] == "0":
        base, digits = 8, text[1:]
    allowed = _DIGITS[base]
    if not digits or any(ch not in allowed for ch in digits):
        raise OSError(errno.EINVAL, f"remove: {text!r} is not a number")
    value = int(digits, base)
    if value > _ULONG_MAX:
        raise OSError(errno.ERANGE, "remove: value out of range")
    return value

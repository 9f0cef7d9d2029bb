"""Parsing what userspace writes into sysfs attributes, as the kernel does.

The mdev model takes parsed values and its sysfs view parses; the PCI
bus model still parses its own sysfs stores.  Tools (mdevctl, shell scripts) depend on which inputs
succeed and which errno the others get, so every rule here is the
kernel's: ``guid_parse`` for UUIDs, ``kstrtoul``/``kstrtou16`` (base 0)
for numbers, ``kstrtobool``, ``sysfs_streq``.
"""

from __future__ import annotations

import errno
import uuid

UUID_STRING_LEN = 36
_HEX = frozenset("0123456789abcdefABCDEF")
_DASHES = (8, 13, 18, 23)
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: _HEX}


def _text(data: bytes | str) -> str:
    return data.decode("ascii", "replace") if isinstance(data, bytes) else data


def strip_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def parse_uuid(data: bytes | str) -> uuid.UUID:
    """A ``create`` write: a UUID, optionally followed by one newline.

    Only the canonical 8-4-4-4-12 form is accepted (like the kernel's
    ``guid_parse``): no braces, no ``urn:uuid:`` prefix, no spaces.
    Anything else raises ``OSError(EINVAL)``.
    """
    text = _text(data)
    if len(text) == UUID_STRING_LEN + 1 and text.endswith("\n"):
        text = text[:-1]
    if len(text) != UUID_STRING_LEN:
        raise OSError(errno.EINVAL, f"expected a UUID, got {len(data)} bytes")
    for i, ch in enumerate(text):
        ok = ch == "-" if i in _DASHES else ch in _HEX
        if not ok:
            raise OSError(errno.EINVAL, f"{text!r} is not a UUID")
    return uuid.UUID(text)


def kstrtoul(data: bytes | str, bits: int = 64) -> int:
    """kstrtou<bits>(s, 0): an optional ``+``, decimal, ``0x`` hex or ``0``
    octal, one trailing newline.  EINVAL for anything else, ERANGE when the
    value does not fit in ``bits`` bits."""
    text = strip_newline(_text(data))
    if text.startswith("+"):
        text = text[1:]
    base, digits = 10, text
    if len(text) > 1 and text[0] == "0" and text[1] in "xX":
        base, digits = 16, text[2:]
    elif len(text) > 1 and text[0] == "0":
        base, digits = 8, text[1:]
    allowed = _DIGITS[base]
    if not digits or any(ch not in allowed for ch in digits):
        raise OSError(errno.EINVAL, f"{text!r} is not a number")
    value = int(digits, base)
    if value >> bits:
        raise OSError(errno.ERANGE, f"{value} does not fit in {bits} bits")
    return value


def kstrtobool(data: bytes | str) -> bool:
    """kstrtobool: y/Y/1/t/on true, n/N/0/f/off false (the first characters decide)."""
    text = _text(data).lower()
    if text[:1] in ("y", "1", "t"):
        return True
    if text[:1] in ("n", "0", "f"):
        return False
    if text[:2] == "on":
        return True
    if text[:2] == "of":
        return False
    raise OSError(errno.EINVAL, f"{text!r} is not a boolean")


def sysfs_streq(data: bytes | str, name: str) -> bool:
    """Equal, ignoring one trailing newline on either side (sysfs_streq)."""
    return strip_newline(_text(data)) == strip_newline(name)

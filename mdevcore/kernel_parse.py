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


def _c_string(text: str) -> str:
    """What the kernel's C helpers see: the store's buffer up to the first NUL."""
    return text.split("\0", 1)[0]


def strip_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def parse_uuid(data: bytes | str) -> uuid.UUID:
    """A ``create`` write, read as mdev's ``create_store`` reads it.

    The write must be 36 or 37 bytes; ``guid_parse`` then looks at the first
    36 only, so the 37th may be any byte (the newline ``echo`` adds, or
    anything else), and a NUL ends the string first (``kstrndup``).  Only
    the canonical 8-4-4-4-12 form is accepted: no braces, no ``urn:uuid:``
    prefix, no spaces.  Anything else raises ``OSError(EINVAL)``.
    """
    if not UUID_STRING_LEN <= len(data) <= UUID_STRING_LEN + 1:
        raise OSError(errno.EINVAL, f"expected a UUID, got {len(data)} bytes")
    text = _c_string(_text(data))[:UUID_STRING_LEN]
    if len(text) != UUID_STRING_LEN:
        raise OSError(errno.EINVAL, f"{text!r} is not a UUID")
    for i, ch in enumerate(text):
        ok = ch == "-" if i in _DASHES else ch in _HEX
        if not ok:
            raise OSError(errno.EINVAL, f"{text!r} is not a UUID")
    return uuid.UUID(text)


def kstrtoul(data: bytes | str, bits: int = 64) -> int:
    """kstrtou<bits>(s, 0): an optional ``+``, decimal, ``0x`` hex or ``0``
    octal, one trailing newline.  EINVAL for anything else, ERANGE when the
    value does not fit in ``bits`` bits.  As in lib/kstrtox.c the string ends
    at a NUL, and a number too big for 64 bits is ERANGE even when junk
    follows it (the overflow is seen before the rest is looked at)."""
    text = _c_string(_text(data))
    if text.startswith("+"):
        text = text[1:]
    base, digits = 10, text
    if len(text) > 2 and text[0] == "0" and text[1] in "xX" and text[2] in _HEX:
        base, digits = 16, text[2:]
    elif text.startswith("0"):
        base = 8
    allowed = _DIGITS[base]
    n = 0
    while n < len(digits) and digits[n] in allowed:
        n += 1
    if base == 10 and n > 20:
        # Decimal has no leading zeros here: more than 20 digits is past 2**64
        # (and int() would refuse a few thousand of them).
        raise OSError(errno.ERANGE, f"{text[:40]!r}... does not fit in 64 bits")
    value = int(digits[:n], base) if n else 0
    if value >> 64:
        raise OSError(errno.ERANGE, f"{value} does not fit in 64 bits")
    if not n or digits[n:] not in ("", "\n"):
        raise OSError(errno.EINVAL, f"{text!r} is not a number")
    if value >> bits:
        raise OSError(errno.ERANGE, f"{value} does not fit in {bits} bits")
    return value


def kstrtobool(data: bytes | str) -> bool:
    """kstrtobool (Linux 6.2+): e/y/t/1 true, d/n/f/0 false, "on" true, "of(f)"
    false; the first characters decide."""
    text = _text(data).lower()
    if text[:1] in ("e", "y", "1", "t"):
        return True
    if text[:1] in ("d", "n", "0", "f"):
        return False
    if text[:2] == "on":
        return True
    if text[:2] == "of":
        return False
    raise OSError(errno.EINVAL, f"{text!r} is not a boolean")


def sysfs_streq(data: bytes | str, name: str) -> bool:
    """Equal, ignoring one trailing newline on either side (sysfs_streq); both
    strings end at a NUL, as C strings do."""
    return strip_newline(_c_string(_text(data))) == strip_newline(_c_string(name))

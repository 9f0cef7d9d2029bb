"""A reference model of the kernel's sysfs store rules, to fuzz ours against.

Written the way the C code walks its buffer, not the way
mdevcore.kernel_parse is written, so that the two disagree when one is
wrong.  kernfs hands a store ``count`` bytes with a NUL after them; the C
helpers stop at the first NUL, so every rule here first takes the C
string.  Sources: lib/kstrtox.c (_parse_integer_fixup_radix,
_parse_integer, kstrtoull, kstrtobool with the E/D letters of Linux 6.2+),
lib/string.c sysfs_streq, drivers/vfio/mdev/mdev_sysfs.c create_store and
remove_store, drivers/base/driver.c driver_set_override, drivers/pci/iov.c
sriov_numvfs_store and sriov_drivers_autoprobe_store.

Each function returns the value or an errno (a negative int is never a
value here, so errnos are returned as ``Errno``).
"""

from __future__ import annotations

import errno
import uuid
from typing import NamedTuple

ULLONG_MAX = (1 << 64) - 1
PAGE_SIZE = 4096


class Errno(NamedTuple):
    code: int


def c_string(buf: bytes) -> bytes:
    """What a C function sees of a store's buffer."""
    end = buf.find(b"\0")
    return buf if end < 0 else buf[:end]


def _digit(c: int) -> int:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    lc = c | 0x20
    if 0x61 <= lc <= 0x66:
        return lc - 0x61 + 10
    return 16


def kstrtoull(buf: bytes) -> int | Errno:
    """kstrtoull(s, 0, &res)."""
    s = c_string(buf)
    if s[:1] == b"+":
        s = s[1:]
    base = 10
    if s[:1] == b"0":
        hexa = len(s) > 2 and s[1] | 0x20 == ord("x") and _digit(s[2]) < 16
        base = 16 if hexa else 8
    if base == 16:
        s = s[2:]
    res = 0
    consumed = 0
    overflow = False
    for c in s:
        val = _digit(c)
        if val >= base:
            break
        if res > (ULLONG_MAX - val) // base:
            overflow = True
        res = (res * base + val) & ULLONG_MAX
        consumed += 1
    if overflow:
        return Errno(errno.ERANGE)
    if consumed == 0:
        return Errno(errno.EINVAL)
    rest = s[consumed:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        return Errno(errno.EINVAL)
    return res


def kstrtou(buf: bytes, bits: int) -> int | Errno:
    """kstrtoul (64 bits on the hosts we serve), kstrtou16, ..."""
    value = kstrtoull(buf)
    if isinstance(value, Errno):
        return value
    return Errno(errno.ERANGE) if value >> bits else value


def kstrtobool(buf: bytes) -> bool | Errno:
    s = c_string(buf)
    first = s[:1].decode("latin-1")
    if first and first in "EeYyTt1":
        return True
    if first and first in "DdNnFf0":
        return False
    if first in ("o", "O") and len(s) > 1:
        second = chr(s[1])
        if second in "Nn":
            return True
        if second in "Ff":
            return False
    return Errno(errno.EINVAL)


def sysfs_streq(buf: bytes, name: bytes) -> bool:
    s1, s2 = c_string(buf), c_string(name)
    i = 0
    while i < len(s1) and i < len(s2) and s1[i] == s2[i]:
        i += 1
    a, b = s1[i:], s2[i:]
    return a == b or (not a and b == b"\n") or (a == b"\n" and not b)


def _uuid_is_valid(s: bytes) -> bool:
    if len(s) < 36:
        return False  # the NUL ends the string inside the 36 characters
    for i in range(36):
        c = s[i]
        if i in (8, 13, 18, 23):
            if c != ord("-"):
                return False
        elif _digit(c) >= 16:
            return False
    return True


def mdev_create(buf: bytes) -> uuid.UUID | Errno:
    """create_store up to mdev_device_create: 36 or 37 bytes, guid_parse."""
    if not 36 <= len(buf) <= 37:
        return Errno(errno.EINVAL)
    s = c_string(buf)  # kstrndup stops at a NUL too
    if not _uuid_is_valid(s):
        return Errno(errno.EINVAL)
    return uuid.UUID(s[:36].decode("ascii"))


def mdev_remove(buf: bytes) -> bool | Errno:
    """remove_store: any kstrtoul failure is EINVAL; True removes."""
    value = kstrtou(buf, 64)
    if isinstance(value, Errno):
        return Errno(errno.EINVAL)
    return value != 0


def driver_override(buf: bytes) -> bytes | None | Errno:
    """driver_set_override: the name up to the first newline; empty clears."""
    if len(buf) >= PAGE_SIZE - 1:
        return Errno(errno.EINVAL)
    s = c_string(buf)
    cut = s.find(b"\n")
    name = s if cut < 0 else s[:cut]
    return name or None


def sriov_numvfs(buf: bytes) -> int | Errno:
    """sriov_numvfs_store's parse: kstrtou16, any failure EINVAL."""
    value = kstrtou(buf, 16)
    return Errno(errno.EINVAL) if isinstance(value, Errno) else value


def sriov_autoprobe(buf: bytes) -> bool | Errno:
    value = kstrtobool(buf)
    return Errno(errno.EINVAL) if isinstance(value, Errno) else value

"""VERSION negotiation: the client's capabilities JSON and the server's answer.

Rules as libvfio-user (lib/tran.c): the JSON after major/minor is optional;
when present it must be NUL terminated and parse; a missing "capabilities"
object is fine; known values are type- and range-checked; unknown keys
(QEMU's legacy "migration" object, "twin_socket", future ones) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mdevcore.vfio_user.constants import (
    CLIENT_MAX_MSG_FDS_LIMIT,
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_FDS,
    SERVER_MAX_DATA_XFER_SIZE,
    SERVER_MAX_DMA_MAPS,
    SERVER_MAX_MSG_FDS,
    SERVER_PGSIZES,
)


class VersionError(ValueError):
    """The client's VERSION payload is refused (EINVAL, then the connection ends)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientCaps:
    """What the client announced in VERSION (defaults when absent)."""

    major: int = 0
    minor: int = 0
    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    migration_pgsize: int | None = None
    write_multiple: bool = False


def _int_cap(caps: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    if key not in caps:
        return default
    value = caps[key]
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise VersionError(f"capability {key}={value!r} refused")
    return value


def parse_version_json(raw: bytes) -> dict[str, Any]:
    """The capabilities object of a VERSION payload (after major/minor)."""
    if not raw:
        return {}
    if raw[-1] != 0:
        raise VersionError("VERSION JSON not NUL terminated")
    try:
        top = json.loads(raw[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VersionError(f"VERSION JSON does not parse: {e}") from None
    if not isinstance(top, dict):
        raise VersionError("VERSION JSON is not an object")
    caps = top.get("capabilities", {})
    if not isinstance(caps, dict):
        raise VersionError("capabilities is not an object")
    return caps


def caps_from_json(major: int, minor: int, caps: dict[str, Any]) -> ClientCaps:
    max_fds = _int_cap(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS, 0, CLIENT_MAX_MSG_FDS_LIMIT)
    xfer = _int_cap(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE, 1, 1 << 62)
    _int_cap(caps, "pgsizes", SERVER_PGSIZES, 1, (1 << 64) - 1)
    _int_cap(caps, "max_dma_maps", SERVER_MAX_DMA_MAPS, 0, (1 << 64) - 1)
    pgsize = None
    mig = caps.get("migration")
    if mig is not None:
        if not isinstance(mig, dict):
            raise VersionError("migration capability is not an object")
        if "pgsize" in mig:
            pgsize = _int_cap(mig, "pgsize", 0, 1, 1 << 62)
        _int_cap(mig, "max_bitmap_size", 0, 0, (1 << 64) - 1)
    wm = caps.get("write_multiple", False)
    if not isinstance(wm, bool):
        raise VersionError("write_multiple is not a boolean")
    return ClientCaps(major, minor, max_fds, xfer, pgsize, wm)


def server_caps_json() -> bytes:
    caps = {
        "capabilities": {
            "max_msg_fds": SERVER_MAX_MSG_FDS,
            "max_data_xfer_size": SERVER_MAX_DATA_XFER_SIZE,
            "pgsizes": SERVER_PGSIZES,
            "max_dma_maps": SERVER_MAX_DMA_MAPS,
            "write_multiple": True,
        }
    }
    return json.dumps(caps, separators=(",", ":")).encode() + b"\0"

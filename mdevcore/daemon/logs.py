"""How ``mdevd serve`` writes its log: text for people, JSON lines for collectors.

``text`` (the default) is ``TIME LEVEL LOGGER: MESSAGE``.  ``json`` is one
object per line::

    {"time": "2026-12-02T01:50:00.123Z", "level": "warning",
     "logger": "mdevcore.vfio_user", "message": "mdev 5f1c... (mtty-1)#3: msg 0x2 ...",
     "device": "5f1c...", "client": 3, "event": "EINVAL REGION_READ", "errno": "EINVAL"}

``device`` (a UUID or PCI address), ``client`` (the connection's number),
``event`` and ``errno`` appear where known: from
fields a record carries (``extra={"device": ...}``, as
:class:`mdevcore.vfio_user.stats.DeviceStats` passes them), else from a
message that starts with a vfio-user connection's name (``DEVICE#N:``).
``errno`` is the symbolic name (``EINVAL``), the same on every architecture.

Under systemd with stderr connected to the journal (``$JOURNAL_STREAM``
names stderr's device and inode), each line starts with the sd-daemon
``<N>`` syslog priority, which journald strips and files as PRIORITY, and
text lines drop their timestamp: the journal keeps its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
FIELDS = ("device", "client", "event", "errno")

# syslog(3) priorities, as sd-daemon(3)'s SD_* prefixes carry them.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
# "mdev UUID (mtty-1)#3: ...", "pds VF 0000:60:00.1#12: ...": a vfio-user
# connection's name is its device's name, '#' and the client's number.
_CONNECTION = re.compile(r"(?P<device>[^#]+)#(?P<client>\d+):")
# A device's name ends in its identifier, maybe with its type after it.
_TYPE_SUFFIX = re.compile(r"\s*\([^()]*\)$")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_TEXT = "%(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def device_id(name: str) -> str:
    """A device's UUID or PCI address from its name ("mdev UUID (mtty-1)", "pds VF BDF")."""
    words = _TYPE_SUFFIX.sub("", name).split()
    return words[-1] if words else name


def fields(record: logging.LogRecord, message: str) -> dict[str, object]:
    """device, client, event and errno where the record or its message tells them."""
    found: dict[str, object] = {}
    match = _CONNECTION.match(message)
    if match is not None:
        found["device"] = match["device"]
        found["client"] = int(match["client"])
    for name in FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            found[name] = value
    if "device" in found:
        found["device"] = device_id(str(found["device"]))
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        entry.update(fields(record, message))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _JournalPrefix(logging.Formatter):
    """Puts ``<N>`` before what the wrapped formatter writes."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        # A traceback's lines would reach the journal as lines of their own
        # at the default priority: keep them in the record's one entry.
        return f"<{priority(record.levelno)}>" + text.replace("\n", "\n ")


def under_journal(env: Mapping[str, str], stream: IO[str]) -> bool:
    """$JOURNAL_STREAM is ``DEV:INODE`` of the journal's socket: is ``stream`` it?"""
    device, sep, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no real fd (tests' captured streams), or garbage
        return False


def formatter(log_format: str, journal: bool) -> logging.Formatter:
    if log_format == "json":
        inner: logging.Formatter = JsonFormatter()
    elif log_format == "text":
        inner = logging.Formatter(_JOURNAL_TEXT if journal else _TEXT)
    else:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    return _JournalPrefix(inner) if journal else inner


def configure(
    log_format: str = "text",
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format``.

    Replaces a handler an earlier call installed (``main`` may run twice in
    one process, in tests), and leaves other handlers alone.
    """
    stream = sys.stderr if stream is None else stream
    journal = under_journal(os.environ if env is None else env, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format, journal))
    handler.set_name("mdevd")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "mdevd":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

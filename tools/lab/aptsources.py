"""Find the Debian mirror the machine itself uses.

The project must not name a mirror host, so the lab reads the machine's apt
sources (deb822 ``*.sources`` files or one-line ``sources.list`` entries) and
reuses the first plain Debian archive URI, i.e. one that serves a release
suite rather than ``-security``/``-updates``/``-backports``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from mdevcore.tools.lab.errors import LabError

MIRROR_ENV = "MDEVCORE_LAB_MIRROR"
_SIDE_SUITES = ("-security", "-updates", "-backports", "-proposed-updates")


def _is_release_suite(suite: str) -> bool:
    return "/" not in suite and not suite.endswith(_SIDE_SUITES)


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, ""
        elif line[0] in " \t" and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    if fields:
        yield fields


def mirrors_from_deb822(text: str) -> Iterator[str]:
    """URIs of enabled ``deb`` paragraphs that serve a release suite."""
    for para in _deb822_paragraphs(text):
        if para.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in para.get("types", "").split():
            continue
        if not any(_is_release_suite(s) for s in para.get("suites", "").split()):
            continue
        yield from para.get("uris", "").split()


def mirrors_from_list(text: str) -> Iterator[str]:
    """URIs of ``deb`` lines in one-line format that serve a release suite."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            # Options such as [arch=amd64 signed-by=...] may span several words.
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2 and _is_release_suite(words[1]):
            yield words[0]


def _usable(uris: Iterable[str]) -> Iterator[str]:
    for uri in uris:
        if uri.startswith(("http://", "https://")):
            yield uri.rstrip("/")


def find_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror URI to bootstrap from.

    ``$MDEVCORE_LAB_MIRROR`` wins; otherwise the machine's apt sources decide.
    """
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override.rstrip("/")
    candidates: list[str] = []
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.glob("*.sources")):
            candidates += _usable(mirrors_from_deb822(path.read_text(errors="replace")))
        for path in sorted(parts.glob("*.list")):
            candidates += _usable(mirrors_from_list(path.read_text(errors="replace")))
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        candidates += _usable(mirrors_from_list(main_list.read_text(errors="replace")))
    # Prefer an archive that looks like Debian's layout over third-party repos.
    debian = [uri for uri in candidates if uri.endswith("/debian")]
    if debian:
        return debian[0]
    if candidates:
        return candidates[0]
    raise LabError(
        errno.ENOENT,
        f"no Debian mirror found in {etc_apt}; set {MIRROR_ENV}=<archive URI>",
    )

"""``mdevd new-parent NAME``: a new parent package from the template.

The package it writes installs with pip, declares its plug-in entry point,
and holds a device, a driver, unit tests on ``mdevcore.testing`` and a
guest test with a guest script; all of it passes as generated.  The
template is ``mdevcore/templates/parent`` (files end in ``.tmpl``; the
tokens ``@@NAME@@``, ``@@CLASS@@`` ... are replaced).
"""

from __future__ import annotations

import errno
import keyword
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_NAME = re.compile(r"^[a-z][a-z0-9_]{1,30}$")
_TEMPLATE_SUFFIX = ".tmpl"


def check_name(name: str) -> None:
    if not _NAME.match(name) or keyword.iskeyword(name) or name in {"mdevcore", "test", "tests"}:
        raise OSError(
            errno.EINVAL,
            f"parent name {name!r}: 2-31 characters of a-z, 0-9 and _, starting with a letter",
        )


def tokens(name: str) -> dict[str, str]:
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    return {
        "@@NAME@@": name,
        "@@CLASS@@": camel,
        "@@MAGIC@@": (name.upper() + "____")[:4],
        "@@VID@@": "1234",
        "@@DID@@": "11e8",
    }


def generate(name: str, dest: Path) -> Path:
    """Write the package for ``name`` into ``dest/name``; returns that directory."""
    check_name(name)
    root = dest / name
    if root.exists():
        raise OSError(errno.EEXIST, f"{root} already exists")
    subst = tokens(name)
    template = resources.files("mdevcore").joinpath("templates", "parent")
    _copy(template, root, subst)
    (root / name / "guest.sh").chmod(0o755)
    return root


def _copy(src: Traversable, dst: Path, subst: dict[str, str]) -> None:
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir(), key=lambda e: e.name):
        target = entry.name
        for token, value in subst.items():
            target = target.replace(token, value)
        if entry.is_dir():
            _copy(entry, dst / target, subst)
            continue
        if not target.endswith(_TEMPLATE_SUFFIX):
            continue
        text = entry.read_text()
        for token, value in subst.items():
            text = text.replace(token, value)
        (dst / target.removesuffix(_TEMPLATE_SUFFIX)).write_text(text)


def main(name: str, dest: Path) -> int:
    root = generate(name, dest)
    print(f"mdevd: wrote the {name} parent package to {root}")
    print(f"mdevd: next: pip install -e {root} && mdevd parents")
    return 0

"""Compile a cffi API-mode extension and put it where the interpreter imports it.

Shared by the build modules of mdevcore's native pieces
(mdevcore.vfio_user.libvfio_user_build, mdevcore.nvme.fastio_build).
"""

from __future__ import annotations

import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any


def compile_into(ffi: Any, dest: Path | None, prefix: str) -> Path:
    """Compile ``ffi`` (set_source already called) into ``dest`` (default: site-packages)."""
    target = dest or Path(sysconfig.get_paths()["platlib"])
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        built = Path(ffi.compile(tmpdir=tmp))
        target.mkdir(parents=True, exist_ok=True)
        final = target / built.name
        shutil.copy2(built, final)
    return final

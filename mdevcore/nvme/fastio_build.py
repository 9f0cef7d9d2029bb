"""Compile the controller's C data path (``fastio.c``) into a cffi extension.

    python -m mdevcore.nvme.fastio_build [DEST]

The extension, ``_mdevcore_nvme_fastio``, goes into DEST (default: this
interpreter's site-packages); setup.sh runs this.  It records a digest of
the C source and the declarations, so a checkout whose ``fastio.c`` moved
on ignores an extension built from the old one (``fastio.load``).
Needs cffi and a C compiler.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mdevcore.cffi_install import compile_into
from mdevcore.nvme.fastio import CDEF, EXTENSION, SOURCE_FILE, source_digest


def build(dest: Path | None = None) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF + "const char *nf_digest(void);")
    source = SOURCE_FILE.read_text()
    ffi.set_source(
        EXTENSION,
        source + f'\nconst char *nf_digest(void) {{ return "{source_digest()}"; }}\n',
        extra_compile_args=["-O2", "-Wall", "-Werror"],
    )
    return compile_into(ffi, dest, "mdevcore-fastio-")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 1
    print(f"NVMe fast I/O module: {build(Path(args[0]).resolve() if args else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile mdevcore's cffi module for libvfio-user (API mode).

    python -m mdevcore.vfio_user.libvfio_user_build PREFIX

PREFIX holds the installed library (``PREFIX/lib/libvfio-user.so.0``) and
its header (``PREFIX/include/vfio-user/libvfio-user.h``); setup.sh passes
the venv.  The extension goes into this interpreter's site-packages, with
PREFIX/lib as its run path.  Needs cffi and a C compiler.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mdevcore.cffi_install import compile_into
from mdevcore.vfio_user.libvfio_user_ffi import EXTENSION, full_cdef

_SOURCE = """
#include <sys/uio.h>
#include "vfio-user/libvfio-user.h"
#include "vfio-user/pci_defs.h"
"""


def build(prefix: Path, dest: Path | None = None) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(full_cdef())
    lib_dir = str(prefix / "lib")
    ffi.set_source(
        EXTENSION,
        _SOURCE,
        include_dirs=[str(prefix / "include")],
        library_dirs=[lib_dir],
        libraries=["vfio-user"],
        extra_compile_args=["-Werror=incompatible-pointer-types"],
        extra_link_args=[f"-Wl,-rpath,{lib_dir}"],
    )
    return compile_into(ffi, dest, "mdevcore-cffi-")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 1
    print(f"libvfio-user cffi module: {build(Path(args[0]).resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

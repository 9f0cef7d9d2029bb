#!/bin/sh
# Prepare this checkout on a fresh Debian 12 machine (run as root):
# system packages, the Python venv in .venv, and the QEMU lab cache.
# Idempotent: a second run only checks what is already there.
set -eu
cd "$(dirname "$0")"

APT_PACKAGES="libfuse3-dev fuse3 pkg-config mdevctl debootstrap gcc libc6-dev iproute2 systemd"
# libvfio-user (the second vfio-user transport) is built from source with these.
if [ "${MDEVCORE_SKIP_LIBVFIO_USER:-0}" != 1 ]; then
    APT_PACKAGES="$APT_PACKAGES meson ninja-build libjson-c-dev libcmocka-dev"
fi
missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The entry points are checked too: an install from before the plug-ins had
# none, and one from before the mdevcore.* namespace names top-level modules.
if ! .venv/bin/python -c 'import mdevcore, pyfuse3, trio, construct, pytest_trio, hypothesis, cffi, build, twine
from importlib.metadata import entry_points
eps = entry_points(group="mdevcore.parents")
assert {"mtty", "pds"} <= set(eps.names) and all(ep.value.startswith("mdevcore.") for ep in eps)' 2>/dev/null; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,libvfio-user]'
fi

# libvfio-user, built from an unmodified source snapshot into the venv's
# prefix (.venv/lib/libvfio-user.so.0, where mdevcore looks for it).
# MDEVCORE_LIBVFIO_USER_SRC: a source tree, a .tar.gz of one, or a directory
# holding one libvfio-user-*.tar.gz (default: ../shared/vendor next to this
# checkout).  MDEVCORE_SKIP_LIBVFIO_USER=1 skips it (its tests then skip).
if [ "${MDEVCORE_SKIP_LIBVFIO_USER:-0}" != 1 ] && [ ! -e .venv/lib/libvfio-user.so.0 ]; then
    src="${MDEVCORE_LIBVFIO_USER_SRC:-$(pwd)/../shared/vendor}"
    if [ -d "$src" ] && [ ! -f "$src/meson.build" ]; then
        set -- "$src"/libvfio-user-*.tar.gz
        [ -f "$1" ] && src="$1"
    fi
    if [ -f "$src" ]; then
        work="$(mktemp -d)"
        tar xzf "$src" -C "$work"
        src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    fi
    if [ ! -f "$src/meson.build" ]; then
        echo "setup: error: no libvfio-user source at ${MDEVCORE_LIBVFIO_USER_SRC:-../shared/vendor}" >&2
        echo "setup: set MDEVCORE_LIBVFIO_USER_SRC to its source tree or tarball," >&2
        echo "setup: or MDEVCORE_SKIP_LIBVFIO_USER=1 to go without the libvfio-user transport" >&2
        exit 1
    fi
    echo "setup: building libvfio-user from $src into .venv"
    build="$(mktemp -d)"
    meson setup "$build" "$src" --prefix="$(pwd)/.venv" --libdir=lib \
        --buildtype=release -Dtran-pipe=false >"$build.log" 2>&1 \
        && meson compile -C "$build" vfio-user >>"$build.log" 2>&1 \
        && meson install -C "$build" --no-rebuild --tags runtime,devel >>"$build.log" 2>&1 \
        || { cat "$build.log" >&2; echo "setup: error: libvfio-user build failed" >&2; exit 1; }
    rm -rf "$build" "$build.log" ${work:+"$work"}
fi
# mdevcore's cffi module (API mode), compiled against that header and library.
if [ "${MDEVCORE_SKIP_LIBVFIO_USER:-0}" != 1 ] \
    && ! .venv/bin/python -c 'import _mdevcore_libvfio_user' 2>/dev/null; then
    echo "setup: compiling the libvfio-user cffi module"
    .venv/bin/python -m mdevcore.vfio_user.libvfio_user_build .venv >/dev/null
fi

# The NVMe controller's C read/write path (mdevcore/nvme/fastio.c), rebuilt
# when the source changed; without it the controller runs in Python alone.
if ! .venv/bin/python -c 'import sys; from mdevcore.nvme import fastio; sys.exit(fastio.load() is None)' 2>/dev/null; then
    echo "setup: compiling the NVMe fast I/O module"
    .venv/bin/python -m mdevcore.nvme.fastio_build >/dev/null
fi

if [ "${MDEVCORE_SKIP_LAB:-0}" != 1 ]; then
    .venv/bin/python -m mdevcore.tools.lab setup
fi
echo "setup: done"

#!/bin/sh
# Prepare this checkout on a fresh Debian 12 machine (run as root):
# system packages, the Python venv in .venv, and the QEMU lab cache.
# Idempotent: a second run only checks what is already there.
set -eu
cd "$(dirname "$0")"

APT_PACKAGES="libfuse3-dev fuse3 pkg-config mdevctl debootstrap gcc"
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
# The entry points are checked too: an install from before the plug-ins had none.
if ! .venv/bin/python -c 'import mdevcore, pyfuse3, trio, construct, pytest_trio, hypothesis
from importlib.metadata import entry_points
assert {"mtty", "pds"} <= set(entry_points(group="mdevcore.parents").names)' 2>/dev/null; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
fi

if [ "${MDEVCORE_SKIP_LAB:-0}" != 1 ]; then
    .venv/bin/python -m tools.lab setup
fi
echo "setup: done"

"""``mdevd serve`` as a real process choosing the transport per parent.

``--parent-transport mtty=libvfio-user`` serves mtty's mdevs through
libvfio-user while the pool parent's stay native; removing a device drops
its libvfio-user client; a missing library is a one-line error saying how
to install it; the native path never imports cffi.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from libvfio_user_pair import needs_libvfio_user

from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CFG
from mdevcore.vfio_user.client import Client

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "daemon"))

from mdevd_proc import MDEVD, Mdevd, sh  # noqa: E402

MTTY2 = "devices/virtual/mtty/mtty/mdev_supported_types/mtty-2"
POOL2 = "devices/virtual/pool/pool/mdev_supported_types/pool-2"
needs_fuse = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


@needs_fuse
@needs_libvfio_user
def test_per_parent_transport_and_removal_while_connected(tmp_path: Path) -> None:
    d = Mdevd(tmp_path, "--no-pds", "--parent-transport", "mtty=libvfio-user", builtins=True)
    try:
        mtty, pool = str(uuid.uuid4()), str(uuid.uuid4())
        r = sh(f"echo {mtty} > {MTTY2}/create && echo {pool} > {POOL2}/create", d.sysfs)
        assert r.returncode == 0, r.stderr
        with Client(d.run_dir / f"{pool}.sock") as c:
            c.negotiate()
            assert c.server_caps.get("write_multiple")  # the native engine offers it
        sock = d.run_dir / f"{mtty}.sock"
        with Client(sock) as c:
            _, _, caps = c.negotiate()
            assert "write_multiple" not in caps  # libvfio-user does not
            assert c.region_read(CFG, 0, 4) == bytes.fromhex("48435332")
            r = sh(
                f"echo 1 > bus/mdev/devices/{mtty}/remove && test ! -e {sock} && echo gone", d.sysfs
            )
            assert r.stdout == "gone\n", r.stderr
            with pytest.raises(OSError):
                c.region_read(CFG, 0, 4)
    finally:
        assert d.stop() == 0
    assert f"mdev {mtty} (mtty-2): listening on {sock} (libvfio-user)" in d.stderr


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, MDEVCORE_LIBVFIO_USER=str(tmp_path / "libvfio-user.so.0"))
    r = subprocess.run(
        [*MDEVD, "serve", "--run-dir", str(tmp_path), "--transport", "libvfio-user"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("mdevd: error: ")
    assert "./setup.sh" in r.stderr and "MDEVCORE_LIBVFIO_USER" in r.stderr


def test_native_transport_never_imports_cffi(tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
import mdevcore.daemon.serve
from mdevcore.daemon.servers import TransportChoice
from mdevcore.samples.mtty import MttyDevice
server = TransportChoice()(MttyDevice(1), Path({str(tmp_path)!r}) / "x.sock", "x", "mtty")
assert type(server).__name__ == "DeviceServer", server
bad = [m for m in sys.modules if m == "cffi" or m.endswith("libvfio_user_ffi")]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr

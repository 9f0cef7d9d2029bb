"""The QEMU lab: real Linux guests booted by QEMU >= 10.1 for tests.

Debian 12 ships QEMU 7.2, which has no ``vfio-user-pci``; the lab builds a
Debian trixie chroot with QEMU from trixie-backports and the trixie kernel,
and boots throwaway guests whose busybox initramfs runs one script and
powers off.  Needs root, ``debootstrap`` and util-linux on the host.

From a test (other helpers' tests do the same)::

    from mdevcore.tools.lab import Lab, LabError

    lab = Lab.ensure()            # ~60 s the first time, instant after
    result = lab.boot(
        "modprobe nvme; lspci -nn",
        devices=[daemon_device_line],      # e.g. '{"driver":"vfio-user-pci",...}'
        timeout=120,
    )
    assert result.rc == 0 and "[4348:3253]" in result.output

``result.output`` is what the script printed; ``result.console`` is the whole
serial log; ``result.kernel_log`` the guest's dmesg (dumped when the script
fails, or always with ``kernel_log=True``).  Lab failures raise ``LabError``
(an OSError): ETIMEDOUT on timeout, EIO when QEMU quits or KVM fails; its
``console`` attribute holds what the guest printed.  From trio code, while
serving the device in the same process, use ``await lab.aboot(script, ...)``
so the event loop keeps running.

Pytest: tests/ is not a package, so copy the session fixture of
tests/lab/conftest.py (``return Lab.ensure()``) into your folder's conftest
and mark the tests ``@pytest.mark.qemu``.

Guest facts: kernel 6.12 with 8250_pci built in; modules ``nvme`` (and its
dependencies) are in the initramfs: ``modprobe nvme``.  lspci/setpci with
pci.ids, busybox (devmem, dd, hexdump, stty, ...).  More Debian programs:
``extra_binaries=("fio", "nvme", "/usr/bin/dd")``.  The script's stdin is
/dev/null, cwd a tmpfs, and it runs as PID 1's child under ``sh``.  While
it runs, only kernel emergencies reach the console (``console_loglevel=1``),
so kernel warnings cannot split its output.  ~6-9 s per boot under TCG.

Cache: ``/var/cache/mdevcore-lab`` unless ``$MDEVCORE_LAB_DIR`` or
``cache_dir=``.  The Debian mirror comes from the host's apt sources
(override: ``$MDEVCORE_LAB_MIRROR``).  CLI: ``python -m mdevcore.tools.lab --help``.
"""

from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.lab import GuestResult, Lab, clean
from mdevcore.tools.lab.qemu import choose_accel

__all__ = ["GuestResult", "Lab", "LabError", "choose_accel", "clean"]

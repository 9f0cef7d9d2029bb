"""A test harness for parent authors: serve a device, drive it as a guest would.

    from mdevcore.testing import serve, Interrupts, migrate

    with serve(MyDevice()) as served, served.connect() as client:
        client.region_write(0, 0x10, b"\\x01\\0\\0\\0")
        assert client.region_read(0, 0x10, 4) == b"\\x01\\0\\0\\0"

* :func:`serve` runs the real vfio-user server (the one ``mdevd`` uses) on
  a UNIX socket in a background thread; ``connect()`` gives a negotiated
  blocking client (``mdevcore.vfio_user.client.Client``).
* :class:`GuestMemory` is guest RAM (a memfd) to ``map_into`` a client for
  DMA; :class:`Interrupts` wires eventfds with SET_IRQS and waits on them.
* :func:`migrate` moves a device's state to another instance through the
  migration v2 protocol, as a VMM would (STOP_COPY, RESUMING, RUNNING).
* :func:`boot_guest` (``mdevcore.testing.guest``) boots a lab Linux guest
  attached to the device and runs a guest script in it.
* :func:`~mdevcore.testing.netns.netns` makes a network namespace for a
  test (a TAP-backed device's far end), removed afterwards.
* The pytest plug-in (``mdevcore.testing.fixtures``, loaded automatically
  once mdevcore is installed) offers the ``mdev_serve`` fixture.
"""

from __future__ import annotations

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.testing.interrupts import Interrupts
from mdevcore.testing.migrate import migrate
from mdevcore.testing.served import ServedDevice, serve

__all__ = ["GuestMemory", "Interrupts", "ServedDevice", "migrate", "serve"]

"""vfio-user: serve an emulated device to QEMU (``-device vfio-user-pci``).

``DeviceServer`` serves one ``DeviceBackend`` on one UNIX socket;
``engine.Connection`` is the sans-IO protocol; ``client.Client`` is a
blocking client for tests, tools and benchmarks.
"""

from mdevcore.vfio_user.server import DeviceServer, serve_forever

__all__ = ["DeviceServer", "serve_forever"]

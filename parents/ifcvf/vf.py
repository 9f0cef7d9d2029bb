"""An IFCVF-style VF: modern virtio-net as Intel's FPGA 100G VF presents it.

The function is a plain modern virtio-net device (vendor 1af4, device
1041, class 02/00/00, revision 1) told apart only by its subsystem IDs
(8086:001a), which is how DPDK's ifc vDPA driver recognises it.  Layout:

  BAR0   64-bit memory, 16 KiB: virtio common config, ISR, device config
         and notify structures (one 4 KiB page each)
  BAR4   64-bit memory, 4 KiB: MSI-X table and PBA (one vector per queue
         plus one for config changes)
  capabilities: MSI-X, the four virtio vendor capabilities, PCI Express
  INTx pin A

Live migration (VFIO migration v2, STOP_COPY and P2P), software-assisted
as the seed's relay mode: every RX buffer and used-ring write goes
through the DMA table, which logs its pages while dirty logging is on;
the state is mdevcore.virtio.net.state's.
"""

from __future__ import annotations

from mdevcore.pci.device import MIGRATION_P2P, MIGRATION_STOP_COPY, PciIdentity
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import FrameBackend
from mdevcore.virtio.net.device import NetConfig, VirtioNetDevice

IFCVF_SUBSYS_VENDOR_ID = 0x8086
IFCVF_SUBSYS_DEVICE_ID = 0x001A
VIRTIO_NET_MODERN_DEVICE_ID = spec.PCI_DEVICE_ID_MODERN_BASE + spec.NET_DEVICE_TYPE
NET_CLASS_CODE = 0x020000  # network / ethernet

IFCVF_IDENTITY = PciIdentity(
    vendor_id=spec.PCI_VENDOR_ID,
    device_id=VIRTIO_NET_MODERN_DEVICE_ID,
    class_code=NET_CLASS_CODE,
    revision=1,  # non-transitional virtio devices have revision >= 1 (4.1.2.1)
    subsystem_vendor_id=IFCVF_SUBSYS_VENDOR_ID,
    subsystem_id=IFCVF_SUBSYS_DEVICE_ID,
    interrupt_pin=1,
)


class IfcvfNetVf(VirtioNetDevice):
    migration_flags = MIGRATION_STOP_COPY | MIGRATION_P2P

    def __init__(self, net: NetConfig, backend: FrameBackend, *, name: str = "ifcvf") -> None:
        try:
            super().__init__(IFCVF_IDENTITY, net, backend)
        except BaseException:
            backend.close()  # ours from now on, even when the VF cannot be built
            raise
        try:
            self.add_express()
        except BaseException:
            self.close()
            raise
        self.name = name

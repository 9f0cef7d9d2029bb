"""The PCI model: what a parent driver builds its emulated device from.

``device`` (PciDevice, the API), ``config`` (config space and masks),
``caps`` (capability lists), ``bars`` (BAR registers and memory), ``irq``
(VFIO interrupt state), ``dma`` (the DMA table), ``migration`` (the v2 FSM).
"""

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.pci.migration import MigState

__all__ = ["BarKind", "MigState", "PciDevice", "PciIdentity"]

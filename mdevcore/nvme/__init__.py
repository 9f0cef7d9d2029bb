"""A reusable NVMe controller: registers, queues, admin and NVM commands.

It knows nothing of PCI or sockets: guest memory is a ``DmaSpace``
(translate(iova, length, write) -> memoryview), interrupts are a callback,
and the owner forwards BAR0 accesses and drives processing.
"""

from mdevcore.nvme.controller import NvmeController
from mdevcore.nvme.identify import ControllerConfig
from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.prp import DmaSpace

__all__ = ["ControllerConfig", "DmaSpace", "FileNamespace", "NvmeController"]

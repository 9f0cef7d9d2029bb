"""Virtio for parents to reuse: spec constants, split virtqueues, the PCI transport.

- ``spec``: feature/status bits, ring layout, PCI structures, virtio-net ABI
- ``chain``: descriptor chains (walk with every guest value checked, gather, scatter)
- ``virtqueue``: SplitQueue (avail/used rings, EVENT_IDX, saveable state)
- ``common_cfg``: the common configuration register file and status machine
- ``pci_caps``: BAR layout and the vendor capabilities describing it
- ``transport``: VirtioPciDevice, a PciDevice subclass for device types
"""

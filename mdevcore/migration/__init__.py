"""The VMM side of vfio-user live migration.

QEMU 11.1's vfio-user-pci cannot migrate a device; this package does what
a VMM must: it owns guest memory (``guest_memory``), drives the source and
destination devices through the VFIO migration v2 protocol over their
vfio-user sockets, and moves device state and dirty guest pages between
them.
"""

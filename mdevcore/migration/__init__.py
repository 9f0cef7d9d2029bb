"""The VMM side of vfio-user live migration.

QEMU 11.1's vfio-user-pci cannot migrate a device; this package does what
a VMM must: it owns guest memory (``guest_memory``), drives the source and
destination devices through the VFIO migration v2 protocol over their
vfio-user sockets, and moves device state and dirty guest pages between
them.

Modules: ``arcs`` (the v2 state graph, paths one arc at a time),
``device`` (one device's migration features over a vfio-user client),
``stream`` (the framed sender -> receiver format, no I/O), ``sender`` and
``receiver`` (the two halves), ``links`` (in-process or socket transport),
``session`` (one VMM side: client + memory), ``workload`` and
``workloads/`` (guest-driver stand-ins that verify every byte), ``cli``
(``mdevd migrate``).
"""

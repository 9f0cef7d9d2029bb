"""Workloads for the migration tool, one module per device (see ``workload``)."""

"""Workloads the migration tool runs against a device, as a guest driver would."""

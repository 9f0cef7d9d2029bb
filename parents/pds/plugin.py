"""The pds card as an mdevd plug-in (entry point ``pds``, a hosted parent)."""

from __future__ import annotations

import errno
from pathlib import Path

from mdevcore.parents.pds.driver import PdsHost
from mdevcore.plugins import Options, ParentPlugin


def _host(options: Options, run_dir: Path) -> PdsHost:
    try:
        return PdsHost.from_options(options, run_dir)
    except ValueError as e:
        raise OSError(errno.EINVAL, f"pds: {e}") from None


PLUGIN = ParentPlugin(
    name="pds",
    summary="a Pensando-style pds_core PF with SR-IOV NVMe VFs (pds_vfio serves them)",
    options={
        "pf": "PF address (default 0000:60:00.0)",
        "total_vfs": "sriov_totalvfs (default 8)",
        "ns_size": "namespace size per VF, e.g. 1G (default 1G)",
        "backing_dir": "directory of the VF namespace files (default RUN_DIR/pds)",
        "doorbells": "VF doorbells: trapped or mmap",
    },
    host=_host,
)

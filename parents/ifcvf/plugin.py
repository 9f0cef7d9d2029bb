"""The IFCVF card as an mdevd plug-in (entry point ``ifcvf``, a hosted parent)."""

from __future__ import annotations

import errno
from pathlib import Path

from mdevcore.parents.ifcvf.driver import IfcvfHost
from mdevcore.plugins import Options, ParentPlugin


def _host(options: Options, run_dir: Path) -> IfcvfHost:
    try:
        return IfcvfHost.from_options(options, run_dir)
    except ValueError as e:
        raise OSError(errno.EINVAL, f"ifcvf: {e}") from None


PLUGIN = ParentPlugin(
    name="ifcvf",
    summary="an IFCVF-style PF with SR-IOV virtio-net VFs (ifcvf_vfio serves them)",
    options={
        "pf": "PF address (default 0000:61:00.0)",
        "total_vfs": "sriov_totalvfs (default 4)",
        "backend": "VF wire: loopback (VF pairs cabled, default) or tap",
        "macs": "VF MACs, VF 0 first, comma-separated (default 02:1f:c0:BB:DF:NN)",
        "netdev": "the PF netdev name for mdevd ip (default ifcvf0)",
        "tap": "backend=tap: TAP name, %d is the VF number (default ifctap%d)",
        "netns": "backend=tap: network namespace of the TAPs (a name in /run/netns, or a path)",
        "mtu": "the VFs' MTU (default 1500)",
    },
    host=_host,
)

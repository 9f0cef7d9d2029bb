#!/bin/bash
# The pds_vfio example-setup-script (seed 000), re-rooted at mdevd's mirror:
# /sys is $SYS and `devlink` is `$MDEVD devlink --run-dir $RUN`; nothing else
# differs from the seed.  Usage: SYS=<mirror> RUN=<run dir> [MDEVD=mdevd] pds_setup.sh
set -e
SYS=${SYS:?set SYS to the sysfs mirror}
RUN=${RUN:?set RUN to mdevd run dir}
MDEVD=${MDEVD:-mdevd}
devlink() { $MDEVD devlink --run-dir "$RUN" "$@"; }

PF_BUS="0000:60"
PF_BDF="0000:60:00.0"
VF_BDF="0000:60:00.1"

# Enable live migration VF auxiliary device(s)
devlink dev param set pci/$PF_BDF name enable_lm value true cmode runtime

# Prevent nvme driver from probing the NVMe VF device
echo 0 > $SYS/class/pci_bus/$PF_BUS/device/$PF_BDF/sriov_drivers_autoprobe

# Create single VF for NVMe Live Migration via VFIO
echo 1 > $SYS/bus/pci/drivers/pds_core/$PF_BDF/sriov_numvfs

# Allow the VF to be bound to the pds_vfio driver
echo "pds_vfio" > $SYS/class/pci_bus/$PF_BUS/device/$VF_BDF/driver_override

# Bind the VF to the pds_vfio driver
echo "$VF_BDF" > $SYS/bus/pci/drivers/pds_vfio/bind

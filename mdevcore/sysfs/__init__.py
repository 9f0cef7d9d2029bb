"""The sysfs mirror: an mdev view of the core as a sysfs-like tree, and FUSE."""

from mdevcore.sysfs.mdev_view import MdevSysfs, qemu_device_arg
from mdevcore.sysfs.tree import Attr, Dir, Link, Node, SysfsTree

__all__ = ["Attr", "Dir", "Link", "MdevSysfs", "Node", "SysfsTree", "qemu_device_arg"]

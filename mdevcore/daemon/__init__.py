"""mdevd: the daemon that mounts the sysfs mirror and serves mdevs over vfio-user."""

"""mdevcore: mediated devices (mdev) in userspace, served to QEMU over vfio-user.

``__version__`` is the package's one version: pyproject.toml reads it for
the metadata, and ``mdevd --version`` and ``vfio-user-cli --version`` print it.
"""

__version__ = "0.1.0"

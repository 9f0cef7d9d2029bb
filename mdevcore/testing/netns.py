"""Network namespaces for tests: made with ``ip netns add``, deleted afterwards.

``netns(prefix)`` yields the name of a fresh namespace (IPv6 off, lo up);
``run_in(ns, *argv)`` runs a command inside it; ``needs_netns`` skips a
test where namespaces and TAPs cannot be made (not root, no tun, no ip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)


def run_in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, timeout=30
    )


@contextmanager
def netns(prefix: str) -> Iterator[str]:
    """A fresh namespace (IPv6 off, so the kernel sends no stray frames), lo up."""
    name = f"{prefix}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        run_in(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        run_in(name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        run_in(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)

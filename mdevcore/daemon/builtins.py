"""The parents mdevd registers at start, and --parent specs for more.

A built-in whose module is not importable (not written yet, or left out
of an install) is skipped with a log line, so the list can name parents
that are still being developed (pds joins here).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdevcore.core import MdevCore, Parent
from mdevcore.driver import MdevDriver

if TYPE_CHECKING:
    from mdevcore.daemon.hosts import HostedParent

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ParentSpec:
    module: str
    factory: str  # attribute of the module called with no arguments
    location: str  # sysfs directory; its last component is the parent name

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def parse(cls, text: str) -> ParentSpec:
        """Parse ``module:factory@location``.

        e.g. ``samples.mtty:MttyDriver@devices/virtual/mtty/mtty``.
        """
        target, sep, location = text.partition("@")
        module, sep2, factory = target.partition(":")
        if not (sep and sep2 and module and factory and location):
            raise ValueError(f"parent spec {text!r} is not module:factory@location")
        return cls(module=module, factory=factory, location=location)


BUILTIN_PARENTS: tuple[ParentSpec, ...] = (
    ParentSpec("samples.mtty", "MttyDriver", "devices/virtual/mtty/mtty"),
)


def load_driver(spec: ParentSpec) -> MdevDriver:
    module = importlib.import_module(spec.module)
    driver: MdevDriver = getattr(module, spec.factory)()
    return driver


def register(core: MdevCore, specs: tuple[ParentSpec, ...], *, required: bool) -> list[Parent]:
    """Register each spec; a missing module is fatal only when ``required``."""
    parents = []
    for spec in specs:
        try:
            driver = load_driver(spec)
        except (ImportError, AttributeError) as e:
            if required:
                raise OSError(errno.ENOENT, f"parent {spec.module}: {e}") from None
            log.info("built-in parent %s not available (%s); skipped", spec.name, e)
            continue
        except Exception as e:
            if required:
                raise OSError(errno.EIO, f"parent {spec.module}: {e!r}") from None
            log.exception("built-in parent %s failed to load; skipped", spec.name)
            continue
        parents.append(core.register_parent(spec.name, spec.location, driver))
    return parents


# --- hosted parents (not mdevs: a PF and its VFs, see mdevcore.daemon.hosts) ---


@dataclasses.dataclass(frozen=True, slots=True)
class HostSpec:
    name: str  # its options come from --<name>-* flags
    module: str
    factory: str  # classmethod called as factory(options, run_dir)


BUILTIN_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("pds", "parents.pds.driver", "PdsHost.from_options"),
)


def load_hosts(
    specs: tuple[HostSpec, ...], options: dict[str, dict[str, str]], run_dir: Path
) -> list[HostedParent]:
    """Build each hosted parent; an unimportable module is skipped, bad options are fatal."""
    hosts = []
    for spec in specs:
        try:
            target: Any = importlib.import_module(spec.module)
        except ImportError as e:
            log.info("built-in host %s not available (%s); skipped", spec.name, e)
            continue
        for attr in spec.factory.split("."):
            target = getattr(target, attr)
        try:
            hosts.append(target(options.get(spec.name, {}), run_dir))
        except ValueError as e:
            raise OSError(errno.EINVAL, f"{spec.name}: {e}") from None
    return hosts

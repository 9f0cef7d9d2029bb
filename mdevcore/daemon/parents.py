"""The parents mdevd registers: installed plug-ins, and ``--parent`` specs.

Plug-ins come from ``mdevcore.plugins`` (entry points).  ``--parent
MODULE:FACTORY@LOCATION`` registers a driver that is not packaged as a
plug-in (the factory is called with no arguments; the location's last
component is the parent name).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mdevcore.core import MdevCore, Parent
from mdevcore.driver import MdevDriver
from mdevcore.loader import load_object
from mdevcore.plugins import Discovered

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

        e.g. ``mdevcore.samples.mtty:MttyDriver@devices/virtual/mtty/mtty``.
        """
        target, sep, location = text.partition("@")
        module, sep2, factory = target.partition(":")
        if not (sep and sep2 and module and factory and location):
            raise ValueError(f"parent spec {text!r} is not module:factory@location")
        return cls(module=module, factory=factory, location=location)


def register_specs(core: MdevCore, specs: Iterable[ParentSpec]) -> list[Parent]:
    """Register each ``--parent`` spec; any failure is fatal and says which."""
    parents = []
    for spec in specs:
        target = f"{spec.module}:{spec.factory}"
        try:
            driver: MdevDriver = load_object(target)()
        except OSError:
            raise
        except Exception as e:
            raise OSError(errno.EIO, f"parent {target}: {e!r}") from None
        parents.append(_register(core, spec.name, spec.location, driver, target))
    return parents


def _register(core: MdevCore, name: str, location: str, driver: MdevDriver, what: str) -> Parent:
    try:
        return core.register_parent(name, location, driver)
    except ValueError as e:  # an incomplete driver: say so, without a traceback
        raise OSError(errno.EINVAL, f"parent {what}: {e}") from None


def register_plugins(
    core: MdevCore,
    found: Iterable[Discovered],
    options: Mapping[str, Mapping[str, str]],
    run_dir: Path,
) -> list[HostedParent]:
    """Register the mdev plug-ins and build the hosted ones (started later)."""
    hosts: list[HostedParent] = []
    for d in found:
        p = d.plugin
        opts = options.get(p.name, {})
        try:
            if p.driver is not None:
                _register(core, p.name, p.location, p.driver(opts), d.source)
            elif p.host is not None:
                hosts.append(p.host(opts, run_dir))
        except OSError as e:
            if e.filename is not None or not e.strerror:
                raise  # a path: mdevd's error line says what the path is for
            reason = e.strerror.removeprefix(f"{p.name}: ")
            raise OSError(e.errno, f"cannot set up parent plug-in {p.name}: {reason}") from None
        except Exception as e:
            raise OSError(errno.EIO, f"parent plug-in {p.name} ({d.source}): {e!r}") from None
        log.info("parent plug-in %s (%s) registered", p.name, d.source)
    return hosts

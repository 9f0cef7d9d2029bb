"""Parents as plug-ins: what an installed package offers mdevd.

A parent package declares an entry point in the group ``mdevcore.parents``
whose object is a :class:`ParentPlugin`::

    [project.entry-points."mdevcore.parents"]
    mydev = "mydev.plugin:PLUGIN"

``mdevd serve`` registers every installed plug-in (``--no-parent NAME``
leaves one out), ``mdevd parents`` lists them, and ``--parent-opt
NAME.KEY=VALUE`` passes options, so no parent needs the daemon edited.
mtty and pds are plug-ins of this package like any other.

Two kinds: an **mdev** parent gives a driver factory (it gets its options)
and the sysfs location it registers at; a **hosted** parent (an SR-IOV
card, see ``mdevcore.daemon.hosts``) gives a factory of a HostedParent.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdevcore.daemon.hosts import HostedParent
    from mdevcore.driver import MdevDriver

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mdevcore.parents"

Options = Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class ParentPlugin:
    """One parent an installed package offers (see the module doc).

    ``options`` maps each option the plug-in takes to its help text; the
    values reach the factory as strings (unset ones are absent).
    """

    name: str
    summary: str
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # mdev parents: the driver factory and where the parent appears in sysfs.
    driver: Callable[[Options], MdevDriver] | None = None
    location: str = ""
    # hosted parents: factory(options, run_dir).
    host: Callable[[Options, Path], HostedParent] | None = None

    def __post_init__(self) -> None:
        if (self.driver is None) == (self.host is None):
            raise ValueError(f"plug-in {self.name!r}: give exactly one of driver or host")
        if self.driver is not None and not self.location:
            raise ValueError(f"plug-in {self.name!r}: an mdev parent needs a sysfs location")

    @property
    def kind(self) -> str:
        return "mdev" if self.driver is not None else "hosted"


@dataclasses.dataclass(frozen=True)
class Discovered:
    plugin: ParentPlugin
    source: str  # "package:object" of the entry point, for listings and errors


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> list[Discovered]:
    """Every installed plug-in, sorted by name; broken ones are logged and left out."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    found: dict[str, Discovered] = {}
    for ep in entry_points:
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party package must not stop mdevd
            log.error("parent plug-in %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if not isinstance(plugin, ParentPlugin):
            log.error("parent plug-in %s (%s) is not a ParentPlugin", ep.name, ep.value)
            continue
        if plugin.name in found:
            log.error(
                "parent plug-in %s from %s ignored: %s has the name",
                plugin.name,
                ep.value,
                found[plugin.name].source,
            )
            continue
        found[plugin.name] = Discovered(plugin, ep.value)
    return [found[name] for name in sorted(found)]


def parse_options(
    texts: Iterable[str], plugins: Iterable[ParentPlugin]
) -> dict[str, dict[str, str]]:
    """``NAME.KEY=VALUE`` strings -> {NAME: {KEY: VALUE}}, checked against the plug-ins.

    EINVAL names what is wrong: the syntax, an unknown plug-in or an
    option the plug-in does not take.
    """
    known = {p.name: p for p in plugins}
    options: dict[str, dict[str, str]] = {}
    for text in texts:
        target, sep, value = text.partition("=")
        name, dot, key = target.partition(".")
        if not (sep and dot and name and key):
            raise OSError(errno.EINVAL, f"--parent-opt {text!r} is not NAME.KEY=VALUE")
        plugin = known.get(name)
        if plugin is None:
            raise OSError(errno.EINVAL, f"--parent-opt {text!r}: no parent plug-in {name!r}")
        if key not in plugin.options:
            offered = ", ".join(sorted(plugin.options)) or "none"
            raise OSError(
                errno.EINVAL,
                f"--parent-opt {text!r}: {name} takes no {key!r} (it takes: {offered})",
            )
        options.setdefault(name, {})[key] = value
    return options


def describe(found: Iterable[Discovered]) -> str:
    """What ``mdevd parents`` prints."""
    lines = []
    for d in found:
        p = d.plugin
        where = f" at {p.location}" if p.location else ""
        lines.append(f"{p.name}  ({p.kind} parent{where}; {d.source})")
        lines.append(f"    {p.summary}")
        for key, help_text in sorted(p.options.items()):
            lines.append(f"    --parent-opt {p.name}.{key}=...  {help_text}")
    if not lines:
        lines.append(f"no parent plug-ins installed (entry point group {ENTRY_POINT_GROUP})")
    return "\n".join(lines)

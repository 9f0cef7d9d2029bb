"""``mdevd serve``'s config file: the same options as its flags, in TOML.

A key is a long flag of ``mdevd serve`` without its dashes; a parent's
``--parent-opt NAME.KEY=VALUE`` options are the table ``[parents.NAME]``::

    run-dir = "/run/mdevd"
    sysfs = "/run/mdevd/sys"          # the mirror's mount point
    persist = "/var/lib/mdevd/persist"
    transport = "native"
    parent-transport = { mtty = "libvfio-user" }
    no-parent = ["ifcvf"]
    log-format = "json"
    log-level = "info"

    [parents.pds]
    backing_dir = "/var/lib/mdevd/pds"
    doorbells = "mmap"

Flags given on the command line win over the file; list flags
(``--parent-opt``, ``--no-parent``, ``--parent``) add to it, and a
``--parent-opt`` or ``--pds-*`` flag wins over the same parent option in
the file.  A file that is not TOML, a key ``mdevd serve`` has no flag
for, or a value of the wrong type is refused with the file, line and key.

The keys follow the parser (:func:`flag_keys`), so a flag added to
``mdevd serve`` is a key here without a change to this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_PATH = Path("/etc/mdevd/mdevd.toml")

# Flags that are not keys: the file itself, and spellings with a better key
# (--verbose is log-level = "debug", --no-pds and --pds-* are [parents.pds]
# or no-parent, --parent-opt is the [parents.NAME] tables).
_NOT_KEYS = frozenset({"help", "config", "no-config", "verbose", "parent-opt", "no-pds"})
_NOT_KEY_PREFIXES = ("pds-",)
PARENTS = "parents"
# Flag types that also take a TOML number (spin-us = 50), marked by numeric().
_NUMERIC: set[object] = set()
_Converted = TypeVar("_Converted")


def numeric(convert: Callable[[str], _Converted]) -> Callable[[str], _Converted]:
    """Mark a flag's ``type`` as a number's: its key takes a TOML number as well as text."""
    _NUMERIC.add(convert)
    return convert


@dataclasses.dataclass
class ConfigError(Exception):
    """What is wrong with the file, and where: ``FILE:LINE: KEY: MESSAGE``."""

    path: Path
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Config:
    """A parsed file: where it is, its text (for line numbers), its tables."""

    path: Path
    text: str
    document: Mapping[str, Any]

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, key_line(self.text, key), key, message)


def load(path: Path) -> Config:
    """Read and parse ``path``; OSError if unreadable, ConfigError if not TOML."""
    text = path.read_text(encoding="utf-8")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message ends "(at line L, column C)"; say it the FILE:LINE way.
        line = _decode_line(str(e))
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)$", "", str(e))
        raise ConfigError(path, line, None, f"not valid TOML: {message}") from None
    return Config(path, text, document)


def _decode_line(message: str) -> int | None:
    match = re.search(r"at line (\d+)", message)
    return int(match[1]) if match else None


def flag_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The file's keys: each long flag of ``parser`` (without ``--``) but _NOT_KEYS."""
    keys = {}
    for action in parser._actions:
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            key = option[2:]
            if key not in _NOT_KEYS and not key.startswith(_NOT_KEY_PREFIXES):
                keys[key] = action
    return keys


def parser_defaults(
    config: Config,
    parser: argparse.ArgumentParser,
    parent_options: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """The file as ``parser.set_defaults(**...)`` arguments, every value checked.

    ``parent_options`` maps each installed parent plug-in to the option
    names it takes; with it, ``[parents.NAME]`` tables are checked against
    it here (naming the line) rather than when the daemon starts.
    """
    keys = flag_keys(parser)
    defaults: dict[str, Any] = {}
    for key, value in config.document.items():
        if key == PARENTS:
            defaults["parent_opt"] = _parent_options(config, value, parent_options)
            continue
        action = keys.get(key)
        if action is None:
            close = difflib.get_close_matches(key, [*keys, PARENTS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise config.error(key, f"unknown key{hint}; the keys are mdevd serve's flags")
        defaults[action.dest] = _value(config, key, action, value)
    return defaults


def _value(config: Config, key: str, action: argparse.Action, value: object) -> Any:
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise config.error(key, f"expected true or false, not {_kind(value)}")
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict) and "=" in (action.metavar or ""):
            # parent-transport = { mtty = "libvfio-user" }: PARENT=TRANSPORT items
            items = [f"{k}={_string(config, f'{key}.{k}', v)}" for k, v in value.items()]
        elif isinstance(value, list):
            items = [_string(config, key, v) for v in value]
        else:
            raise config.error(key, f"expected an array of strings, not {_kind(value)}")
        return [_converted(config, key, action, item) for item in items]
    if action.type in _NUMERIC and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return _converted(config, key, action, _string(config, key, value))


def _converted(config: Config, key: str, action: argparse.Action, text: str) -> Any:
    if action.choices is not None and text not in action.choices:
        raise config.error(key, f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    if not callable(action.type):
        return text
    try:
        return action.type(text)  # as argparse converts and checks the flag's value
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise config.error(key, str(e)) from None


def _string(config: Config, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise config.error(key, f"expected a string, not {_kind(value)}")
    return value


def _parent_options(
    config: Config, tables: object, known: Mapping[str, Collection[str]] | None
) -> list[str]:
    """``[parents.NAME] KEY = VALUE`` -> ["NAME.KEY=VALUE", ...] (--parent-opt's form)."""
    if not isinstance(tables, dict):
        raise config.error(PARENTS, f"expected tables [parents.NAME], not {_kind(tables)}")
    options = []
    for name, table in tables.items():
        where = f"{PARENTS}.{name}"
        if not isinstance(table, dict):
            raise config.error(where, f"expected a table of options, not {_kind(table)}")
        if known is not None and name not in known:
            offered = ", ".join(sorted(known)) or "none"
            raise config.error(where, f"no parent plug-in {name!r} (installed: {offered})")
        for key, value in table.items():
            if known is not None and key not in known[name]:
                offered = ", ".join(sorted(known[name])) or "none"
                raise config.error(
                    f"{where}.{key}", f"{name} takes no {key!r} (it takes: {offered})"
                )
            options.append(f"{name}.{key}={_option_text(config, f'{where}.{key}', value)}")
    return options


def _option_text(config: Config, key: str, value: object) -> str:
    """A parent option's value as --parent-opt would give it (options are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise config.error(key, f"expected a string, number or boolean, not {_kind(value)}")


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"


# -- where a key is written ------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_NAME = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""  # a bare or quoted key
_KEY = re.compile(rf"^\s*({_NAME}(?:\s*\.\s*{_NAME})*)\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", dotted))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Each key's (and table's) first line, by its dotted path.

    A small pass over the lines, enough for what tomllib accepted: table
    headers set the prefix, ``key =`` lines add to it; a key inside an
    inline table or a multi-line array is found at its outer key's line.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header is not None:
            table = _parts(header[1])
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key is not None:
            path = table + _parts(key[1])
            for end in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:end], number)
    return lines


def key_line(text: str, dotted: str) -> int | None:
    """The line of ``dotted`` (e.g. "parents.pds.doorbells"), or of its nearest table."""
    lines = key_lines(text)
    path = _parts(dotted)
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None

"""Coverage-guided fuzzing (atheris/libFuzzer) of what a client, a guest or a peer feeds us.

Each target (``tools/fuzz/targets/``) starts from a state a real client
reaches, runs one input, and checks invariants: a broken one raises
:class:`Finding`.  ``python -m mdevcore.tools.fuzz TARGET --seconds N`` runs a
target under atheris with the repo corpus (``tests/fuzz/corpus/TARGET``)
as seeds and prints executions, edge coverage and findings;
``python -m mdevcore.tools.fuzz.seeds`` rebuilds the seeds from recorded traffic;
``tests/fuzz`` replays the corpus (plus fixed mutations) in CI.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz" / "corpus"

# target name -> module under mdevcore.tools.fuzz.targets
TARGETS = {
    "engine": "engine",
    "nvme": "nvme",
    "migration": "migration",
    "sysfs": "sysfs",
    "virtio": "virtio",
}


class Finding(AssertionError):
    """An invariant a target checks did not hold for this input."""


class Target(Protocol):
    """One fuzz target: set up once, then ``run`` per input (raises Finding)."""

    def run(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def load(name: str) -> Target:
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    module = importlib.import_module(f"mdevcore.tools.fuzz.targets.{TARGETS[name]}")
    target: Target = module.make()
    return target


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def open_fds() -> int:
    """How many fds this process holds (the leak check)."""
    return len(os.listdir("/proc/self/fd"))


def check(condition: object, why: str) -> None:
    if not condition:
        raise Finding(why)

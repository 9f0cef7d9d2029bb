"""The atheris process of one run (started by ``python -m mdevcore.tools.fuzz``).

``python -m mdevcore.tools.fuzz.child TARGET FINDINGS_DIR [libFuzzer args...]``.
mdevcore, samples, parents and the target are imported under atheris's
instrumentation so libFuzzer sees their edges.  An input that breaks an
invariant (or raises anything) is a finding: kept in FINDINGS_DIR once per
distinct failure (exception type and innermost project frame), reported on
stderr, and fuzzing goes on, so one run reports every distinct finding.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import traceback
from pathlib import Path

import atheris

import mdevcore.tools.fuzz as fuzz

INSTRUMENTED = ["mdevcore"]  # parents, samples and the targets are inside it


def signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in the project's code."""
    # The check() helper is not the place: the frame that called it is.
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/site-packages/" not in f.filename and not f.filename.endswith("tools/fuzz/__init__.py")
    ]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}@{where}"


def main() -> None:
    name, findings_dir = sys.argv[1], Path(sys.argv[2])
    findings_dir.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=INSTRUMENTED):
        target = fuzz.load(name)
    seen: set[str] = {p.name.split("--")[0] for p in findings_dir.iterdir()}

    def one_input(data: bytes) -> None:
        try:
            target.run(data)
        except Exception as exc:
            sig = signature(exc)
            key = hashlib.sha1(sig.encode()).hexdigest()[:12]
            if key in seen:
                return
            seen.add(key)
            path = findings_dir / f"{key}--{hashlib.sha1(data).hexdigest()[:12]}"
            path.write_bytes(data)
            path.with_suffix(".txt").write_text(
                sig + "\n" + "".join(traceback.format_exception(exc))
            )
            print(f"FINDING {sig} {str(exc)[:200]!r} input {path}", file=sys.stderr, flush=True)

    # libFuzzer re-executes argv[0] for -merge (and -fork): give it a
    # command that lands here again with the same target and findings.
    relaunch = findings_dir.parent / "relaunch.sh"
    relaunch.write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mdevcore.tools.fuzz.child "
        f'{shlex.quote(name)} {shlex.quote(str(findings_dir))} "$@"\n'
    )
    relaunch.chmod(0o755)
    module = sys.modules[f"mdevcore.tools.fuzz.targets.{fuzz.TARGETS[name]}"]
    mutator = getattr(module, "custom_mutator", None)
    extra = {}
    if mutator is not None:
        # A target that knows its input's structure mutates it itself (half
        # the time); libFuzzer's byte mutation does the rest.
        def mutate(data: bytes, max_size: int, seed: int) -> bytes:
            return bytes(mutator(data, max_size, seed, atheris.Mutate))

        extra["custom_mutator"] = mutate
    atheris.Setup([str(relaunch), *sys.argv[3:]], one_input, **extra)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Rebuild the seed corpus (tests/fuzz/corpus/TARGET/) from real traffic.

``python -m mdevcore.tools.fuzz.seeds [TARGET...]``.  Each target module's
``seeds()`` says where its inputs come from (recorded client sessions,
the NVMe host harness's commands, states saved by working devices).
Files are named ``seed-<what>``; inputs libFuzzer found and kept are
``cov-<sha1>`` and regression inputs ``finding-<what>``.
"""

from __future__ import annotations

import argparse
import importlib

from mdevcore.tools.fuzz import CORPUS, TARGETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mdevcore.tools.fuzz.seeds", description=__doc__
    )
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args(argv)
    for name in args.targets:
        module = importlib.import_module(f"mdevcore.tools.fuzz.targets.{TARGETS[name]}")
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("seed-*"):
            stale.unlink()
        seeds: dict[str, bytes] = module.seeds()
        for what, data in seeds.items():
            (folder / f"seed-{what}").write_bytes(data)
        print(f"{name}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

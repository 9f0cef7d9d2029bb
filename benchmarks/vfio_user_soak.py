"""vfio-user fuzz soak: random and mutated streams for as long as you like.

    .venv/bin/python benchmarks/vfio_user_soak.py [--seconds 600] [--seed N]

The same generator as tests/vfio_user/test_vfio_user_fuzz.py, run for a
time instead of a count, through the sans-IO engine over the test device.
Checks as it goes: nothing escapes, every output message is well formed,
well-framed streams get one reply per request in order; at the end, no fd
leaked.  Prints messages/s and connections; exits 1 on the first failure
(with the seed to replay it).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "vfio_user")]

from vfio_user_fakedev import FakeDevice  # noqa: E402
from vfio_user_fuzzgen import FuzzRun  # noqa: E402


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    logging.basicConfig(level=logging.CRITICAL)
    before = open_fds()
    device = FakeDevice()
    run = FuzzRun(device, random.Random(seed))
    start = time.monotonic()
    last = start
    try:
        while time.monotonic() - start < args.seconds:
            rate = run.rng.choice([0.0, 0.0, 0.02, 0.3])
            run.stream(
                run.rng.choice([1, 10, 100, 500]),
                mutate_rate=rate,
                negotiate=run.rng.random() < 0.97,
            )
            now = time.monotonic()
            if now - last >= 10:
                print(f"{now - start:6.0f}s {run.messages:>10,} messages "
                      f"{run.connections:>7,} connections", flush=True)  # fmt: skip
                last = now
    except Exception:
        traceback.print_exc()
        print(f"FAILED after {run.messages:,} messages; replay with --seed {seed}")
        return 1
    finally:
        run.conn.framer.close()
        device.close()
    elapsed = time.monotonic() - start
    leaked = open_fds() - before
    print(f"seed {seed}: {run.messages:,} messages in {elapsed:.0f}s "
          f"({run.messages / elapsed:,.0f}/s), {run.connections:,} connections, "
          f"leaked fds: {sorted(leaked) or 'none'}")  # fmt: skip
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())

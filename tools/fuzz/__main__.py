"""``python -m mdevcore.tools.fuzz TARGET --seconds N``: one coverage-guided run, then a summary.

The run happens in a child process (atheris/libFuzzer own it and end it
with exit()); this parent reads libFuzzer's log and prints executions,
edge coverage (libFuzzer's ``cov``: instrumented Python branches of
mdevcore/samples/parents/tools.fuzz) and findings.  Seeds come from
``tests/fuzz/corpus/TARGET``; inputs libFuzzer keeps go to the work
directory; ``--keep`` merges the ones that add coverage back into the repo
corpus (libFuzzer's -merge keeps a minimal covering set).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mdevcore.tools.fuzz import CORPUS, REPO, TARGETS, dicts

_DONE = re.compile(r"#(\d+)\s+(?:DONE|INITED|NEW|REDUCE|pulse)\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_EXECS = re.compile(r"stat::number_of_executed_units: (\d+)")


def run(
    target: str,
    seconds: int,
    runs: int | None,
    work: Path,
    nice: int,
    max_len: int,
    seed: int = 0,
    *,
    timeout: int = 30,
) -> dict[str, Any]:
    corpus = work / "corpus"
    findings = work / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    seeds.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "mdevcore.tools.fuzz.child",
        target,
        str(findings),
        str(corpus),
        str(seeds),
        f"-max_total_time={seconds}",
        f"-max_len={max_len}",
        "-print_final_stats=1",
        f"-timeout={timeout}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={work}/",
    ]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seed:
        args.append(f"-seed={seed}")
    if dicts.write(target, str(work / f"{target}.dict")):
        args.append(f"-dict={work / f'{target}.dict'}")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        args,
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: os.nice(nice),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = proc.stderr
    (work / "libfuzzer.log").write_text(log)
    stats: dict[str, Any] = {"returncode": proc.returncode, "cov": 0, "ft": 0, "corp": 0}
    # CPU time, not wall time, is what "an hour of fuzzing" means on a shared
    # machine where the run is niced below other work.
    stats["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats["execs"] = 0
    for line in _DONE.finditer(log):
        stats.update(execs=int(line[1]), cov=int(line[2]), ft=int(line[3]), corp=int(line[4]))
    if total := _EXECS.search(log):
        stats["execs"] = int(total[1])
    stats["findings"] = [line for line in log.splitlines() if line.startswith("FINDING ")]
    stats["crash"] = [line for line in log.splitlines() if "ERROR: libFuzzer" in line]
    return stats


def keep(target: str, work: Path, nice: int, limit: int) -> None:
    """Merge the work corpus into the repo corpus, adding only new coverage.

    At most ``limit`` inputs, smallest first: the repo keeps a small corpus
    that CI replays in seconds; the work directory keeps everything."""
    seeds = CORPUS / target
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as merged:
        subprocess.run(
            [sys.executable, "-m", "mdevcore.tools.fuzz.child", target, str(work / "findings"),
             merged, str(seeds), str(work / "corpus"), "-merge=1"],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.nice(nice), check=False,
        )  # fmt: skip
        import hashlib

        known = {hashlib.sha1(p.read_bytes()).hexdigest() for p in seeds.iterdir()}
        added = 0
        for p in sorted(Path(merged).iterdir(), key=lambda p: p.stat().st_size):
            if added == limit:
                break
            data = p.read_bytes()
            digest = hashlib.sha1(data).hexdigest()
            if digest not in known:
                (seeds / f"cov-{digest[:16]}").write_bytes(data)
                added += 1
        print(f"kept {added} new inputs in {seeds}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdevcore.tools.fuzz", description=__doc__)
    parser.add_argument("target", choices=list(TARGETS))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=None, help="stop after this many inputs")
    parser.add_argument("--work", type=Path, default=None, help="default /tmp/mdevcore-fuzz/TARGET")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's -seed (0: random)")
    parser.add_argument(
        "--timeout",
        type=int,
        default=30,
        metavar="S",
        help="wall seconds one input may take before it counts as a hang (libFuzzer's "
        "-timeout); raise it when the run may be stopped (SIGSTOP) and resumed",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=0,
        metavar="N",
        help="merge up to N inputs that add coverage into the repo corpus",
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.gettempdir()) / "mdevcore-fuzz" / args.target
    started = time.monotonic()
    s = run(
        args.target,
        args.seconds,
        args.runs,
        work,
        args.nice,
        args.max_len,
        args.seed,
        timeout=args.timeout,
    )
    print(
        f"{args.target}: {s['execs']} executions in {time.monotonic() - started:.0f}s "
        f"({s['cpu']:.0f} CPU seconds), "
        f"coverage {s['cov']} edges ({s['ft']} features), corpus {s['corp']} inputs, "
        f"{len(s['findings'])} findings, libFuzzer exit {s['returncode']}"
    )
    for line in s["findings"] + s["crash"]:
        print("  " + line)
    print(f"  log: {work / 'libfuzzer.log'}; findings: {work / 'findings'}")
    if args.keep:
        keep(args.target, work, args.nice, args.keep)
    return 1 if s["findings"] or s["crash"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

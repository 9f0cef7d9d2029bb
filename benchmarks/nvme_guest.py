"""Guest-level 4 KiB random-read IOPS: our pds NVMe VF against QEMU's own NVMe.

Boots lab guests (mdevcore.tools.lab, TCG on these machines) that run fio
(libaio, O_DIRECT, 4 KiB randread) at queue depth 1 and 32 on
/dev/nvme0n1, once per device variant, all over the same backing file:

  qemu-nvme     QEMU's built-in ``-device nvme`` (cache=none)
  pds-trapped   our VF over vfio-user, doorbells as REGION_WRITE messages
  pds-mmap      our VF over vfio-user, doorbells in an mmapped page, polled
  lvu-trapped   pds-trapped with the VF served through libvfio-user (cffi)
  lvu-mmap      pds-mmap through libvfio-user

A variant may end in ``@US``: its connection thread polls that many
microseconds for the next request (``DeviceServer(spin_us=)``; 0 = the
path before PdsNvmeVf.request_spin_us).  ``+py`` after the mode (for
example ``pds-trapped+py``) runs every command in Python, without the C
read/write path (``VfConfig(fast_io=False)``, mdevcore.nvme.fastio).

Prints IOPS and fio's completion-latency p50/p99 per variant and depth,
and the ratio of each VF variant's IOPS to QEMU's.

    .venv/bin/python benchmarks/nvme_guest.py [--seconds 10] [--size-mib 256] [--rounds 3]

On a shared VM the figures of one boot swing by half from one run to the
next; ``--rounds N`` boots the variants N times, interleaved, and takes
the ratios of the medians, and also prints each round's ratio to QEMU's
boot of that round ("paired").  Every boot prints ``steal``, the share of
this VM's CPU the hypervisor took during it; ``--max-steal P`` boots a
variant again (at most ``--retries`` times) when that passed P%, and the
least stolen boot counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, TypeVar

import trio

from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer

DEPTHS = (1, 32)
T = TypeVar("T")


def guest_script(seconds: int, size_mib: int, depths: tuple[int, ...] = DEPTHS) -> str:
    jobs = "\n".join(
        f"fio --name=qd{qd} --filename=/dev/nvme0n1 --rw=randread --bs=4k --direct=1 "
        f"--ioengine=libaio --iodepth={qd} --size={size_mib}M --runtime={seconds} "
        f"--time_based --ramp_time=1 --output-format=json > /tmp/qd{qd}.json 2>/tmp/qd{qd}.err"
        f' && echo "RESULT qd{qd} $(tr -d "\\n" < /tmp/qd{qd}.json)" || cat /tmp/qd{qd}.err'
        for qd in depths
    )
    return f"""
modprobe nvme
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
{jobs}
"""


@dataclasses.dataclass(frozen=True)
class Figures:
    """One fio job's result: IOPS and completion-latency percentiles (microseconds)."""

    iops: float
    p50_us: float = 0.0
    p99_us: float = 0.0

    def show(self) -> str:
        return f"{self.iops:7.0f} IOPS (clat p50 {self.p50_us:7.0f} us, p99 {self.p99_us:7.0f} us)"


NONE = Figures(0.0)  # a depth whose job printed nothing


def _percentile(read: dict[str, Any], pct: str) -> float:
    """A clat percentile in us; fio keys them "50.000000" (absent when no I/O completed)."""
    table = read.get("clat_ns", {}).get("percentile", {})
    return float(table.get(pct, 0)) / 1000


def parse(output: str) -> dict[int, Figures]:
    figures = {}
    for line in output.splitlines():
        if line.startswith("RESULT qd"):
            tag, _, blob = line[len("RESULT ") :].partition(" ")
            data = json.loads(blob[blob.index("{") :])
            read = data["jobs"][0]["read"]
            figures[int(tag[2:])] = Figures(
                float(read["iops"]),
                _percentile(read, "50.000000"),
                _percentile(read, "99.000000"),
            )
    return figures


async def run_vf(
    lab: Lab,
    backing: str,
    size_mib: int,
    mode: DoorbellMode,
    script: str,
    timeout: float,
    transport: str = "native",
    spin_us: float | None = None,
    fast_io: bool = True,
) -> dict[int, Figures]:
    workdir = tempfile.mkdtemp(prefix="nvb-")
    config = VfConfig(
        backing=backing, size=size_mib << 20, doorbells=mode, io_queues=4, fast_io=fast_io
    )
    vf = PdsNvmeVf(config)
    sock = os.path.join(workdir, "vf.sock")
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})
    try:
        async with trio.open_nursery() as nursery:
            if transport == "libvfio-user":
                from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

                server = LibvfioUserServer(vf, sock, name=f"lvu-{mode.value}")
                await nursery.start(server.serve)
            else:
                native = DeviceServer(vf, sock, name=f"pds-{mode.value}", spin_us=spin_us)
                await nursery.start(native.serve)
            result = await lab.aboot(
                script, devices=[device], timeout=timeout, extra_binaries=["fio"]
            )
            nursery.cancel_scope.cancel()
    finally:
        vf.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if result.rc != 0:
        raise RuntimeError(f"guest failed:\n{result.output}")
    ctrl, fast = vf.controller, vf.controller.fast_io
    # How often the guest trapped: shadow doorbells (EventIdx) should make it rare.
    print(
        f"  ({mode.value}: {ctrl.commands_done} commands, "
        f"{fast.commands if fast else 0} of them in C ({fast.batched if fast else 0} in AIO "
        f"batches), "
        f"{ctrl.doorbell_traps} trapped doorbell "
        f"writes, shadow doorbells {'on' if ctrl.shadow is not None else 'off'} at the end)",
        flush=True,
    )
    return parse(result.output)


def run_qemu_nvme(lab: Lab, backing: str, script: str, timeout: float) -> dict[int, Figures]:
    args = [
        "-drive", f"file={backing},if=none,id=bench,format=raw,cache=none,aio=threads",
        "-device", "nvme,drive=bench,serial=qemubench",
    ]  # fmt: skip
    result = lab.boot(script, qemu_args=args, timeout=timeout, extra_binaries=["fio"])
    if result.rc != 0:
        raise RuntimeError(f"guest failed:\n{result.output}")
    return parse(result.output)


def fill(path: str, size_mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)


def run_variant(
    lab: Lab, variant: str, backing: str, size_mib: int, script: str, timeout: float
) -> dict[int, Figures]:
    if variant == "qemu-nvme":
        return run_qemu_nvme(lab, backing, script, timeout)
    name, _, spin = variant.partition("@")
    name, _, flavour = name.partition("+")
    kind, _, mode_name = name.partition("-")
    transport = "libvfio-user" if kind == "lvu" else "native"
    spin_us = float(spin) if spin else None
    return trio.run(
        run_vf, lab, backing, size_mib, DoorbellMode(mode_name), script, timeout, transport,
        spin_us, flavour != "py",
    )  # fmt: skip


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest
    # time is counted in user already.
    return fields[7], sum(fields[:8])


def steal_since(before: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor took from this VM since ``before``.

    Why print it: on a shared host the same boot varies 2x in IOPS, and
    a run whose vCPUs were stolen says so instead of passing for a slow
    device.
    """
    steal, total = cpu_ticks()
    return (steal - before[0]) / max(1, total - before[1])


def lower_median(ordered: list[T]) -> T:
    """The median of a sorted, non-empty list: the lower one of an even count."""
    return ordered[(len(ordered) - 1) // 2]


def median_figures(runs: list[dict[int, Figures]]) -> dict[int, Figures]:
    """Per depth, the round with the median IOPS, its percentiles with it."""
    out = {}
    for qd in DEPTHS:
        have = sorted((r[qd] for r in runs if qd in r), key=lambda f: f.iops)
        if have:
            out[qd] = lower_median(have)
    return out


def row(label: str, figures: dict[int, Figures]) -> str:
    """One printed line: a label, then each depth's figures."""
    return f"{label:15s} " + "  ".join(f"qd{qd}: {figures.get(qd, NONE).show()}" for qd in DEPTHS)


def paired_ratios(runs: list[dict[int, Figures]], refs: list[dict[int, Figures]]) -> str:
    """Per depth, each round's IOPS ratio to the reference's boot in that round,
    and their median."""
    out = []
    for qd in DEPTHS:
        ratios = sorted(
            r[qd].iops / ref[qd].iops
            for r, ref in zip(runs, refs, strict=False)
            if qd in r and qd in ref and ref[qd].iops
        )
        if ratios:
            each = " ".join(f"{x:.2f}" for x in ratios)
            out.append(f"qd{qd}: {each} (median {lower_median(ratios):.2f}x)")
    return "  ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="fio runtime per depth")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--variants", default="qemu-nvme,pds-trapped,pds-mmap")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="boot every variant this many times, interleaved; ratios of the medians",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        default=None,
        help="boot a variant again when the hypervisor stole more than this %% of the "
        "VM's CPU during it (a shared host's noise, not the device's); the least "
        "stolen boot counts",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="with --max-steal: at most this many boots again per variant (default 2)",
    )
    args = parser.parse_args()
    if args.retries is not None and args.max_steal is None:
        parser.error("--retries: boots are repeated only for --max-steal")
    max_steal = 100.0 if args.max_steal is None else args.max_steal
    retries = 2 if args.retries is None else args.retries
    logging.basicConfig(level=logging.WARNING)
    lab = Lab.ensure()
    # The backing file must be inside a directory the lab can bind into the chroot.
    workdir = tempfile.mkdtemp(prefix="nvme-bench-")
    backing = os.path.join(workdir, "backing.img")
    timeout = 120 + 4 * args.seconds * len(DEPTHS)
    script = guest_script(args.seconds, args.size_mib)
    rounds: dict[str, list[dict[int, Figures]]] = {}
    try:
        fill(backing, args.size_mib)
        for n in range(args.rounds):
            for variant in args.variants.split(","):
                label = variant if args.rounds == 1 else f"{variant} #{n + 1}"
                # (steal %, figures) of each boot; the least stolen one counts.
                boots: list[tuple[float, dict[int, Figures]]] = []
                while len(boots) <= retries:
                    ticks = cpu_ticks()
                    figures = run_variant(lab, variant, backing, args.size_mib, script, timeout)
                    boots.append((100 * steal_since(ticks), figures))
                    print(f"{row(label, figures)}  steal {boots[-1][0]:4.1f}%", flush=True)
                    if boots[-1][0] <= max_steal:
                        break
                steal, figures = min(boots, key=lambda boot: boot[0])
                if len(boots) > 1:
                    print(f"{label:15s} counts the boot with {steal:.1f}% stolen", flush=True)
                rounds.setdefault(variant, []).append(figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {variant: median_figures(runs) for variant, runs in rounds.items()}
    if args.rounds > 1:
        for variant, figures in results.items():
            print(row(f"{variant} median", figures))
    ref = results.get("qemu-nvme")
    if ref:
        for variant, iops in results.items():
            if variant != "qemu-nvme":
                ratios = "  ".join(
                    f"qd{qd}: {iops.get(qd, NONE).iops / ref[qd].iops:5.2f}x"
                    for qd in DEPTHS
                    if qd in ref and ref[qd].iops
                )
                print(f"ratio {variant} / qemu-nvme  {ratios}")
        if args.rounds > 1:
            # A round's boots follow one another; the rounds lie further apart,
            # so on a drifting host the ratio within a round is the steadier one.
            for variant, runs in rounds.items():
                if variant != "qemu-nvme":
                    paired = paired_ratios(runs, rounds["qemu-nvme"])
                    print(f"paired {variant} / qemu-nvme  {paired}")
    accel = lab.info()["accel"]
    print(f"(guest: 1 vCPU, accel={accel}, {args.seconds}s per depth, {args.size_mib} MiB span)")


if __name__ == "__main__":
    main()

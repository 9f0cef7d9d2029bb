"""Seeds from real QEMU and Linux traffic: one lab guest boot, two devices.

``python -m mdevcore.tools.fuzz.capture_qemu`` (needs the QEMU lab, root).  A
Counter and a 2-port mtty are served from this process; QEMU's
vfio-user-pci realizes both (VERSION, region and IRQ info, DMA_MAP of
guest RAM with its memfd, SET_IRQS), the guest kernel enumerates them
(config space walk, BAR sizing), and a script reaches their BARs.  What
each server received becomes ``tests/fuzz/corpus/engine/qemu-*``.
"""

from __future__ import annotations

from contextlib import ExitStack

from mdevcore.samples.counter import Counter
from mdevcore.samples.mtty.device import MttyDevice
from mdevcore.sysfs.mdev_view import qemu_device_arg
from mdevcore.testing import serve
from mdevcore.tools.fuzz import CORPUS
from mdevcore.tools.fuzz.record import tap, without_version
from mdevcore.tools.fuzz.targets.engine import encode

SCRIPT = """
for d in /sys/bus/pci/devices/*; do
  v=$(cat $d/vendor); i=$(cat $d/device)
  [ "$v:$i" = 0x1234:0x0001 ] && C=$d
  [ "$v:$i" = 0x4348:0x3253 ] && M=$d
done
echo "counter=$C mtty=$M"
echo 1 > $C/enable
setpci -s "${C##*/}" COMMAND=0x0006
B0=$(sed -n 1p $C/resource | cut -d" " -f1)
echo "magic=$(devmem $((B0 + 8)) 32)"
devmem $((B0 + 4)) 32 5
echo "value=$(devmem $B0 32)"
echo 1 > $M/enable
setpci -s "${M##*/}" COMMAND=0x0001
P=$(( $(sed -n 1p $M/resource | cut -d" " -f1) ))
if [ -e /dev/port ]; then
  printf '\\x03' | dd of=/dev/port bs=1 seek=$((P + 3)) count=1 2>/dev/null
  printf 'hi' | dd of=/dev/port bs=1 seek=$P count=2 2>/dev/null
  dd if=/dev/port bs=1 skip=$((P + 5)) count=1 2>/dev/null | od -An -tx1
fi
lspci -nn -vv | grep -E "1234|4348|Capabilities" | head -20
"""


def main() -> int:
    from mdevcore.tools.lab import Lab

    lab = Lab.ensure()
    counter, mtty = Counter(), MttyDevice(2)
    with tap() as seen, ExitStack() as stack:
        served = [stack.enter_context(serve(d)) for d in (counter, mtty)]
        result = lab.boot(SCRIPT, devices=[qemu_device_arg(s.path) for s in served], timeout=300)
    print(result.output)
    folder = CORPUS / "engine"
    for name, device, selector in (("counter", counter, 0), ("mtty", mtty, 1)):
        chunks = without_version(seen.get(id(device), []))
        data = encode(chunks, selector)
        (folder / f"qemu-{name}-guest").write_bytes(data)
        print(f"{name}: {len(chunks)} recvmsg, {len(data)} bytes")
    counter.close()
    mtty.close()
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

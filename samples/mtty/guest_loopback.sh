#!/bin/sh
# Guest half of the mtty end-to-end test; runs as root inside the lab's
# busybox initramfs.  Proves that the guest kernel's own 8250_pci driver
# drives the card: the device is on the bus, its ports are registered as
# 16550A, bytes written to each port come back through the loopback, the
# port's interrupt fired, and all of that still holds after a device reset.
# Prints "MTTY ..." lines for the host to quote; exit status 0 = pass.

set -u
ID=4348:3253
PATTERN='The quick brown fox jumps over the lazy dog 0123456789 !#$%&()*+,-./:;<=>?@[]^_{|}~'

say() { echo "MTTY $*"; }
fail() { say "FAIL: $*"; exit 1; }

# Interrupts taken so far on the lines whose handler names one of $PORTS
# (the card's ports share one line, listed under the first port's name).
irq_count() {
    for p in $PORTS; do
        awk -v re="[ ,]$p(,|\$)" '$0 ~ re { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i }
                                   END { print n + 0 }' /proc/interrupts
    done | awk '{ n += $1 } END { print n + 0 }'
}

# loop_port /dev/ttySn: write the pattern, read it back, compare.
loop_port() {
    dev=$1
    want=/tmp/want.$$ got=/tmp/got.$$
    # Text, then every byte value 1..255 (raw mode passes them all through),
    # then the text again.
    {
        printf '%s' "$PATTERN"
        i=1
        while [ $i -le 255 ]; do
            printf "\\$(printf '%03o' $i)"
            i=$((i + 1))
        done
        printf '%s' "$PATTERN"
    } >"$want"
    len=$(wc -c <"$want")
    exec 3<>"$dev" || fail "cannot open $dev"
    # Raw, no echo (an echo would be looped back forever), no flow control.
    stty raw -echo cs8 -parenb -ixon -ixoff clocal 115200 <&3 ||
        fail "stty on $dev"
    timeout 20 dd bs=1 count="$len" of="$got" <&3 2>/dev/null &
    reader=$!
    dd if="$want" bs=64 2>/dev/null >&3
    wait $reader
    rc=$?
    exec 3<&-
    if cmp -s "$want" "$got"; then
        say "loopback $dev: $len bytes ok"
    else
        say "loopback $dev: sent $len, got $(wc -c <"$got") (dd exit $rc)"
        return 1
    fi
    rm -f "$want" "$got"
}

lspci -nn | grep "\[$ID\]" | sed 's/^/MTTY lspci: /'
BDF=$(lspci -D -n -d "$ID" | awk 'NR == 1 { print $1 }')
[ -n "$BDF" ] || fail "no PCI device $ID"
say "device $BDF"
# What the kernel doc's step 4 shows: decoded header and the raw bytes.
lspci -s "$BDF" -xxvv 2>/dev/null | sed 's/^/MTTY lspci-vv: /'

# 8250_pci reports each port as "<bdf>: ttySn at I/O 0x... (irq = N, ...) is a 16550A".
dmesg | grep "$BDF: ttyS[0-9]* at I/O" | sed 's/^/MTTY dmesg: /'
PORTS=$(dmesg | grep "$BDF: ttyS[0-9]* at I/O .* is a 16550A" | sed 's/.*\(ttyS[0-9]*\) at .*/\1/')
[ -n "$PORTS" ] || fail "8250_pci registered no 16550A port for $BDF"
say "ports: $(echo $PORTS)"

run_all() {
    for p in $PORTS; do
        loop_port "/dev/$p" || fail "loopback on $p ($1)"
    done
}

before=$(irq_count)
run_all "first pass"
after=$(irq_count)
say "interrupts: ${before:-0} -> ${after:-0}"
[ "${after:-0}" -gt "${before:-0}" ] || fail "no serial interrupt was taken"
grep -E "$(echo $PORTS | tr " " "|")" /proc/interrupts | sed 's/^/MTTY irq: /'
# Step 5's view (setserial -g): type, port, irq, and the tx/rx counters.
for p in $PORTS; do
    grep "^${p#ttyS}: " /proc/tty/driver/serial | sed "s/^/MTTY serial $p: /"
done

# A guest-initiated reset of the device (only offered when the guest kernel
# has a reset method for the slot, e.g. a bus reset behind a root port).
RESET=/sys/bus/pci/devices/$BDF/reset
if [ -w "$RESET" ]; then
    echo 1 >"$RESET" || fail "reset of $BDF failed"
    say "device reset done"
    run_all "after reset"
else
    say "no reset method offered for $BDF, reset skipped"
fi

say "PASS"

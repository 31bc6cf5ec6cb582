#!/usr/bin/env bash
# Boots the test guest under QEMU's microvm (not samepage) and checks each mode. Needs
# qemu-system-x86_64 and b3sum (apt-get install qemu-system-x86 b3sum) and /dev/kvm.
# Usage: qemu-smoke.sh [workdir]   (build first with build.sh)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elf="$here/../../target/test-guest/test-guest.elf"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
# `arch-capabilities` off: this machine's KVM refuses QEMU's write of MSR 0x10a.
cpu="${QEMU_CPU:-host,-arch-capabilities}"

# QEMU 7.2's microvm did not append its virtio_mmio.device= tokens for a PVH kernel, so announce
# all 24 transports (512 bytes each from 0xfeb00000, IRQ 16 on); the guest skips empty ones.
mmio=""
for i in $(seq 0 23); do
    mmio+=" virtio_mmio.device=512@0x$(printf %x $((0xfeb00000 + i * 0x200))):$((16 + i))"
done

run() { # run <append> [qemu args...]; prints the serial log, returns QEMU's status
    local append="$1"; shift
    timeout 120 qemu-system-x86_64 -M microvm,x-option-roms=off,isa-serial=on,rtc=off \
        -enable-kvm -cpu "$cpu" -m 256M -nographic -no-reboot -kernel "$elf" -append "$append" \
        -device isa-debug-exit,iobase=0xf4,iosize=1 -global virtio-mmio.force-legacy=false "$@" \
        </dev/null | tr -d '\r'
    return "${PIPESTATUS[0]}"
}

failed=0
check() { # check <name> <want status> <got status> <log> [grep pattern...]
    local name="$1" want="$2" got="$3" log="$4"; shift 4
    local ok=1
    [ "$got" = "$want" ] || ok=0
    for p in "$@"; do grep -qF -- "$p" <<<"$log" || ok=0; done
    if [ $ok = 1 ]; then echo "ok   $name"; else echo "FAIL $name (status $got, want $want)"; echo "$log" | sed 's/^/    /'; failed=1; fi
}

dd if=/dev/urandom of="$work/rw.img" bs=1M count=8 status=none
dd if=/dev/urandom of="$work/ro.img" bs=1M count=8 status=none
rw_hash=$(b3sum --no-names "$work/rw.img"); ro_hash=$(b3sum --no-names "$work/ro.img")
# isa-debug-exit: QEMU exits with (value << 1) | 1, so guest status 0 -> 1, 1 -> 3, 7 -> 15.
set +e
log=$(run "testguest.mode=disks$mmio" \
    -drive file="$work/ro.img",format=raw,if=none,id=d1,readonly=on -device virtio-blk-device,drive=d1,serial=ro-disk \
    -drive file="$work/rw.img",format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0,serial=rw-disk); st=$?
check disks 1 $st "$log" "blake3 $rw_hash" "blake3 $ro_hash" "read-only, write rejected ok" \
    "write-readback ok" 'id "rw-disk"' "all 2 disks ok"
log=$(run "testguest.mode=exit=7"); st=$?; check exit=7 15 $st "$log" "exit: 7"
log=$(run "testguest.mode=bogus"); st=$?; check unknown-mode 3 $st "$log" "FAIL: unknown mode"
# A triple fault with -no-reboot: QEMU stops with status 0.
log=$(run "testguest.mode=triplefault"); st=$?; check triplefault 0 $st "$log" "triplefault:"
qemu() { # qemu <machine> <timeout> <append> [qemu args...]; stdin passes through
    local machine="$1" secs="$2" append="$3"; shift 3
    timeout "$secs" qemu-system-x86_64 -M "$machine" -enable-kvm -cpu "$cpu" -m 256M -nographic \
        -no-reboot -kernel "$elf" -append "$append" -device isa-debug-exit,iobase=0xf4,iosize=1 "$@"
}
microvm=microvm,x-option-roms=off,isa-serial=on,rtc=off
qemu $microvm 5 "testguest.mode=spin" </dev/null >"$work/log" 2>&1; st=$?
check spin 124 $st "$(tr -d '\r' <"$work/log")" "spin: looping forever"
(sleep 2; printf 'hello q') | qemu $microvm 120 "testguest.mode=echo" >"$work/log" 2>&1; st=${PIPESTATUS[1]}
check echo 1 $st "$(tr -d '\r' <"$work/log")" "hello q" "echo: done"
# microvm has no i8042, so use the pc machine for reboot (with -no-reboot QEMU then stops, 0).
qemu pc 120 "testguest.mode=reboot" </dev/null >"$work/log" 2>&1; st=$?
check reboot 0 $st "$(tr -d '\r' <"$work/log")" "reboot: writing 0xfe"
set -e
exit $failed

#!/usr/bin/env python3
"""Boot-test round-trip benchmark (not a test): `samepage boot-test --exec true` from process
start to exit, against QEMU's microvm booting the same kernel and the same initramfs (saved
by samepage) to the same exit, in one run. Prints a table with medians and the ratio.

On hosts whose KVM emulates guest kernel code both figures are dominated by the emulated
kernel boot (~20 s); on real VMX/SVM hosts a round trip is around a second (virtme-ng's
anchor: ~0.9 s).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
from benchlib import REPO, SAMEPAGE, VMLINUX  # noqa: E402

EMULATED_CPL0 = "noxsave clearcpuid=popcnt,smap,fsrm,erms emulated_cpl0"


def timed(cmd, env=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                          env=env, timeout=900)
    return time.monotonic() - start, proc.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for path in (SAMEPAGE, VMLINUX):
        if not os.path.exists(path):
            sys.exit(f"bench-boot-test: {path} is missing; run scripts/bench-boot-test.sh, which builds it")
    emulating = benchlib.EMULATING
    with tempfile.TemporaryDirectory() as tmp:
        initramfs = os.path.join(tmp, "boot-test.cpio")
        env = dict(os.environ, SAMEPAGE_CACHE_DIR=os.path.join(REPO, "target/boot-test-cache"))
        samepage_cmd = [SAMEPAGE, "boot-test", "--kernel", VMLINUX, "--exec", "true", "--save-initramfs", initramfs]
        # One untimed run builds and caches the initramfs and saves it for QEMU.
        timed(samepage_cmd, env)
        cmdline = "console=ttyS0 panic=-1" + (f" {EMULATED_CPL0}" if emulating else "")
        qemu_cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off", "-enable-kvm",
                    "-cpu", "host,-arch-capabilities", "-m", "256M", "-smp", "1", "-nographic", "-no-reboot",
                    "-nodefaults", "-serial", "stdio", "-kernel", VMLINUX, "-initrd", initramfs,
                    "-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        samepage_times, qemu_times = [], []
        for _ in range(args.runs):
            seconds, code = timed(samepage_cmd, env)
            if code != 0:
                sys.exit(f"bench-boot-test: samepage boot-test exited {code}")
            samepage_times.append(seconds)
            seconds, code = timed(qemu_cmd)
            if code != 1:  # isa-debug-exit: (status << 1) | 1
                sys.exit(f"bench-boot-test: qemu exited {code}, not the guest's status 0")
            qemu_times.append(seconds)
    sp, q = statistics.median(samepage_times), statistics.median(qemu_times)
    print(f"\n`--exec true` round trip, median of {args.runs} runs, {'emulating' if emulating else 'hardware'} KVM")
    benchlib.print_table([("samepage boot-test (s)", "qemu microvm (s)", "samepage/qemu"),
                          (f"{sp:.2f}", f"{q:.2f}", f"{sp / q:.2f}")])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Boot benchmark (not a test): start-up cost and boot time of samepage, with QEMU's microvm
as the baseline measured in the same run on the same kernel and initramfs.

Prints one table:
  - VMM non-guest RSS: the process's resident memory minus the guest-RAM mapping, read from
    /proc/PID/smaps while the guest runs (Firecracker's spec: <= 5 MiB; our aim <= 4 MiB);
  - process start -> first KVM exit of the guest (samepage's own log), and -> the test guest's
    exit through the exit-status port (wall clock);
  - process start -> the Linux guest's /init marker, samepage / QEMU as a ratio.
Medians over --runs runs. On hosts whose KVM emulates guest kernel code the Linux figures are
dominated by the emulator (~20 s); on real VMX/SVM hosts they are well under a second.
"""
import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
from benchlib import INITRD, REPO, SAMEPAGE, TEST_GUEST, VMLINUX  # noqa: E402

MARKER = "samepage-init: reached /init"
EMULATED_CPL0 = "noxsave clearcpuid=popcnt,smap,fsrm,erms emulated_cpl0"
MEM_MIB = 256


def qemu_cmd(vcpus):
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", f"{MEM_MIB}M",
            "-smp", str(vcpus), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", VMLINUX, "-initrd", INITRD,
            "-append", f"console=ttyS0 {EMULATED_CPL0}",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]


def samepage_linux_cmd(vcpus):
    return [SAMEPAGE, "run", "--kernel", VMLINUX, "--initrd", INITRD, "--mem", f"{MEM_MIB}M",
            "--vcpus", str(vcpus), "--timeout", "600"]


def non_guest_rss_kib(pid, guest_bytes):
    """Resident KiB of `pid` outside mappings of exactly the guest RAM size."""
    total = guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                size = end - start
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if size == guest_bytes:
                    guest += kib
    return total - guest


def run_until(cmd, marker, limit, on_marker=None, env=None):
    """Starts cmd, returns (seconds until `marker` appeared on its output or None, output)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    seen, buf = None, b""
    try:
        while time.monotonic() - start < limit:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if seen is None and marker.encode() in buf:
                seen = time.monotonic() - start
                if on_marker:
                    on_marker(proc)
        return seen, buf.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    args = parser.parse_args()
    for path in (SAMEPAGE, TEST_GUEST, VMLINUX, INITRD):
        if not os.path.exists(path):
            sys.exit(f"bench-boot: {path} is missing; run scripts/bench-boot.sh, which builds it")

    rows = []
    # Non-guest RSS with the test guest running (spinning at CPL3) and a disk attached.
    disk = os.path.join(REPO, "target/bench-disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    rss = []
    for _ in range(args.runs):
        holder = {}
        run_until([SAMEPAGE, "run", "--kernel", TEST_GUEST, "--disk", disk, "--mem", f"{MEM_MIB}M",
                   "--cmdline", "testguest.mode=spin", "--timeout", "30"], "spin: looping forever", 30,
                  on_marker=lambda p: holder.setdefault("kib", non_guest_rss_kib(p.pid, MEM_MIB << 20)))
        rss.append(holder.get("kib"))
    rows.append(("VMM non-guest RSS, test guest running (MiB)", fmt(median(rss) and median(rss) / 1024, 2), "", ""))

    env = dict(os.environ, RUST_LOG="samepage=info")
    first_exit, guest_exit = [], []
    for _ in range(args.runs):
        start = time.monotonic()
        out = subprocess.run([SAMEPAGE, "run", "--kernel", TEST_GUEST, "--cmdline", "testguest.mode=exit=0"],
                             capture_output=True, text=True, env=env, timeout=60)
        guest_exit.append((time.monotonic() - start) * 1e3)
        found = re.search(r"first guest exit ([0-9.]+) ms", out.stderr)
        first_exit.append(float(found.group(1)) if found else None)
    rows.append(("process start -> first guest exit (ms)", fmt(median(first_exit), 2), "", ""))
    rows.append(("process start -> test guest exit-port exit (ms)", fmt(median(guest_exit), 1), "", ""))

    def linux_boot(cmd):
        times, rss_kib = [], []
        for _ in range(args.runs):
            holder = {}
            seen, out = run_until(cmd, MARKER, 600,
                                  on_marker=lambda p: holder.setdefault("kib", non_guest_rss_kib(p.pid, MEM_MIB << 20)))
            if seen is None:
                print(f"bench-boot: no marker from {cmd[0]}; last output:\n{out[-2000:]}", file=sys.stderr)
            times.append(seen)
            rss_kib.append(holder.get("kib"))
        return median(times), median(rss_kib)

    sp_boot, sp_rss = linux_boot(samepage_linux_cmd(args.vcpus))
    q_boot, q_rss = (None, None) if args.no_qemu else linux_boot(qemu_cmd(args.vcpus))
    ratio = lambda a, b: fmt(a / b, 2) if a and b else "n/a"
    rows.append(("VMM non-guest RSS, Linux at /init (MiB)", fmt(sp_rss and sp_rss / 1024, 2),
                 fmt(q_rss and q_rss / 1024, 2), ratio(sp_rss, q_rss)))
    rows.append((f"boot to /init marker, {args.vcpus} vCPU (s)", fmt(sp_boot, 2), fmt(q_boot, 2), ratio(sp_boot, q_boot)))

    print(f"\nsamepage boot benchmark: median of {args.runs} runs, {MEM_MIB} MiB guests, "
          f"{'emulating' if benchlib.EMULATING else 'hardware'} KVM")
    benchlib.print_table([("metric", "samepage", "qemu microvm", "samepage/qemu")] + rows)


if __name__ == "__main__":
    main()

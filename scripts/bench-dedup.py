#!/usr/bin/env python3
"""Dedup benchmark (not a test): --dedup off / ksm / hinted with N test guests that all read
the same F MiB file image into their page cache, one `samepage density` run each, in one
table: host memory the guests' RAM holds, MiB saved, time from the last page report to 90 %
of the final saving, and host CPU seconds spent merging (hinted: samepage's merge batches;
KSM: ksmd's CPU time). KSM's settings are printed, set for the run and restored afterwards.
Also a PNG plot of MiB saved over time per mode for the largest N.

The guests hold their pages for --hold seconds after reporting so KSM has time to scan.
The test guest's work runs at CPL3, so these figures hold on emulating and real KVM alike.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMEPAGE = os.path.join(REPO, "target/release/samepage")
TEST_GUEST = os.path.join(REPO, "target/test-guest/test-guest.elf")
OUT = os.path.join(REPO, "target/bench")
KSM = "/sys/kernel/mm/ksm"
KSM_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")


def ksm_read(knob):
    with open(os.path.join(KSM, knob)) as f:
        return f.read().strip()


def ksm_write(knob, value):
    with open(os.path.join(KSM, knob), "w") as f:
        f.write(str(value))


def ksmd_cpu_seconds():
    pid = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout.split()
    if not pid:
        return 0.0
    with open(f"/proc/{pid[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def density(mode, vms, image, mib, hold_s, tag):
    samples = os.path.join(OUT, f"samples-{mode}-{vms}.csv")
    cmd = [SAMEPAGE, "density", "--vms", str(vms), "--kernel", TEST_GUEST, "--disk", f"{image},ro",
           "--mem", f"{mib + 64}M", "--dedup", mode, "--progress-every", "0.02", "--samples", samples,
           "--cmdline", f"testguest.mode=fphash testguest.hold_ms={int(hold_s * 1000)}",
           "--timeout", str(int(hold_s + 300))]
    cpu_before = ksmd_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True)
    ksmd_cpu = ksmd_cpu_seconds() - cpu_before
    line = next((l for l in out.stdout.splitlines() if l.startswith("density-result:")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"bench-dedup: {tag} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = {k: float(v) for k, v in json.loads(line.split(":", 1)[1]).items()}
    result["ksmd_cpu_s"] = ksmd_cpu
    result["samples"] = samples
    return result


def plot(rows, vms, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-dedup: no matplotlib (Debian python3-matplotlib); plot skipped", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, n, result in rows:
        if n != vms:
            continue
        xs, ys = [], []
        with open(result["samples"]) as f:
            next(f)
            for line in f:
                t, saved, _ = line.split(",")
                xs.append(float(t))
                ys.append(float(saved))
        ax.plot(xs, ys, label=f"--dedup {mode}", drawstyle="steps-post")
    ax.set_xlabel("seconds since the VMs started")
    ax.set_ylabel("host MiB saved")
    ax.set_title(f"{vms} test guests reading the same file image")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", default="1,4,16", help="comma-separated VM counts")
    parser.add_argument("--mib", type=int, default=256, help="file image size F in MiB")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds the guests hold their pages")
    parser.add_argument("--ksm-pages-to-scan", type=int, default=1000)
    parser.add_argument("--ksm-sleep-ms", type=int, default=20)
    args = parser.parse_args()
    counts = [int(n) for n in args.vms.split(",")]
    for path in (SAMEPAGE, TEST_GUEST):
        if not os.path.exists(path):
            sys.exit(f"bench-dedup: {path} is missing; run scripts/bench-dedup.sh, which builds it")
    os.makedirs(OUT, exist_ok=True)
    image = os.path.join(OUT, f"files-{args.mib}M.img")
    if not os.path.exists(image) or os.path.getsize(image) != args.mib << 20:
        with open(image, "wb") as f:
            f.write(os.urandom(args.mib << 20))

    saved_ksm = {knob: ksm_read(knob) for knob in KSM_KNOBS}
    print(f"KSM settings before: {saved_ksm}")
    rows = []
    try:
        for n in counts:
            for mode in ("off", "ksm", "hinted"):
                if mode == "ksm":
                    ksm_write("pages_to_scan", args.ksm_pages_to_scan)
                    ksm_write("sleep_millisecs", args.ksm_sleep_ms)
                    ksm_write("run", 1)
                    print(f"KSM settings for the run: run=1 pages_to_scan={args.ksm_pages_to_scan} "
                          f"sleep_millisecs={args.ksm_sleep_ms}")
                tag = f"{mode} x{n}"
                print(f"bench-dedup: {tag}, F={args.mib} MiB ...", flush=True)
                result = density(mode, n, image, args.mib, args.hold, tag)
                if mode == "ksm":
                    ksm_write("run", 2)  # unmerge before the next run
                    ksm_write("run", 0)
                rows.append((mode, n, result))
    finally:
        ksm_write("run", 2)
        for knob in ("pages_to_scan", "sleep_millisecs", "run"):
            ksm_write(knob, saved_ksm[knob])
        print(f"KSM settings restored: { {knob: ksm_read(knob) for knob in KSM_KNOBS} }")

    mib = lambda b: b / (1 << 20)
    header = ("mode", "VMs", "host MiB", "MiB saved", "last report->90% (s)", "merge CPU (s)")
    table = []
    for mode, n, r in rows:
        t90, last = r["t90_ms"], r["last_report_ms"]
        lag = "n/a" if t90 < 0 else f"{max(0.0, (t90 - max(last, 0)) / 1000):.2f}"
        cpu = r["ksmd_cpu_s"] if mode == "ksm" else (r["merge_cpu_us"] / 1e6 if mode == "hinted" else 0.0)
        table.append((mode, n, f"{mib(r['host_bytes']):.1f}", f"{mib(r['total_saved_bytes']):.1f}", lag, f"{cpu:.3f}"))
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(len(header))]
    print(f"\nsamepage dedup benchmark: F={args.mib} MiB per guest, hold {args.hold:.0f} s, "
          f"KSM pages_to_scan={args.ksm_pages_to_scan} sleep_millisecs={args.ksm_sleep_ms}")
    for row in [header] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    biggest = max(counts)
    png = os.path.join(OUT, "dedup-saved-over-time.png")
    if plot(rows, biggest, png):
        print(f"plot: {png}")


if __name__ == "__main__":
    main()

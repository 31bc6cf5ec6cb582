#!/usr/bin/env python3
"""Dedup benchmark (not a test): what a density-focused VMM's users need to know about
merging, measured against baselines in the same run, in one table.

Modes: --dedup off (baseline memory), --dedup ksm (Linux KSM, tuned for the run: settings
printed, set and restored), hinted as processes joined to a broker (samepage's default),
hinted as threads of one process (--threads), and shared: hinted processes whose read-only
disks map the image's page cache instead of copying it (the default for `,ro` disks; the
other modes copy, `,ro,share=off`, so that they measure merging). N test guests (resources/test-guest, mode
fphash: each reads disk 0 whole into its page cache and reports every page) per run, for each
N of --vms, on two workloads:
  identical  every VM reads the same image of random data (--mib MiB);
  mixed      every VM reads its own image of real programs and libraries of this host, a
             common base set plus a random set of its own (scripts/bench-mixed-images.py).
The ideal saving of a workload is its guests' file pages minus its distinct 4 KiB pages (every
block of every image hashed here): the most any merger can save.

Per run: host MiB the guests' RAM holds, MiB saved and % of the ideal, time from the last page
report to 90 % of the final saving, merge CPU (hinted: the VMMs' merge batches and the broker;
KSM: ksmd over the run), merge CPU per merged page, the steady state's CPU (seconds a minute the
host spends beside the guests' vCPUs while they hold their pages: ksmd scanning on, samepage's
refreshes of the merged pages' page tables), VMAs per VM and their share of
vm.max_map_count, the broker's RSS, and whether every guest's data was intact. Then the goals,
met or not, and a PNG of MiB saved over time per mode (largest N) in target/bench/.

The guests hold their pages for --hold seconds after reporting so that KSM has time to scan
(off runs hold at most 2 s: nothing changes while they hold). The test guest works at CPL3,
so these figures hold on emulating and real KVM alike; other work on the machine adds noise.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
import bench_dedup_report as report  # noqa: E402
from benchlib import OUT, PAGE, SAMEPAGE, TEST_GUEST  # noqa: E402

MIXED_BUILDER = os.path.join(benchlib.REPO, "scripts/bench-mixed-images.py")
MODES = ("off", "ksm", "hinted", "hinted-threads", "shared")
WORKLOADS = ("identical", "mixed")
OFF_HOLD_S = 2.0  # long enough to measure their memory while all hold it

QUICK = {"vms": "2,4", "mib": 32, "mixed_mib": 24, "hold": "8"}
FULL = {"vms": "4,16", "mib": 150, "mixed_mib": 150, "hold": "15"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"small configuration, a few minutes: {QUICK} (explicit options still win)")
    parser.add_argument("--vms", help=f"comma-separated VM counts (default {FULL['vms']})")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="identical, mixed or both")
    parser.add_argument("--modes", default=",".join(MODES), help="any of " + ", ".join(MODES))
    parser.add_argument("--mib", type=int, help=f"identical workload: image size in MiB (default {FULL['mib']})")
    parser.add_argument("--mixed-mib", type=int, help=f"mixed workload: file data per VM in MiB (default {FULL['mixed_mib']})")
    parser.add_argument("--mixed-common", type=float, default=0.5, help="mixed: share of each image common to all")
    parser.add_argument("--mixed-seed", type=int, default=1)
    parser.add_argument("--mem", type=int, help="guest RAM per VM in MiB (default: the larger of 256 and image + 64)")
    parser.add_argument("--hold", help=f"seconds the guests hold their pages, one value or one per --vms "
                                       f"(default {FULL['hold']})")
    parser.add_argument("--ksm-pages-to-scan", type=int, default=1000)
    parser.add_argument("--ksm-sleep-ms", type=int, default=20)
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.counts = [int(n) for n in args.vms.split(",")]
    holds = [float(h) for h in args.hold.split(",")]
    if len(holds) not in (1, len(args.counts)):
        parser.error("--hold takes one value or one per --vms count")
    args.holds = dict(zip(args.counts, holds * len(args.counts) if len(holds) == 1 else holds))
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.modes = [m for m in args.modes.split(",") if m]
    for name, given, known in (("workload", args.workloads, WORKLOADS), ("mode", args.modes, MODES)):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; known: {', '.join(known)}")
    if min(args.counts) < 1 or args.mib < 1 or args.mixed_mib < 1:
        parser.error("--vms, --mib and --mixed-mib must be at least 1")
    return args


# --- Workloads ---------------------------------------------------------------------------

def identical_workload(args, count):
    image = os.path.join(OUT, f"files-{args.mib}M.img")
    if not os.path.exists(image) or os.path.getsize(image) != args.mib << 20:
        with open(image + ".tmp", "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        os.rename(image + ".tmp", image)
    return {"disk": image, "images": [image] * count, "image_mib": args.mib,
            "what": f"every VM reads the same {args.mib} MiB image of random data"}


def mixed_workload(args, count):
    out = subprocess.run([sys.executable, MIXED_BUILDER, "--vms", str(count), "--mib", str(args.mixed_mib),
                          "--common", str(args.mixed_common), "--seed", str(args.mixed_seed)],
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"bench-dedup: building the mixed images failed (exit {out.returncode})")
    built = json.loads(out.stdout.strip().splitlines()[-1])
    files = built["files"]
    return {"disk": os.path.join(built["dir"], "vm{vm}.img"), "images": built["images"],
            "image_mib": args.mixed_mib,
            "what": (f"VM i reads its own image of {args.mixed_mib} MiB of this host's programs and libraries "
                     f"({round(args.mixed_common * 100)} % a common base set, the rest its own random draw; "
                     f"{min(files)}-{max(files)} files per image, each at a 4 KiB-aligned offset)")}


def page_digests(path):
    import hashlib
    digests = []
    with open(path, "rb") as f:
        while block := f.read(PAGE):
            digests.append(hashlib.blake2b(block.ljust(PAGE, b"\0"), digest_size=16).digest())
    return digests


def ideal_savings(images, counts):
    """{N: bytes}: the first N images' pages minus their distinct pages."""
    cache, ideal = {}, {}
    for n in counts:
        total, distinct = 0, set()
        for path in images[:n]:
            if path not in cache:
                cache[path] = page_digests(path)
            total += len(cache[path])
            distinct.update(cache[path])
        ideal[n] = (total - len(distinct)) * PAGE
    return ideal


# --- One run -----------------------------------------------------------------------------

def console_verdict(directory, vms, held):
    """Whether every guest said its data was intact (after the hold too, if it held)."""
    bad = []
    for index in range(vms):
        lines = benchlib.read_console(directory, index).splitlines()
        ok = "fphash: data intact" in lines and not any(l.startswith("FAIL") for l in lines)
        if held:
            ok = ok and "fphash: data intact after the hold" in lines
        if not ok:
            bad.append(index)
    return bad


def hold_factors(directory, vms):
    """How much longer than asked each guest held: its TSC rate, calibrated against the PIT,
    over the host's (a guest preempted while it calibrates misjudges the rate)."""
    host = benchlib.host_tsc_khz()
    factors = []
    for index in range(vms):
        text = benchlib.read_console(directory, index)
        match = re.search(r"^fphash: holding \d+ ms \(TSC (\d+) kHz\)", text, re.M)
        if match and host:
            factors.append(int(match.group(1)) / host)
    return factors


def density(args, workload, spec, mode, n):
    tag = f"{workload}-{mode}-{n}"
    hold = args.holds[n] if mode != "off" else min(args.holds[n], OFF_HOLD_S)
    mem = args.mem or max(256, spec["image_mib"] + 64)
    samples = os.path.join(OUT, "samples", f"{tag}.csv")
    consoles = os.path.join(OUT, "consoles", tag)
    os.makedirs(os.path.dirname(samples), exist_ok=True)
    disk = spec["disk"] + (",ro" if mode == "shared" else ",ro,share=off")
    cmd = [SAMEPAGE, "density", "--vms", str(n), "--kernel", TEST_GUEST, "--disk", disk,
           "--mem", f"{mem}M", "--dedup", mode if mode in ("off", "ksm") else "hinted",
           "--progress-every", "0.02", "--samples", samples, "--console-dir", consoles,
           "--cmdline", f"testguest.mode=fphash testguest.hold_ms={int(hold * 1000)}",
           # The guests read slowly with many VMs on few cores, and may hold longer than asked
           # (hold_factors): a generous timeout, so that only a hung guest times out.
           "--timeout", str(int(hold * 4 + 900))]
    if mode == "hinted-threads":
        cmd.append("--threads")
    logs = os.path.join(OUT, "logs", tag)
    ksmd_before, started, guest_ram_peak = benchlib.ksmd_cpu_seconds(), time.monotonic(), 0

    cpu_readings = []

    def measure(proc):
        nonlocal guest_ram_peak
        if mode == "off":
            guest_ram_peak = max(guest_ram_peak, benchlib.vmm_guest_ram_bytes(proc.pid, mem << 20))
        cpu_readings.append((time.monotonic() - started, benchlib.cpu_outside_guests(proc.pid)))

    code, out, result = benchlib.run_density(cmd, logs, poll=measure, every=0.25)
    # Steady state: the guests hold their pages after the last report; from 3 s after it (the
    # merging is done) to 1 s before the hold ends, what does the host spend beside them?
    steady = None
    if result:
        last = result.get("last_report_ms", 0) / 1000.0
        steady = benchlib.steady_cpu_per_minute(cpu_readings, last + 3.0, last + hold - 1.0)
    row = {"workload": workload, "mode": mode, "vms": n, "hold_s": hold, "mem_mib": mem,
           "ksmd_cpu_s": benchlib.ksmd_cpu_seconds() - ksmd_before, "wall_s": time.monotonic() - started,
           "exit": code, "samples": benchlib.read_samples(samples),
           "bad_consoles": console_verdict(consoles, n, hold > 0), "measured_guest_ram_bytes": guest_ram_peak,
           "hold_factors": hold_factors(consoles, n), "steady_cpu_per_min": steady, "result": result}
    if code != 0 or result is None:
        row["error"] = benchlib.failure_text(logs, out)
        print(f"bench-dedup: {tag} failed (exit {code}):\n{row['error']}", file=sys.stderr)
    return row


def run_all(args, specs, ksm_unavailable):
    rows = []
    for workload, spec in specs.items():
        for n in args.counts:
            for mode in args.modes:
                if mode == "ksm" and ksm_unavailable:
                    rows.append({"workload": workload, "mode": mode, "vms": n, "skipped": ksm_unavailable})
                    continue
                if mode == "ksm":
                    problem = benchlib.ksm_start(args.ksm_pages_to_scan, args.ksm_sleep_ms)
                    if problem:
                        print(f"bench-dedup: WARNING: KSM cannot run: {problem}; ksm rows skipped", file=sys.stderr)
                        ksm_unavailable = problem
                        rows.append({"workload": workload, "mode": mode, "vms": n, "skipped": problem})
                        continue
                print(f"bench-dedup: {workload} x{n} {mode} ...", flush=True)
                try:
                    row = density(args, workload, spec, mode, n)
                finally:
                    if mode == "ksm":
                        benchlib.ksm_stop()
                rows.append(row)
                result = row["result"] or {}
                print(f"  {row['wall_s']:.0f} s, saved {result.get('total_saved_bytes', 0) / (1 << 20):.1f} MiB, "
                      f"{'data intact' if not row['bad_consoles'] else 'DATA NOT INTACT in vm' + str(row['bad_consoles'])}",
                      flush=True)
    return rows


def main():
    args = parse_args()
    for path in (SAMEPAGE, TEST_GUEST):
        if not os.path.exists(path):
            sys.exit(f"bench-dedup: {path} is missing; run scripts/bench-dedup.sh, which builds it")
    os.makedirs(OUT, exist_ok=True)
    biggest = max(args.counts)
    specs = {}
    for workload in args.workloads:
        spec = identical_workload(args, biggest) if workload == "identical" else mixed_workload(args, biggest)
        spec["ideal"] = ideal_savings(spec["images"], args.counts)
        specs[workload] = spec

    ksm_unavailable = benchlib.ksm_problem() if "ksm" in args.modes else None
    saved_ksm = None
    if ksm_unavailable:
        print(f"bench-dedup: WARNING: KSM cannot run: {ksm_unavailable}; ksm rows skipped", file=sys.stderr)
    elif "ksm" in args.modes:
        saved_ksm = benchlib.ksm_settings()
        print(f"KSM settings before: {saved_ksm}")
        print(f"KSM settings for ksm runs: run=1 pages_to_scan={args.ksm_pages_to_scan} "
              f"sleep_millisecs={args.ksm_sleep_ms} (others as before)")
    load_before = os.getloadavg()
    try:
        rows = run_all(args, specs, ksm_unavailable)
    finally:
        benchlib.ksm_restore(saved_ksm)
    args.load = (load_before, os.getloadavg())

    with open(os.path.join(OUT, "dedup-results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows,
                   "ideal": {w: s["ideal"] for w, s in specs.items()}}, f, indent=1, default=str)
    failed = report.print_all(args, specs, rows, OUT)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Balloon benchmark (not a test): how much host memory N guests hold over time when they
share files and also take and give back private memory, with the ways samepage and Linux
have to give memory back to the host, side by side in one run.

Each of N test guests (resources/test-guest, mode balloon-churn) reads one shared image of
--mib MiB into its RAM (`,ro,share=off`: every guest holds its own copy, which merging can
fold into one) and reports it to fphash; then, for --cycles cycles, it writes --private-mib MiB
of data of its own (different in every guest and cycle: nothing merges it), keeps it
--busy-ms, frees it and idles --idle-ms. Modes:
  off        --dedup off, no balloon: the baseline;
  merging    --dedup hinted (samepage's default): the shared copies merge, freed memory stays;
  reporting  --dedup off --balloon: freed memory goes back through free page reporting;
  both       --dedup hinted --balloon;
  ksm        --dedup ksm, no balloon (KSM tuned for the run, settings printed and restored).

Host memory is the proportional set size (Pss: a page shared by k processes counts 1/k in
each) summed over density's processes (the VMMs and the broker), sampled every --every
seconds. Per mode: peak and final (the last sample while every VM still runs, in the idle
after the last free) host memory and their ratio against off; the time from a guest's free to
its memory being back on the host; what giving memory back costs the guest: the report
itself, and writing its private data again into memory the host has to fault in afresh.
The test guest reports synchronously (the host discards before the report returns), so the
time to return is the report's duration; a Linux guest adds its 2 s reporting delay
(docs/balloon.md). The table goes to standard output and target/bench/balloon-table.md, the
samples to target/bench/balloon-results.json and the plot to
target/bench/balloon-memory-over-time.svg.

The test guest works at CPL3, so these figures hold on emulating and real KVM alike; other
work on the machine adds noise.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
from benchlib import MIB, OUT, SAMEPAGE, TEST_GUEST  # noqa: E402

MODES = {  # mode: (--dedup, --balloon)
    "off": ("off", False),
    "merging": ("hinted", False),
    "reporting": ("off", True),
    "both": ("hinted", True),
    "ksm": ("ksm", False),
}
QUICK = {"mib": 16, "private_mib": 16, "cycles": 3}
FULL = {"mib": 64, "private_mib": 32, "cycles": 4}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small configuration: {QUICK} (explicit options win)")
    parser.add_argument("--vms", type=int, default=4, help="guests per run (default 4)")
    parser.add_argument("--modes", default=",".join(MODES), help="any of " + ", ".join(MODES))
    parser.add_argument("--mib", type=int, help=f"shared image in MiB (default {FULL['mib']})")
    parser.add_argument("--private-mib", type=int, help=f"private data per guest and cycle (default {FULL['private_mib']})")
    parser.add_argument("--cycles", type=int, help=f"write-free cycles per guest (default {FULL['cycles']})")
    parser.add_argument("--busy-ms", type=int, default=1000, help="how long a guest keeps its private data")
    parser.add_argument("--idle-ms", type=int, default=2000, help="how long a guest idles after freeing it")
    parser.add_argument("--every", type=float, default=0.2, help="host memory sampling period, seconds")
    parser.add_argument("--ksm-pages-to-scan", type=int, default=1000)
    parser.add_argument("--ksm-sleep-ms", type=int, default=20)
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown}; known: {', '.join(MODES)}")
    if min(args.vms, args.mib, args.private_mib, args.cycles) < 1:
        parser.error("--vms, --mib, --private-mib and --cycles must be at least 1")
    args.mem = args.mib + args.private_mib + 64
    return args


# --- Host memory ---------------------------------------------------------------------------

def process_tree(pid):
    """`pid` and its descendants now."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def pss_bytes(pids):
    """Summed Pss of `pids` (smaps_rollup), skipping those that are gone."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


# --- The guests' consoles ------------------------------------------------------------------

WROTE = re.compile(r"^churn: cycle (\d+): t=(\d+) ms: wrote \d+ MiB in (\d+) us", re.M)
REPORTED = re.compile(r"^churn: cycle (\d+): t=(\d+) ms: freed \d+ MiB, reported in (\d+) reports, (\d+) us", re.M)


def guest_figures(consoles, vms):
    """From every guest's console: write times (µs) of cycle 1 and of the later cycles, report
    times (µs), and the guests whose shared pages were not intact."""
    first, later, reports, bad = [], [], [], []
    for index in range(vms):
        text = benchlib.read_console(consoles, index)
        for cycle, _, us in WROTE.findall(text):
            (first if cycle == "1" else later).append(int(us))
        reports += [int(us) for _, _, _, us in REPORTED.findall(text)]
        if "shared pages intact" not in text or "FAIL" in text:
            bad.append(index)
    return {"write_first_us": first, "write_later_us": later, "report_us": reports, "bad_consoles": bad}


# --- One run -------------------------------------------------------------------------------

def run_mode(args, image, mode):
    dedup, balloon = MODES[mode]
    consoles = os.path.join(OUT, "consoles", f"balloon-{mode}")
    guest = (f"testguest.mode=balloon-churn testguest.private_mib={args.private_mib} "
             f"testguest.cycles={args.cycles} testguest.busy_ms={args.busy_ms} testguest.idle_ms={args.idle_ms}")
    cmd = [SAMEPAGE, "density", "--vms", str(args.vms), "--kernel", TEST_GUEST, "--disk", f"{image},ro,share=off",
           "--mem", f"{args.mem}M", "--dedup", dedup, "--console-dir", consoles, "--cmdline", guest,
           "--timeout", str(600 + args.cycles * (args.busy_ms + args.idle_ms) // 100)]
    if balloon:
        cmd.append("--balloon")
    samples, started = [], time.monotonic()

    def measure(proc):
        tree = process_tree(proc.pid)
        vmms = len(tree) - 1 - (dedup == "hinted")  # density itself and, merging, the broker
        samples.append((time.monotonic() - started, pss_bytes(tree), vmms))

    logs = os.path.join(OUT, "logs", f"balloon-{mode}")
    code, out, result = benchlib.run_density(cmd, logs, poll=measure, every=args.every)
    row = {"mode": mode, "exit": code, "wall_s": time.monotonic() - started, "samples": samples,
           "result": result, **guest_figures(consoles, args.vms)}
    running = [s for s in samples if s[2] >= args.vms]
    row["peak_bytes"] = max((s[1] for s in running), default=0)
    row["final_bytes"] = running[-1][1] if running else 0
    if code != 0 or result is None:
        row["error"] = benchlib.failure_text(logs, out)
        print(f"bench-balloon: {mode} failed (exit {code}):\n{row['error']}", file=sys.stderr)
    return row


# --- Report --------------------------------------------------------------------------------

def ms(values):
    return f"{statistics.median(values) / 1000:.1f}" if values else "-"


def table(args, rows):
    off = next((r for r in rows if r["mode"] == "off" and r["peak_bytes"]), None)
    ratio = lambda r, key: f"{r[key] / off[key]:.2f}" if off and off[key] else "-"  # noqa: E731
    off_write = statistics.median(off["write_later_us"]) if off and off["write_later_us"] else None
    out = [["mode", "peak MiB", "final MiB", "peak/off", "final/off", "free->returned ms",
            "write ms cycle 1", "write ms cycles 2+", "guest cost ms/cycle", "data"]]
    for r in rows:
        returned = ms(r["report_us"]) if r["report_us"] else "never"
        # What giving memory back costs the guest each cycle: the report, and faulting its
        # private data in again (the later cycles' writes beyond off's).
        cost = "-"
        if off_write is not None and r["write_later_us"]:
            extra = statistics.median(r["write_later_us"]) - off_write
            cost = f"{(extra + (statistics.median(r['report_us']) if r['report_us'] else 0)) / 1000:.1f}"
        out.append([r["mode"], f"{r['peak_bytes'] / MIB:.0f}", f"{r['final_bytes'] / MIB:.0f}",
                    ratio(r, "peak_bytes"), ratio(r, "final_bytes"), returned,
                    ms(r["write_first_us"]), ms(r["write_later_us"]), cost,
                    "intact" if not r["bad_consoles"] and r["exit"] == 0 else f"FAILED {r['bad_consoles']}"])
    return out


def svg_plot(rows, path):
    """Host memory over time, one line per mode, as a small self-contained SVG."""
    colours = {"off": "#444444", "merging": "#1f77b4", "reporting": "#d62728", "both": "#2ca02c", "ksm": "#ff7f0e"}
    width, height, left, bottom, top, right = 760, 420, 60, 40, 20, 120
    t_max = max((s[0] for r in rows for s in r["samples"]), default=1) or 1
    y_max = max((s[1] for r in rows for s in r["samples"]), default=1) / MIB or 1
    x = lambda t: left + t / t_max * (width - left - right)  # noqa: E731
    y = lambda b: height - bottom - b / MIB / y_max * (height - bottom - top)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(width - right) / 2}" y="{height - 8}">seconds</text>',
             f'<text x="4" y="{top + 4}">MiB</text>']
    for i in range(5):
        mib = y_max * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(mib * MIB) + 4:.0f}" text-anchor="end">{mib:.0f}</text>')
        sec = t_max * i / 4
        parts.append(f'<text x="{x(sec):.0f}" y="{height - bottom + 16}" text-anchor="middle">{sec:.0f}</text>')
    for n, r in enumerate(rows):
        colour = colours.get(r["mode"], "black")
        points = " ".join(f"{x(t):.1f},{y(b):.1f}" for t, b, _ in r["samples"])
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 16 * (n + 1)}" fill="{colour}">{r["mode"]}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    args = parse_args()
    for path in (SAMEPAGE, TEST_GUEST):
        if not os.path.exists(path):
            sys.exit(f"bench-balloon: {path} is missing; run scripts/bench-balloon.sh, which builds it")
    os.makedirs(OUT, exist_ok=True)
    image = os.path.join(OUT, f"files-{args.mib}M.img")
    if not os.path.exists(image) or os.path.getsize(image) != args.mib << 20:
        with open(image + ".tmp", "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        os.rename(image + ".tmp", image)

    ksm_unavailable = benchlib.ksm_problem() if "ksm" in args.modes else None
    saved_ksm = None
    if ksm_unavailable:
        print(f"bench-balloon: WARNING: KSM cannot run: {ksm_unavailable}; ksm skipped", file=sys.stderr)
        args.modes.remove("ksm")
    elif "ksm" in args.modes:
        saved_ksm = benchlib.ksm_settings()
        print(f"KSM settings before: {saved_ksm}; for the ksm run: run=1 pages_to_scan={args.ksm_pages_to_scan} "
              f"sleep_millisecs={args.ksm_sleep_ms}")
    print(f"bench-balloon: {args.vms} test guests of {args.mem} MiB, each reads the same {args.mib} MiB image, then "
          f"{args.cycles} cycles of {args.private_mib} MiB private data kept {args.busy_ms} ms, freed, "
          f"idle {args.idle_ms} ms", flush=True)
    load_before, rows = os.getloadavg(), []
    try:
        for mode in args.modes:
            if mode == "ksm":
                problem = benchlib.ksm_start(args.ksm_pages_to_scan, args.ksm_sleep_ms)
                if problem:
                    print(f"bench-balloon: WARNING: KSM cannot run: {problem}", file=sys.stderr)
                    continue
            print(f"bench-balloon: {mode} ...", flush=True)
            try:
                rows.append(run_mode(args, image, mode))
            finally:
                if mode == "ksm":
                    benchlib.ksm_stop()
    finally:
        benchlib.ksm_restore(saved_ksm)
    load = (load_before, os.getloadavg())

    rows_table = table(args, rows)
    print()
    benchlib.print_table(rows_table)
    print(benchlib.load_line(load))
    with open(os.path.join(OUT, "balloon-table.md"), "w") as f:
        f.write(benchlib.markdown(rows_table))
    with open(os.path.join(OUT, "balloon-results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1, default=str)
    plot = os.path.join(OUT, "balloon-memory-over-time.svg")
    svg_plot(rows, plot)
    print(f"plot: {plot}; Markdown table: {os.path.join(OUT, 'balloon-table.md')}")
    sys.exit(1 if any(r["exit"] != 0 or r["bad_consoles"] for r in rows) else 0)


if __name__ == "__main__":
    main()

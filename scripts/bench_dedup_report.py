"""The dedup benchmark's output (scripts/bench-dedup.py): figures per run, the table (text on
standard output, Markdown in target/bench/dedup-table.md), the goals and the plot."""
import os
import platform
import sys

import benchlib
from benchlib import MIB, PAGE

RISING_WINDOW_S = 5.0
GOAL_IDEAL_PCT = 99.0
GOAL_CPU_RATIO = 0.1
GOAL_US_PER_PAGE = 2.0
GOAL_CPU_VMS = 16
# VMAs per guest are acceptable when 16 such guests fit one process (`density --threads`).
GOAL_VMA_GUESTS_PER_PROCESS = 16


def timing(result, samples):
    """(seconds from the last report to 90 % of the final saving, still rising at the end?):
    the two times are samepage's (density-result), the rise is read off the samples."""
    if not samples or samples[-1][1] <= 0 or result["total_saved_bytes"] <= 0:
        return None, False
    end_t, final, _ = samples[-1]
    earlier = [s for t, s, _ in samples if t <= end_t - RISING_WINDOW_S]
    rising = bool(earlier) and earlier[-1] < 0.98 * final
    last_report, t90 = benchlib.seconds(result["last_report_ms"]), benchlib.seconds(result["t90_ms"])
    if last_report is None or t90 is None:
        return None, rising
    return max(0.0, t90 - last_report), rising


def figures(row, spec, map_limit):
    """The table's figures for one run (None where the run gave none)."""
    r, n, mode = row.get("result"), row["vms"], row["mode"]
    f = {"workload": row["workload"], "mode": mode, "vms": n, "skipped": row.get("skipped")}
    if r is None:
        f["failed"] = row.get("skipped") or f"exit {row.get('exit')}"
        return f
    ideal = spec["ideal"][n]
    if mode == "ksm":
        cpu, merged = row["ksmd_cpu_s"], r["ksm_saved_bytes"] / PAGE
    elif mode.startswith("hinted"):
        cpu, merged = r["merge_cpu_us"] / 1e6, r["merged"]
    elif mode == "shared":
        # Image pages are mapped by the disk's reads (on the I/O path, not in merge CPU), then
        # merged by content like any page: `merged` counts them once.
        cpu, merged = r["merge_cpu_us"] / 1e6, r["merged"]
    else:
        cpu, merged = 0.0, 0
    lag, rising = timing(r, row["samples"])
    host_bytes, host_measured_here = r["host_bytes"], False
    if mode == "off" and row["measured_guest_ram_bytes"] > 0:
        # samepage's figure misses guests' RAM here (see print_notes): this script's own.
        host_bytes, host_measured_here = row["measured_guest_ram_bytes"], True
    f.update({
        "host_mib": host_bytes / MIB, "host_measured_here": host_measured_here,
        "saved_mib": r["total_saved_bytes"] / MIB,
        "ideal_pct": 100.0 * r["total_saved_bytes"] / ideal if ideal else None,
        "lag_s": lag, "rising": rising,
        "cpu_s": cpu,
        "us_per_page": cpu * 1e6 / merged if merged else None,
        "steady": row.get("steady_cpu_per_min"),
        "vmas_per_vm": r["vmas"] / n,
        "vma_share": r["vmas"] / n / map_limit,
        "process_vmas": r["process_vmas"],
        "broker_mib": r["broker_rss_bytes"] / MIB if mode in ("hinted", "shared") else None,
        "intact": not row["bad_consoles"] and row["exit"] == 0,
        "bad_consoles": row["bad_consoles"], "exit": row["exit"],
        "hold_s": row["hold_s"], "mem_mib": row["mem_mib"],
    })
    return f


def add_ratios(figs):
    """Host memory against `off`, merge CPU against ksmd, of the same workload and N."""
    by = {(f["workload"], f["vms"], f["mode"]): f for f in figs}
    for f in figs:
        off = by.get((f["workload"], f["vms"], "off"))
        ksm = by.get((f["workload"], f["vms"], "ksm"))
        f["host_vs_off"] = (f["host_mib"] / off["host_mib"]
                            if "host_mib" in f and off and off.get("host_mib") else None)
        f["cpu_vs_ksm"] = (f["cpu_s"] / ksm["cpu_s"]
                           if f["mode"] != "ksm" and f["mode"] != "off" and "cpu_s" in f and ksm and ksm.get("cpu_s") else None)


HEADER = ("workload", "VMs", "mode", "host MiB", "÷ off", "MiB saved", "% of ideal", "last report → 90 %",
          "merge CPU", "÷ ksmd", "µs/merged page", "steady CPU/min", "VMAs/VM", "of max_map_count", "broker RSS",
          "data intact")


def cells(f):
    num = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    if "failed" in f:
        return (f["workload"], str(f["vms"]), f["mode"]) + (f"not run: {f['failed']}",) + ("",) * 12
    lag = "n/a" if f["lag_s"] is None else f"{f['lag_s']:.1f} s"
    saved = f"{f['saved_mib']:.1f}" + (" (rising)" if f["rising"] else "")
    intact = "yes" if f["intact"] else (f"NO: vm{f['bad_consoles']}" if f["bad_consoles"] else f"exit {f['exit']}")
    host = f"{f['host_mib']:.1f}" + (" †" if f["host_measured_here"] else "")
    return (f["workload"], str(f["vms"]), f["mode"], host, num(f["host_vs_off"], ".3f"),
            saved, num(f["ideal_pct"], ".1f"), lag, f"{f['cpu_s']:.2f} s", num(f["cpu_vs_ksm"], ".3f"),
            num(f["us_per_page"], ".2f"), "n/a" if f["steady"] is None else f"{f['steady']:.2f} s",
            f"{f['vmas_per_vm']:.0f}", f"{100 * f['vma_share']:.2f} %",
            "n/a" if f["broker_mib"] is None else f"{f['broker_mib']:.1f} MiB", intact)


def print_header(args, specs, map_limit):
    print(f"\nsamepage dedup benchmark: {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"vm.max_map_count {map_limit}; holds {', '.join(f'{h:.0f} s at N={n}' for n, h in args.holds.items())} "
          f"(off: at most 2 s); KSM pages_to_scan={args.ksm_pages_to_scan} sleep_millisecs={args.ksm_sleep_ms}")
    print(benchlib.load_line(args.load))
    for workload, spec in specs.items():
        ideal = ", ".join(f"N={n}: {b / MIB:.1f} MiB" for n, b in spec["ideal"].items())
        print(f"  {workload}: {spec['what']}; ideal saving {ideal}")


def print_notes(figs, rows):
    print("host MiB: the guests' private RAM plus the shared store, less what KSM shares; ÷ off: against --dedup off.\n"
          "last report → 90 %: from the last page report to 90 % of the final saving (0.0: reached by then; samples\n"
          "  every ~0.1 s); (rising): the saving still grew in the last 5 s.\n"
          "merge CPU: hinted, the VMMs' merge batches with their vCPU pauses and periodic refreshes, plus the broker\n"
          "  process (processes only); ksm, ksmd's CPU\n"
          "  over the run. µs/merged page: hinted, per page mapped from the store; ksm, per page KSM shares.\n"
          "shared: the defaults (`,ro`): the read-only image's page cache is mapped by the disk's reads (their CPU\n"
          "  is on the I/O path, not in merge CPU), then the reports merge those pages by content into the store and\n"
          "  the image's page cache is given back; host MiB counts what page cache is left, once per image.\n"
          "steady CPU/min: CPU seconds a minute of ksmd, the VMMs' threads but the guests' vCPUs, and the broker,\n"
          "  from 3 s after the last report to 1 s before the hold ends (ksmd keeps scanning; samepage looks at its\n"
          "  merged pages' page tables every --dedup-scan-every, 1 s).\n"
          "VMAs/VM: the merge engine's VMAs of guest RAM per guest; --threads puts all N in one process.\n"
          "% of ideal: KSM can pass 100 %: it also merges guest pages that are not file pages (the test guest's\n"
          "  page hashes, its image, page tables), which the ideal leaves out.")
    factors = [x for row in rows for x in row.get("hold_factors", [])]
    if factors:
        print(f"holds: the guests held {min(factors):.2f}-{max(factors):.2f} times as long as asked (the test guest\n"
              f"  calibrates its TSC against the PIT; one preempted meanwhile misjudges the rate).")
    if any(f["mode"] == "hinted" and "failed" not in f for f in figs):
        print("broker CPU (part of hinted's merge CPU, processes only) is read after density's end-of-run check of the\n"
              "  store (one more BLAKE3 per store page) and after the VMMs released their references at exit: more\n"
              "  than merging alone costs.")
    if any(f.get("host_measured_here") for f in figs):
        print("†: measured here: samepage's private_bytes for --dedup off leaves out a guest whose RAM mapping the\n"
              "  kernel merged with a neighbouring anonymous mapping (its smaps reading skips such a mapping); this is\n"
              "  the VMMs' anonymous mappings the size of guest RAM, the largest sum seen (every 0.25 s) in the run.")


def goal_line(name, figure, met):
    verdict = "not measured" if met is None else ("met" if met else "NOT MET")
    print(f"  [{verdict}] {name}: {figure}")


def print_goals(args, figs, map_limit):
    ok = {(f["workload"], f["vms"], f["mode"]): f for f in figs if "failed" not in f}
    # samepage's modes: hinted (copied images, merged) and shared (the defaults: mapped, then
    # merged by content).
    hinted = [f for f in ok.values() if f["mode"].startswith("hinted") or f["mode"] == "shared"]
    print("\ngoals:")
    parts, met = [], True
    for workload in args.workloads:
        rows = [f for f in hinted if f["workload"] == workload and f["ideal_pct"] is not None]
        if not rows:
            parts.append(f"{workload}: not measured")
            met = None if met is not False else False
            continue
        worst = min(f["ideal_pct"] for f in rows)
        intact = all(f["intact"] for f in rows)
        parts.append(f"{workload} min {worst:.2f} %, data {'intact' if intact else 'NOT intact'}")
        met = met and worst >= GOAL_IDEAL_PCT and intact if met is not None else None
    failed = [f"{f['workload']} {f['mode']} N={f['vms']}" for f in figs
              if (f["mode"].startswith("hinted") or f["mode"] == "shared") and "failed" in f]
    if failed:
        parts.append("failed: " + ", ".join(failed))
        met = False
    goal_line(f"samepage saves >= {GOAL_IDEAL_PCT:.0f} % of the ideal on both workloads, every guest's data intact "
              f"(every hinted and shared run)", "; ".join(parts), met)

    n = GOAL_CPU_VMS if GOAL_CPU_VMS in args.counts else max(args.counts)
    at = f"N={n}" + ("" if n == GOAL_CPU_VMS else f" (no N={GOAL_CPU_VMS} in this run)")
    ratios = [(f["workload"], f["mode"], f["cpu_vs_ksm"]) for f in hinted if f["vms"] == n]
    measured = [r for r in ratios if r[2] is not None]
    figure = "; ".join(f"{w} {m} {r:.3f}" for w, m, r in measured) or "no ksm run to compare"
    goal_line(f"samepage's merge CPU <= 1/10 of ksmd's at {at}", figure,
              all(r <= GOAL_CPU_RATIO for _, _, r in measured) if measured and n == GOAL_CPU_VMS else None)

    steady = []
    for f in hinted:
        ksm = ok.get((f["workload"], f["vms"], "ksm"))
        if f["steady"] is not None and ksm and ksm.get("steady"):
            steady.append((f, f["steady"] / ksm["steady"]))
    figure = "; ".join(f"{f['workload']} {f['mode']} N={f['vms']} {f['steady']:.2f} s/min ({r:.3f} of ksmd's)"
                       for f, r in steady) or "no steady state measured beside a ksm run"
    goal_line("samepage's steady-state CPU (guests holding their pages) <= 1/10 of ksmd's", figure,
              all(r <= GOAL_CPU_RATIO for _, r in steady) if steady else None)

    mixed = [f for f in hinted if f["workload"] == "mixed" and f["us_per_page"] is not None]
    figure = "; ".join(f"{f['mode']} N={f['vms']} {f['us_per_page']:.2f} µs" for f in mixed) or "no mixed runs"
    goal_line(f"<= {GOAL_US_PER_PAGE:.0f} µs merge CPU per merged page on the mixed workload (hinted)", figure,
              all(f["us_per_page"] <= GOAL_US_PER_PAGE for f in mixed) if mixed else None)

    limit = map_limit / GOAL_VMA_GUESTS_PER_PROCESS
    vma_rows = [f for f in hinted if f["workload"] == "mixed"]
    figure = "; ".join(f"{f['mode']} N={f['vms']} ({f['mem_mib']} MiB guest) {f['vmas_per_vm']:.0f} VMAs/VM = "
                       f"{100 * f['vma_share']:.2f} % of vm.max_map_count {map_limit}" for f in vma_rows)
    goal_line(f"VMAs per mixed guest <= 1/{GOAL_VMA_GUESTS_PER_PROCESS} of vm.max_map_count "
              f"({limit:.0f}: {GOAL_VMA_GUESTS_PER_PROCESS} guests fit one process)", figure or "no mixed runs",
              all(f["vmas_per_vm"] <= limit for f in vma_rows) if vma_rows else None)
    if any(f["mem_mib"] != 256 for f in vma_rows):
        print("  (the VMA goal is stated for 256 MiB guests; this run used other sizes)")


def plot(args, specs, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-dedup: no matplotlib (Debian python3-matplotlib, scripts/setup-host.sh --bench); plot skipped",
              file=sys.stderr)
        return False
    n = max(args.counts)
    fig, axes = plt.subplots(1, len(specs), figsize=(7 * len(specs), 4.5), squeeze=False)
    for ax, (workload, spec) in zip(axes[0], specs.items()):
        for row in rows:
            if row["workload"] == workload and row["vms"] == n and row.get("samples"):
                ax.plot([s[0] for s in row["samples"]], [s[1] for s in row["samples"]],
                        label=row["mode"], drawstyle="steps-post")
        ax.axhline(spec["ideal"][n] / MIB, color="grey", linestyle="--", linewidth=1, label="ideal")
        ax.set_title(f"{workload}: {n} test guests")
        ax.set_xlabel("seconds since the VMs started")
        ax.set_ylabel("host MiB saved")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def print_all(args, specs, rows, out):
    """Prints the table, notes, goals and plot path; returns whether any run failed."""
    map_limit = benchlib.max_map_count()
    figs = [figures(row, specs[row["workload"]], map_limit) for row in rows]
    add_ratios([f for f in figs if "failed" not in f])
    for f in figs:
        f.setdefault("host_vs_off", None)
        f.setdefault("cpu_vs_ksm", None)
    print_header(args, specs, map_limit)
    table = [HEADER] + [cells(f) for f in figs]
    benchlib.print_table(table)
    with open(os.path.join(out, "dedup-table.md"), "w") as f:
        f.write(benchlib.markdown(table))
    print_notes(figs, rows)
    print_goals(args, figs, map_limit)
    png = os.path.join(out, "dedup-saved-over-time.png")
    if plot(args, specs, rows, png):
        print(f"\nplot: {png}; Markdown table: {os.path.join(out, 'dedup-table.md')}")
    return any(("failed" in f and not f.get("skipped")) or ("intact" in f and not f["intact"]) for f in figs)

#!/usr/bin/env python3
"""Linux clone benchmark (not a test; docs/snapshot.md, "Benchmark"): one patched Linux guest
booted with samepage's defaults (the read-only root image shared, the guest's page reports
merged, host hashing where the kernel has it) runs the Linux density benchmark's workload
(resources/guest/rootimage/) and is snapshotted when it starts holding its memory after the
workload; then N clones of that snapshot (`samepage density --restore`) each go on from there:
the rest of the hold, then every file of the image read and hashed again from the page cache
they were restored with. Per run: host memory (total, per guest, and as a multiple of the one
booted guest's), the clones' snapshot page cache and private memory, the time from each clone
process's start to its vCPU entering the guest, host CPU, and whether every guest's data was intact.

Guest kernel code runs emulated on hosts whose KVM emulates it (/sys/module/kvm_pvm): there the
boot and the workload are 100-1000x slower than on real hardware; the memory figures are the
guests' own.
"""
import argparse
import json
import os
import re
import resource
import shutil
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
from benchlib import EMULATING, INITRD, MIB, OUT, SAMEPAGE  # noqa: E402
from benchlib import VMLINUX as KERNEL  # noqa: E402

IMAGE = os.path.join(benchlib.REPO, "target/linux-density/root.img")
RESULTS = os.path.join(OUT, "linux-clones-results.json")
SNAPSHOT = os.path.join(OUT, "linux-clone-snapshot")
# start.sh prints this once the workload is done and the page reports settled.
MARKER = "density: holding"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="4,8", help="comma-separated clone counts (default 4,8)")
    parser.add_argument("--hold", type=float, default=30, help="seconds each guest holds its memory (default 30)")
    parser.add_argument("--hint-wait", type=float, default=420,
                        help="seconds the booted guest waits for its page reports to settle (default 420)")
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before a VM is stopped (default 3600)")
    parser.add_argument("--reuse-snapshot", action="store_true",
                        help="run the clones of the last run's snapshot, keeping its booted row, boot nothing")
    parser.add_argument("--report", action="store_true",
                        help="print the tables and write the plot from the last run's saved results, run nothing")
    args = parser.parse_args()
    try:
        args.counts = [int(n) for n in args.n.split(",") if n]
    except ValueError:
        parser.error(f"--n takes comma-separated counts, not {args.n!r}")
    if not args.counts or min(args.counts) < 1:
        parser.error("--n counts >= 1")
    return args


def digest_after_hold(text):
    m = re.search(r"^density: data sha256 after the hold ([0-9a-f]{64})$", text, re.M)
    return m.group(1) if m else None


def first_exits_ms(stderr_text):
    """Each VM's `vCPU 0 enters the guest X ms after process start` log line (relayed by
    density): for a clone, when it runs the snapshot's code again."""
    return [float(x) for x in re.findall(r"vCPU 0 enters the guest ([\d.]+) ms after process start", stderr_text)]


def run(cmd, tag, env_info=False):
    """One `samepage density` run with its logs; (exit, stdout, stderr, result, wall s, CPU s)."""
    logs = os.path.join(OUT, "logs", tag)
    if env_info:
        os.environ["RUST_LOG"] = "info"
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    try:
        code, out, result = benchlib.run_density(cmd, logs, every=1)
    finally:
        os.environ.pop("RUST_LOG", None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(logs + ".err") as f:
        err = f.read()
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return code, out, err, result, time.monotonic() - started, cpu


def boot_and_snapshot(args, digest):
    """The one booted guest, snapshotted at the marker; its figures."""
    consoles = os.path.join(OUT, "consoles", "linux-clones-booted")
    shutil.rmtree(SNAPSHOT, ignore_errors=True)
    cmdline = (f"quiet samepage.script=density/start.sh density.hold={args.hold:g} "
               f"density.hint_wait={args.hint_wait:g}" + (" fphash.hash=host" if benchlib.kernel_has_hash_param(KERNEL) else ""))
    cmd = [SAMEPAGE, "density", "--vms", "1", "--kernel", KERNEL, "--initrd", INITRD, "--disk", IMAGE + ",ro",
           "--mem", f"{args.mem}M", "--console-dir", consoles, "--cmdline", cmdline,
           "--snapshot-to", SNAPSHOT, "--snapshot-at", MARKER, "--timeout", str(args.timeout)]
    benchlib.drop_page_cache(IMAGE)
    code, out, err, result, wall, cpu = run(cmd, "linux-clones-booted", env_info=True)
    console = benchlib.read_console(consoles, 0)
    m = re.search(r"^density: workload starts at ([\d.]+) s", console, re.M)
    h = re.search(rf"^{MARKER} [\d.]+ s from ([\d.]+) s", console, re.M)
    snap = re.search(r"snapshot written to \S+: guest paused ([\d.]+) ms, ([\d.]+) MiB", err)
    return {"kind": "booted", "n": 1, "cmd": cmd, "exit": code, "wall_s": wall, "cpu_s": cpu, "result": result,
            "user_code_s": float(m.group(1)) if m else None, "marker_s": float(h.group(1)) if h else None,
            "snapshot_pause_ms": float(snap.group(1)) if snap else None,
            "snapshot_written_mib": float(snap.group(2)) if snap else None,
            "first_exit_ms": first_exits_ms(err),
            "intact": code == 0 and digest_after_hold(console) == digest,
            "error": None if code == 0 and result else benchlib.failure_text(os.path.join(OUT, "logs", "linux-clones-booted"), out)}


def clones(args, n, digest):
    tag = f"linux-clones-{n}"
    # What earlier runs left in the page cache is not this run's: the image's (the clones'
    # guests' page cache came with the snapshot) and the snapshot's memory file's (the booted
    # guest wrote it, earlier clones read it). Each run starts without them, as the booted
    # guest did, and counts only what its clones read.
    benchlib.drop_page_cache(IMAGE)
    benchlib.drop_page_cache(os.path.join(SNAPSHOT, "memory"))
    consoles = os.path.join(OUT, "consoles", tag)
    cmd = [SAMEPAGE, "density", "--restore", SNAPSHOT, "--vms", str(n), "--console-dir", consoles,
           "--timeout", str(args.timeout)]
    code, out, err, result, wall, cpu = run(cmd, tag, env_info=True)
    digests = [digest_after_hold(benchlib.read_console(consoles, i)) for i in range(n)]
    return {"kind": "clones", "n": n, "cmd": cmd, "exit": code, "wall_s": wall, "cpu_s": cpu, "result": result,
            "first_exit_ms": first_exits_ms(err), "intact": code == 0 and all(d == digest for d in digests),
            "error": None if code == 0 and result else benchlib.failure_text(os.path.join(OUT, "logs", tag), out)}


def state_costs():
    """Bytes of state.json per part of the snapshot (compact JSON, as samepage writes it)."""
    with open(os.path.join(SNAPSHOT, "state.json")) as f:
        state = json.load(f)
    size = lambda v: len(json.dumps(v, separators=(",", ":")))
    costs = {f"vCPU {i}": size(v) for i, v in enumerate(state["vcpus"])}
    costs.update({"irqchips, PIT, clock": size(state["vm"]), "COM1": size(state["serial"])})
    names = [f"virtio-blk {i}" for i in range(len(state["machine"]["disks"]))] + ["fphash"]
    costs.update({f"{name} transport": size(d) for name, d in zip(names, state["devices"])})
    costs["machine, host, RAM layout"] = size(state["machine"]) + size(state["host"]) + size(state["ram"])
    memory = os.stat(os.path.join(SNAPSHOT, "memory"))
    return costs, memory.st_size, memory.st_blocks * 512


HEADER = ("guests", "host MiB", "MiB/guest", "× one booted guest", "private MiB", "snapshot cache MiB",
          "process start → vCPU enters the guest", "booted: guest uptime at user code", "wall", "host CPU", "data intact")


def cells(row, one):
    r = row["result"] or {}
    host = r.get("host_bytes", 0) / MIB
    first = row["first_exit_ms"]
    exits = f"{min(first):.0f}-{max(first):.0f} ms" if first else "n/a"
    user = f"{row['user_code_s']:.1f} s" if row.get("user_code_s") else "-"
    label = "1 booted" if row["kind"] == "booted" else f"{row['n']} clones"
    return (label, f"{host:.1f}", f"{host / row['n']:.1f}", f"{host / one:.2f}" if one else "n/a",
            f"{r.get('private_bytes', 0) / MIB:.1f}", f"{r.get('snapshot_cache_bytes', 0) / MIB:.1f}",
            exits, user, f"{row['wall_s']:.0f} s", f"{row['cpu_s']:.0f} s",
            "yes" if row["intact"] else f"NO (exit {row['exit']})")


DENSITY_RESULTS = os.path.join(OUT, "linux-density-results.json")
PLOT = os.path.join(OUT, "linux-clones-memory.svg")


def booted_baselines(counts):
    """Host MiB of N booted guests per mode, from the Linux density benchmark's saved rows."""
    try:
        with open(DENSITY_RESULTS) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    out = {}
    for r in rows:
        result = r.get("result") or {}
        if r.get("n") in counts and r.get("mode") in ("off", "ksm", "sharing-hinted") and result.get("host_bytes"):
            out[(r["n"], r["mode"])] = (r.get("measured_guest_ram_bytes") or result["host_bytes"]) / MIB
    return out


def plot_svg(rows, baselines, path):
    """Host memory per run as horizontal bars (an SVG, no plotting library needed): the clones'
    split into what they wrote, the snapshot's page cache and the rest; N booted guests beside
    them (the density benchmark's rows, when saved)."""
    bars = []
    for row in rows:
        r = row["result"] or {}
        host, private, cache = (r.get(k, 0) / MIB for k in ("host_bytes", "private_bytes", "snapshot_cache_bytes"))
        label = "1 guest booted (defaults)" if row["kind"] == "booted" else f"{row['n']} clones"
        bars.append((label, [(private, "#d95f02", "written by the guests"), (cache, "#1b9e77", "snapshot page cache"),
                             (max(host - private - cache, 0), "#7570b3", "store, image cache")]))
        if row["kind"] == "clones":
            for mode, color in (("off", "#999999"), ("ksm", "#666666"), ("sharing-hinted", "#333333")):
                if (row["n"], mode) in baselines:
                    bars.append((f"{row['n']} booted, {mode}", [(baselines[(row['n'], mode)], color, "booted guests")]))
    top = max((sum(v for v, _, _ in segs) for _, segs in bars), default=1) or 1
    width, left, bar_h = 900, 190, 22
    height = 40 + len(bars) * (bar_h + 8) + 40
    scale = (width - left - 80) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">Host memory, MiB: Linux clones of one snapshot and booted guests'
           f'{" (guest kernel code emulated)" if EMULATING else ""}</text>']
    for i, (label, segs) in enumerate(bars):
        y = 40 + i * (bar_h + 8)
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{label}</text>')
        x = left
        for value, color, what in segs:
            w = value * scale
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"><title>{what}: {value:.1f} MiB</title></rect>')
            x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{sum(v for v, _, _ in segs):.1f}</text>')
    legend_y = height - 15
    for j, (color, what) in enumerate((("#d95f02", "written by the guests"), ("#1b9e77", "snapshot page cache"),
                                       ("#7570b3", "store, image cache"), ("#666666", "booted guests (off, ksm, defaults)"))):
        out.append(f'<rect x="{10 + j * 220}" y="{legend_y - 10}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{26 + j * 220}" y="{legend_y}">{what}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def report(args, rows):
    """The tables and the plot, from `rows` (this run's, or saved ones with --report)."""
    one = (rows[0]["result"] or {}).get("host_bytes", 0) / MIB
    booted = rows[0]
    print(f"\nOne guest booted to user code at {booted['user_code_s']} s of guest uptime, snapshotted at "
          f"{booted['marker_s']} s: guest paused {booted['snapshot_pause_ms']} ms, "
          f"{booted['snapshot_written_mib']} MiB written." + (" Guest kernel code emulated on this host." if EMULATING else ""))
    print(benchlib.markdown([HEADER] + [cells(row, one) for row in rows]))
    baselines = booted_baselines({row["n"] for row in rows})
    if baselines:
        print(benchlib.markdown([("N booted guests (linux-density-results.json)", "host MiB")]
                                + [(f"{n} booted, {mode}", f"{mib:.1f}") for (n, mode), mib in sorted(baselines.items())]))
    if os.path.exists(os.path.join(SNAPSHOT, "state.json")):
        costs, length, allocated = state_costs()
        print(benchlib.markdown([("part of the snapshot", "bytes")] + [(k, str(v)) for k, v in costs.items()]
                                + [("memory file: length / allocated", f"{length} / {allocated}")]))
    plot_svg(rows, baselines, PLOT)
    print(f"\nplot: {PLOT}")


def save(args, rows):
    with open(RESULTS, "w") as f:
        json.dump({"args": vars(args), "emulating_kvm": EMULATING, "rows": rows}, f, indent=1, default=str)


def main():
    args = parse_args()
    if args.report:
        with open(RESULTS) as f:
            saved = json.load(f)
        report(args, saved["rows"])
        return
    for path in (SAMEPAGE, KERNEL, INITRD, IMAGE):
        if not os.path.exists(path):
            sys.exit(f"bench-linux-clones: {path} is missing (scripts/bench-linux-clones.sh builds all)")
    with open(IMAGE + ".json") as f:
        digest = json.load(f)["data_sha256"]
    os.makedirs(OUT, exist_ok=True)
    if args.reuse_snapshot:
        with open(RESULTS) as f:
            rows = [json.load(f)["rows"][0]]
        print("bench-linux-clones: the last run's snapshot and booted guest, reused", flush=True)
    else:
        print(f"bench-linux-clones: one booted guest, snapshotted at {MARKER!r} ({time.strftime('%H:%M:%S')}) ...",
              flush=True)
        rows = [boot_and_snapshot(args, digest)]
    if rows[0]["error"] or not os.path.exists(os.path.join(SNAPSHOT, "state.json")):
        print(f"bench-linux-clones: the booted guest failed or took no snapshot:\n{rows[0]['error']}", file=sys.stderr)
        sys.exit(1)
    save(args, rows)
    for n in args.counts:
        print(f"bench-linux-clones: {n} clones ({time.strftime('%H:%M:%S')}) ...", flush=True)
        rows.append(clones(args, n, digest))
        save(args, rows)  # a run stopped later keeps the rows done
    report(args, rows)
    sys.exit(0 if all(row["intact"] for row in rows) else 1)


if __name__ == "__main__":
    main()

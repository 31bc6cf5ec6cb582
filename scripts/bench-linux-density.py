#!/usr/bin/env python3
"""Linux density benchmark (not a test): N patched Linux guests, each its own `samepage run`
process (`samepage density`, with a broker for the modes that merge), boot from the same
read-only ext4 image of real Debian files (resources/guest/mkrootimage.sh) and run a workload
from it: Python importing much of its standard library, perl, coreutils, then every file of
the image read and hashed (resources/guest/rootimage/). Per mode and N: host MiB per guest,
MiB saved against `off`, time from the VMs' start to 90 % of the saving, host CPU, and whether
every guest read the image's data intact; a table and a PNG of MiB saved over time.

Modes:
  off             nothing merged, the image copied into each guest (`,ro,share=off`)
  ksm             Linux KSM scans guest RAM (tuned for the run, restored after)
  hinted-guest    the guests report file pages, hashing them themselves (fphash.hash=guest)
  hinted-host     the same, the host hashing them (fphash.hash=host, protocol version 2)
  sharing         image sharing: page-aligned reads map the image's host page cache (`,ro`);
                  the guests' fphash driver is unbound, as for an unpatched guest
  sharing-hinted  image sharing plus the guests' reports (host hashing where the kernel has
                  it, else guest hashing)
A mode this build cannot run (no KSM, a kernel or VMM without host hashing) gets a row that
says why.

Guest kernel code runs emulated on hosts whose KVM emulates it (/sys/module/kvm_pvm): there
boot, the workload and guest hashing are 100-1000x slower than on real hardware, which moves
every time and CPU figure; the memory figures are the guests' own.
"""
import argparse
import json
import os
import platform
import re
import resource
import signal
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import benchlib  # noqa: E402
from benchlib import EMULATING, INITRD, MIB, OUT, SAMEPAGE  # noqa: E402
from benchlib import VMLINUX as KERNEL  # noqa: E402

IMAGE = os.path.join(benchlib.REPO, "target/linux-density/root.img")
RESULTS = os.path.join(OUT, "linux-density-results.json")

# dedup: samepage's --dedup; share: the image's page cache mapped (`,ro`) or copied
# (`,ro,share=off`); hints: the guests' fphash driver stays bound; hash: who hashes reported
# pages (None: no reports; "best": host where the kernel has it, else guest).
MODES = {
    "off": {"dedup": "off", "share": False, "hints": False, "hash": None},
    "ksm": {"dedup": "ksm", "share": False, "hints": False, "hash": None},
    "hinted-guest": {"dedup": "hinted", "share": False, "hints": True, "hash": "guest"},
    "hinted-host": {"dedup": "hinted", "share": False, "hints": True, "hash": "host"},
    "sharing": {"dedup": "hinted", "share": True, "hints": False, "hash": None},
    "sharing-hinted": {"dedup": "hinted", "share": True, "hints": True, "hash": "best"},
    # samepage's defaults plus a balloon with free page reporting (`--balloon`): the guests
    # give back memory they freed (a candidate for the defaults, measured before it is one).
    "sharing-hinted-balloon": {"dedup": "hinted", "share": True, "hints": True, "hash": "best", "balloon": True},
}
UNSUPPORTED = "not supported by this build"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, any of " + ", ".join(MODES))
    parser.add_argument("--n", default="2,4", help="comma-separated guest counts (default 2,4)")
    parser.add_argument("--hold", type=float, default=30,
                        help="seconds each guest holds its memory after its reports settled, before it reads the "
                             "image again and stops (default 30; off holds 0: nothing changes meanwhile)")
    parser.add_argument("--hint-wait", type=float, default=420,
                        help="most seconds a guest waits after its workload for its fphash driver to send every "
                             "report it queued (default 420: guest hashing of the 4096 reports the driver's ring "
                             "holds takes minutes where guest kernel code is emulated)")
    parser.add_argument("--mem", type=int, default=256, help="guest RAM per VM in MiB (default 256)")
    parser.add_argument("--timeout", type=int, help="seconds before a VM is stopped (default: 2400 + hint wait + hold)")
    parser.add_argument("--ksm-pages-to-scan", type=int, default=1000)
    parser.add_argument("--ksm-sleep-ms", type=int, default=20)
    parser.add_argument("--add", action="store_true",
                        help=f"keep the runs already in {RESULTS} (other modes or N; a mode and N run again is "
                             f"replaced), so that subsets run at different times make one table")
    parser.add_argument("--report", action="store_true",
                        help=f"run nothing: print the table of the runs in {RESULTS} (each run is saved there as "
                             f"it ends, so an interrupted benchmark keeps what it measured)")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    try:
        args.counts = [int(n) for n in args.n.split(",") if n]
    except ValueError:
        parser.error(f"--n takes comma-separated counts, not {args.n!r}")
    if not args.counts or min(args.counts) < 1 or args.hold < 0 or args.hint_wait < 0 or args.mem < 64:
        parser.error("--n counts >= 1, --hold and --hint-wait >= 0, --mem >= 64")
    if args.timeout is None:
        args.timeout = int(2400 + args.hint_wait + args.hold)
    return args


# --- What this build supports ------------------------------------------------------------

def hash_mode(mode, host_hash_kernel):
    """Who the mode asks to hash reported pages (None: the guests report nothing)."""
    wanted = MODES[mode]["hash"]
    if wanted == "best":
        return "host" if host_hash_kernel else "guest"
    return wanted


def unsupported_reason(mode, host_hash_kernel, ksm_unavailable):
    if mode == "ksm" and ksm_unavailable:
        return f"not run: KSM unavailable ({ksm_unavailable})"
    if MODES[mode]["hash"] == "host" and not host_hash_kernel:
        return (f"{UNSUPPORTED}: the guest kernel's fphash driver has no hash= parameter (protocol "
                f"version 1: the guest always hashes)")
    return None


# --- The guests' consoles ----------------------------------------------------------------

def counters(text, label):
    """The last `density: fphash<label> name=value ...` line's counters."""
    found = {}
    for match in re.finditer(rf"^density: fphash{re.escape(label)} (.*)$", text, re.M):
        found = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}
    return found


def guest_figures(text, digest, held):
    """What one guest's console says: its hashing mode, counters, times, whether its data was
    intact (after the hold too, if it held)."""
    g = {}
    m = re.search(r"^density: fphash device \S+ hints=(\S+) hash=(\S+)", text, re.M)
    g["hash"] = m.group(2) if m and m.group(1) != "off" else None
    m = re.search(r"^density: hashing in force is (\S+), not (\S+): stopping", text, re.M)
    g["hash_refused"] = (m.group(1), m.group(2)) if m else None
    m = re.search(r"^density: workload done at ([\d.]+) s", text, re.M)
    g["workload_done_s"] = float(m.group(1)) if m else None
    m = re.search(r"^density: workload starts at ([\d.]+) s", text, re.M)
    g["workload_start_s"] = float(m.group(1)) if m else None
    m = re.search(r"^density: hints settled at ([\d.]+) s \(pending (\d+)\)", text, re.M)
    g["settled_s"], g["pending"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    g["end"] = counters(text, " at the end:")
    first = re.search(r"^density: data sha256 ([0-9a-f]{64})$", text, re.M)
    after = re.search(r"^density: data sha256 after the hold ([0-9a-f]{64})$", text, re.M)
    g["intact"] = bool(first) and first.group(1) == digest and bool(after) and after.group(1) == digest
    g["python"] = bool(re.search(r"^density: python \S+ imported \d+ modules", text, re.M))
    g["failed_imports"] = re.findall(r"^density: python could not import (.*)$", text, re.M)
    return g


# --- One run -----------------------------------------------------------------------------

def cmdline_for(mode, args, hash_wanted):
    spec = MODES[mode]
    hold = 0 if mode == "off" else args.hold
    parts = ["quiet", "samepage.script=density/start.sh", f"density.hold={hold:g}",
             f"density.hint_wait={args.hint_wait:g}"]
    if not spec["hints"]:
        parts.append("density.hints=off")
    elif hash_wanted:
        parts.append(f"fphash.hash={hash_wanted}")
        if spec["hash"] != "best":
            parts.append(f"density.need_hash={hash_wanted}")
    return " ".join(parts)


def run_density(args, mode, n, hash_wanted, digest):
    """One `samepage density` run; returns its raw figures."""
    tag = f"linux-{mode}-{n}"
    samples = os.path.join(OUT, "samples", f"{tag}.csv")
    consoles = os.path.join(OUT, "consoles", tag)
    logs = os.path.join(OUT, "logs", tag)
    for d in (os.path.dirname(samples), os.path.dirname(logs)):
        os.makedirs(d, exist_ok=True)
    spec = MODES[mode]
    cmd = [SAMEPAGE, "density", "--vms", str(n), "--kernel", KERNEL, "--initrd", INITRD,
           "--disk", IMAGE + (",ro" if spec["share"] else ",ro,share=off"), "--mem", f"{args.mem}M",
           "--dedup", spec["dedup"], "--progress-every", "0.5", "--samples", samples,
           "--console-dir", consoles, "--cmdline", cmdline_for(mode, args, hash_wanted),
           "--timeout", str(args.timeout)]
    if spec.get("balloon"):
        cmd.append("--balloon")
    # Every run starts with the image out of the host's page cache, as on a host that did
    # not just run another mode: a warm cache left by an earlier run (its reads, in whatever
    # folios they made) would be counted for the sharing modes and change what they give back.
    benchlib.drop_page_cache(IMAGE)
    ksmd_before, started = benchlib.ksmd_cpu_seconds(), time.monotonic()
    started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    guest_ram_peak = 0

    def measure_off(proc):
        nonlocal guest_ram_peak
        guest_ram_peak = max(guest_ram_peak, benchlib.vmm_guest_ram_bytes(proc.pid, args.mem << 20))

    code, out, result = benchlib.run_density(cmd, logs, poll=measure_off if mode == "off" else None, every=2)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"mode": mode, "n": n, "cmd": cmd, "started_utc": started_utc, "exit": code,
           "hold_s": 0 if mode == "off" else args.hold, "hint_wait_s": args.hint_wait,
           "wall_s": time.monotonic() - started,
           "ksmd_cpu_s": benchlib.ksmd_cpu_seconds() - ksmd_before if mode == "ksm" else 0.0,
           # The VMMs and the broker are density's children, which it waits for: their CPU,
           # guest execution included (guest kernel code runs in the host kernel's emulator).
           "processes_cpu_s": (children.ru_utime + children.ru_stime)
           - (children_before.ru_utime + children_before.ru_stime),
           "samples": benchlib.read_samples(samples), "measured_guest_ram_bytes": guest_ram_peak,
           "guests": [guest_figures(benchlib.read_console(consoles, i), digest, mode != "off") for i in range(n)],
           "result": result}
    refused = [g["hash_refused"] for g in row["guests"] if g["hash_refused"]]
    if refused:
        row["skipped"] = (f"{UNSUPPORTED}: asked for fphash.hash={refused[0][1]}, the driver runs with "
                          f"{refused[0][0]} hashing (the VMM's fphash device does not offer host hashing)")
    elif code != 0 or result is None:
        row["error"] = benchlib.failure_text(logs, out)
        print(f"bench-linux-density: {tag} failed (exit {code}); logs: {logs}.out/.err, "
              f"consoles: {consoles}", file=sys.stderr)
    return row


def save(args, meta, rows):
    with open(RESULTS, "w") as f:
        json.dump({"args": vars(args), "image": meta, "emulating_kvm": EMULATING, "rows": rows}, f, indent=1,
                  default=str)


def kept_rows(args):
    """--add: the saved runs of modes and N this invocation does not run."""
    if not args.add or not os.path.exists(RESULTS):
        return []
    with open(RESULTS) as f:
        saved = json.load(f)["rows"]
    return [r for r in saved if not (r["mode"] in args.modes and r["n"] in args.counts)]


def run_all(args, meta, host_hash_kernel, ksm_unavailable):
    digest, rows = meta["data_sha256"], kept_rows(args)
    for n in args.counts:
        for mode in args.modes:
            reason = unsupported_reason(mode, host_hash_kernel, ksm_unavailable)
            if mode == "ksm" and not reason:
                problem = benchlib.ksm_start(args.ksm_pages_to_scan, args.ksm_sleep_ms)
                if problem:
                    ksm_unavailable = problem
                    reason = f"not run: KSM cannot run ({problem})"
            if reason:
                print(f"bench-linux-density: N={n} {mode}: {reason}", flush=True)
                rows.append({"mode": mode, "n": n, "skipped": reason})
                save(args, meta, rows)
                continue
            hash_wanted = hash_mode(mode, host_hash_kernel)
            print(f"bench-linux-density: N={n} {mode} ({time.strftime('%H:%M:%S')}) ...", flush=True)
            try:
                row = run_density(args, mode, n, hash_wanted, digest)
            finally:
                if mode == "ksm":
                    benchlib.ksm_stop()
            rows.append(row)
            save(args, meta, rows)
            result = row["result"] or {}
            intact = all(g["intact"] for g in row["guests"])
            print(f"  {row['wall_s']:.0f} s, exit {row['exit']}, samepage's saving "
                  f"{result.get('total_saved_bytes', 0) / MIB:.1f} MiB, "
                  f"{'data intact' if intact else 'DATA NOT INTACT (or not read)'}"
                  + (f"; {row['skipped']}" if row.get("skipped") else ""), flush=True)
    return rows


# --- Figures and the table ---------------------------------------------------------------

def figures(row, off_host):
    """The table's figures of one run (strings where a figure does not exist)."""
    f = {"mode": row["mode"], "n": row["n"]}
    if row.get("skipped") or row.get("result") is None:
        f["note"] = row.get("skipped") or f"failed: exit {row.get('exit')} (see target/bench/logs/)"
        return f
    r, n, guests = row["result"], row["n"], row["guests"]
    measured_off = row["mode"] == "off" and row["measured_guest_ram_bytes"]
    host = row["measured_guest_ram_bytes"] if measured_off else r["host_bytes"]
    hashed = sum(g["end"].get("hashed", 0) for g in guests)
    hash_s = sum(g["end"].get("hash_us", 0) for g in guests) / 1e6
    done = [g["workload_done_s"] for g in guests if g["workload_done_s"] is not None]
    modes = []
    if MODES[row["mode"]]["hints"]:  # else the driver was unbound: nothing hashed
        modes = sorted({g["hash"] for g in guests if g["hash"] and g["hash"] != "none"})
    f.update({
        "host_mib_per_guest": host / MIB / n, "host_total_mib": host / MIB,
        "saved_vs_off_mib": (off_host - host) / MIB if off_host is not None else None,
        "samepage_saved_mib": r["total_saved_bytes"] / MIB,
        "t90_s": benchlib.seconds(r["t90_ms"]) if r["total_saved_bytes"] > 0 else None,
        "merge_cpu_s": r["merge_cpu_us"] / 1e6 + row["ksmd_cpu_s"],
        "refresh_cpu_s": r.get("refresh_cpu_us", 0) / 1e6,
        "host_cpu_s": row["processes_cpu_s"] + row["ksmd_cpu_s"],
        "reported": sum(g["end"].get("records", 0) for g in guests),
        "dropped": sum(g["end"].get("dropped", 0) for g in guests),
        "pending": sum(g["pending"] or 0 for g in guests),
        "hashed": hashed, "guest_hash_s": hash_s, "hashing": "/".join(modes) or "-",
        "workload_s": max(done) if len(done) == n else None,
        "intact": all(g["intact"] for g in guests) and row["exit"] == 0,
        "python_ok": all(g["python"] for g in guests),
        "failed_imports": sorted({i for g in guests for i in g["failed_imports"]}),
        "wall_s": row["wall_s"], "exit": row["exit"],
    })
    return f


HEADER = ("N", "mode", "host MiB/guest", "MiB saved vs off", "samepage's saving", "start → 90 % of saving",
          "merge CPU", "host CPU", "reports sent / dropped", "guest hashing", "workload done", "data intact")


def cells(f):
    num = lambda v, fmt, unit="": "n/a" if v is None else format(v, fmt) + unit
    if "note" in f:
        return (str(f["n"]), f["mode"], f["note"]) + ("",) * (len(HEADER) - 3)
    hashing = (f"{f['hashing']}: {f['hashed']} pages, {f['guest_hash_s']:.0f} s" if f["hashed"]
               else f["hashing"])
    intact = "yes" if f["intact"] else f"NO (exit {f['exit']})"
    return (str(f["n"]), f["mode"], f"{f['host_mib_per_guest']:.1f}", num(f["saved_vs_off_mib"], ".1f"),
            f"{f['samepage_saved_mib']:.1f}", num(f["t90_s"], ".0f", " s"), merge_cpu(f),
            f"{f['host_cpu_s']:.0f} s", f"{f['reported']} / {f['dropped']}" if f["hashing"] != "-" else "-",
            hashing, num(f["workload_s"], ".0f", " s"), intact)


def merge_cpu(f):
    """The merge CPU cell: with the refreshes' part when there is one."""
    refresh = f" (refresh {f['refresh_cpu_s']:.2f})" if f.get("refresh_cpu_s") else ""
    return f"{f['merge_cpu_s']:.2f} s{refresh}"


def print_header(args, meta, rows):
    when = [r["started_utc"] for r in rows if r.get("started_utc")]
    kvm = ("emulating KVM (/sys/module/kvm_pvm: guest kernel code is emulated, 100-1000x slower than on "
           "real hardware)" if EMULATING else "KVM with hardware virtualization")
    print(f"\nsamepage Linux density benchmark, runs from {min(when) if when else 'none'}: "
          f"{os.cpu_count()} CPUs, Linux {platform.release()}, {kvm}")
    print(f"  image {IMAGE}: {meta['files']} files, {meta['file_bytes'] / MIB:.1f} MiB of file data "
          f"({meta['file_pages']} pages), {meta['image_bytes'] / MIB:.0f} MiB image")
    holds = sorted({r.get("hold_s", args.hold) for r in rows if r.get("result") and r["mode"] != "off"})
    waits = sorted({r.get("hint_wait_s", args.hint_wait) for r in rows if r.get("result")})
    print(f"  guests: {args.mem} MiB, 1 vCPU; hold {', '.join(f'{h:g}' for h in holds) or '-'} s (off: 0), "
          f"hint wait at most {', '.join(f'{w:g}' for w in waits) or '-'} s; "
          f"KSM pages_to_scan={args.ksm_pages_to_scan} sleep_millisecs={args.ksm_sleep_ms}")
    print(benchlib.load_line(args.load))


NOTES = """host MiB/guest: the guests' private RAM plus the broker's store and the image's page cache (once), less
  what KSM shares, divided by N, all guests holding their memory after they stopped; off: the VMMs' anonymous
  guest-RAM mappings from smaps (as scripts/bench-dedup.py measures it). MiB saved vs off: off's host MiB
  minus this mode's, same N. samepage's saving: what density reports saved (merged pages, KSM's pages_sharing,
  guest pages mapping the image less its page cache). The image's page cache counts as much of the image as
  the host has cached, read by a guest or not.
start → 90 % of saving: from the VMs' start (boot included) to the first sample (every 0.5 s) at 90 % of the
  final saving.
merge CPU: the VMMs' merge batches with their vCPU pauses, their periodic refreshes (in brackets: copy-on-write
  looks, sweeps for pages of zeros, image page cache given back) and the broker process (hinted, sharing),
  ksmd (ksm); image sharing's own cost is on the disk's read path, in host CPU only. host CPU: every VMM and broker process (guest execution
  included) plus ksmd (ksm).
reports sent / dropped: page records the guests' fphash drivers sent, and reports lost to a full ring (4096
  entries) while the guest hashed more slowly than it read. guest hashing: pages the guests hashed and the
  guest time BLAKE3 took, summed over guests."""

EMULATED_NOTE = """Measured on emulating KVM: the guests' kernel code (boot, page cache, the fphash driver's BLAKE3)
  runs emulated, so times, host CPU, guest hashing and the drops it causes are far from real hardware's; host
  memory per guest and what each mode saves of it are the guests' own and hold on both."""


def plot(args, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-linux-density: no matplotlib (Debian python3-matplotlib, scripts/setup-host.sh --linux-bench); "
              "plot skipped", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(args.counts), figsize=(7 * len(args.counts), 4.5), squeeze=False)
    for ax, n in zip(axes[0], args.counts):
        for row in rows:
            if row["n"] == n and row.get("samples") and not row.get("skipped"):
                ax.plot([s[0] for s in row["samples"]], [s[1] for s in row["samples"]],
                        label=row["mode"], drawstyle="steps-post")
        where = " (emulating KVM: guest kernel code emulated)" if EMULATING else ""
        ax.set_title(f"{n} Linux guests{where}", fontsize=10)
        ax.set_xlabel("seconds since the VMs started")
        ax.set_ylabel("host MiB saved")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def print_all(args, meta, rows):
    """Prints the table and notes, writes the Markdown table and plot; returns whether a run
    that should have worked did not."""
    off = {r["n"]: (r["measured_guest_ram_bytes"] or r["result"]["host_bytes"])
           for r in rows if r["mode"] == "off" and r.get("result") and not r.get("skipped")}
    order = list(MODES)
    rows = sorted(rows, key=lambda r: (r["n"], order.index(r["mode"])))
    figs = [figures(r, off.get(r["n"])) for r in rows]
    print_header(args, meta, rows)
    table = [HEADER] + [cells(f) for f in figs]
    # A row with a note instead of figures runs on past the columns.
    benchlib.print_table(table, full=lambda row: any(row[3:]))
    with open(os.path.join(OUT, "linux-density-table.md"), "w") as f:
        f.write(benchlib.markdown(table))
    print(NOTES)
    if EMULATING:
        print(EMULATED_NOTE)
    imports = sorted({i for f in figs for i in f.get("failed_imports", [])})
    if imports:
        print("python modules the guests could not import: " + "; ".join(imports))
    png = os.path.join(OUT, "linux-density-saved-over-time.png")
    if plot(args, rows, png):
        print(f"\nplot: {png}")
    print(f"Markdown table: {os.path.join(OUT, 'linux-density-table.md')}; "
          f"raw figures: {os.path.join(OUT, 'linux-density-results.json')}")
    return any("note" in f and f["note"].startswith("failed") or ("intact" in f and not f["intact"]) for f in figs)


def main():
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so that the running density is stopped and KSM restored.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    for path, builder in ((SAMEPAGE, "cargo build --release"), (KERNEL, "resources/guest/build.sh"),
                          (INITRD, "resources/guest/mkinitramfs.sh"), (IMAGE, "resources/guest/mkrootimage.sh")):
        if not os.path.exists(path):
            sys.exit(f"bench-linux-density: {path} is missing ({builder}; scripts/bench-linux-density.sh builds all)")
    if args.report:
        with open(RESULTS) as f:
            saved = json.load(f)
        for key in ("mem", "hold", "hint_wait", "ksm_pages_to_scan", "ksm_sleep_ms", "counts", "load"):
            setattr(args, key, saved["args"][key])
        args.counts = sorted({row["n"] for row in saved["rows"]})
        sys.exit(1 if print_all(args, saved["image"], saved["rows"]) else 0)
    with open(IMAGE + ".json") as f:
        meta = json.load(f)
    os.makedirs(OUT, exist_ok=True)
    host_hash_kernel = benchlib.kernel_has_hash_param(KERNEL)
    ksm_unavailable = benchlib.ksm_problem() if "ksm" in args.modes else None
    saved_ksm = None
    if "ksm" in args.modes and not ksm_unavailable:
        saved_ksm = benchlib.ksm_settings()
        print(f"KSM settings before: {saved_ksm}")
    load_before = os.getloadavg()
    try:
        args.load = (load_before, load_before)
        rows = run_all(args, meta, host_hash_kernel, ksm_unavailable)
    finally:
        benchlib.ksm_restore(saved_ksm)
    args.load = (load_before, os.getloadavg())
    args.counts = sorted({row["n"] for row in rows})
    save(args, meta, rows)
    sys.exit(1 if print_all(args, meta, rows) else 0)


if __name__ == "__main__":
    main()

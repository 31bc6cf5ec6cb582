"""What the benchmarks in scripts/ share: where the binaries and guests are, running
`samepage density` and reading what samepage writes for scripts (the `density-result:` JSON
line, the `--samples` CSV), the guests' console files, host memory from smaps, KSM control and
the tables. The benchmarks import it as a plain module (scripts/ is their own directory).

Figures samepage measures are read from its JSON; a guest's console is read only for what
only the guest knows (whether its data was intact, its driver's counters, its clock)."""
import json
import os
import re
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMEPAGE = os.path.join(REPO, "target/release/samepage")
TEST_GUEST = os.path.join(REPO, "target/test-guest/test-guest.elf")
VMLINUX = os.path.join(REPO, "target/guest/vmlinux")
INITRD = os.path.join(REPO, "target/guest/initramfs.cpio")
OUT = os.path.join(REPO, "target/bench")
MIB = 1 << 20
PAGE = 4096
# Hosts whose KVM emulates guest kernel code (100-1000x slower than hardware virtualization).
EMULATING = os.path.isdir("/sys/module/kvm_pvm")


# --- samepage's output ---------------------------------------------------------------------

RESULT_PREFIX = "density-result:"


def density_result(text):
    """The JSON object of the `density-result:` line samepage density prints, or None."""
    line = next((l for l in text.splitlines() if l.startswith(RESULT_PREFIX)), None)
    return json.loads(line[len(RESULT_PREFIX):]) if line is not None else None


def seconds(ms):
    """A time in ms from density-result in seconds; None for its -1 (no such time)."""
    return None if ms is None or ms < 0 else ms / 1000


def read_samples(path):
    """density's `--samples` CSV: (seconds, MiB saved, pages reported) rows."""
    rows = []
    try:
        with open(path) as f:
            next(f, None)
            for line in f:
                t, saved_mib, reported = line.strip().split(",")
                rows.append((float(t), float(saved_mib), int(reported)))
    except (OSError, ValueError):
        pass
    return rows


def run_density(cmd, logs, poll=None, every=0.25):
    """Runs a `samepage density` command line with its standard output and error in
    `logs`.out and `logs`.err, calling `poll(proc)` every `every` seconds while it runs (a
    density interrupted meanwhile is stopped: it stops its VMs and broker on SIGTERM).
    Returns (exit code, standard output, density-result or None)."""
    os.makedirs(os.path.dirname(logs), exist_ok=True)
    with open(logs + ".out", "w") as stdout, open(logs + ".err", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        try:
            while proc.poll() is None:
                if poll:
                    poll(proc)
                time.sleep(every)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    with open(logs + ".out") as f:
        out = f.read()
    return proc.returncode, out, density_result(out)


def failure_text(logs, out):
    """The end of a failed run's standard output and error."""
    with open(logs + ".err") as f:
        return (out[-1500:] + f.read()[-1500:]).strip()


# --- The guest kernel and the image ------------------------------------------------------

def kernel_has_hash_param(kernel):
    """Whether the guest kernel's fphash driver has the hash= parameter (protocol version 2):
    built in, its name `fphash.hash` is a string in the image (after any byte that cannot be
    part of a longer name: the linker packs strings next to pointers)."""
    try:
        with open(kernel, "rb") as f:
            return re.search(rb"(?<![A-Za-z0-9_.])fphash\.hash\0", f.read()) is not None
    except OSError:
        return False


def drop_page_cache(path):
    """Asks the kernel to drop `path`'s clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- Host CPU outside the guests -----------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_outside_guests(density_pid):
    """CPU seconds (user + system) of density's VMMs and broker, leaving out the guests' vCPU
    threads (`vcpuN`, whose CPU is the guests' own work) and density's own main thread (the
    benchmark's progress sampling, not the VMs'), plus ksmd's: what the host spends beside the
    guests. Threads that exited are not counted: compare two readings taken while the same
    processes run."""
    children = subprocess.run(["pgrep", "-P", str(density_pid)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in [str(density_pid)] + children:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if tid == str(density_pid):
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().startswith("vcpu"):
                        continue
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total + ksmd_cpu_seconds()


def steady_cpu_per_minute(readings, start_s, end_s):
    """CPU seconds a minute between `start_s` and `end_s` (seconds into the run) from
    (seconds, cpu_outside_guests) readings, or None when the window holds too few of them."""
    inside = [(t, c) for t, c in readings if start_s <= t <= end_s]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 2.0:
        return None
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    return max(0.0, c1 - c0) / (t1 - t0) * 60.0


# --- The guests' consoles ------------------------------------------------------------------

def read_console(directory, index):
    """VM `index`'s console in density's `--console-dir` ("" if it has none)."""
    try:
        with open(os.path.join(directory, f"vm{index}.log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# --- Host memory ---------------------------------------------------------------------------

def vmm_guest_ram_bytes(density_pid, mem_bytes):
    """Anonymous memory of the guest RAM mappings of density's VMM processes now: each one's
    anonymous mappings at least as large as guest RAM (with any neighbour the kernel merged
    into them). For --dedup off, whose guest RAM samepage's own figure misses when the kernel
    merged that mapping with a neighbour."""
    children = subprocess.run(["pgrep", "-P", str(density_pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in children:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                text = f.read()
        except OSError:
            continue
        inside = False
        for line in text.splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = len(fields) == 5 and end - start >= min(mem_bytes, 3 << 30)
            elif inside and fields and fields[0] == "Anonymous:":
                total += int(fields[1]) * 1024
    return total


def max_map_count():
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def host_tsc_khz():
    """The host's TSC rate as /proc/cpuinfo reports it (the guests' TSC runs at the same rate)."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next(l.split(":")[1] for l in f if l.startswith("cpu MHz"))
        return float(mhz) * 1000
    except (OSError, StopIteration, ValueError):
        return None


# --- KSM -----------------------------------------------------------------------------------

KSM = "/sys/kernel/mm/ksm"
KSM_TUNED = ("run", "pages_to_scan", "sleep_millisecs")
KSM_SHOWN = KSM_TUNED + ("max_page_sharing", "merge_across_nodes", "use_zero_pages", "smart_scan", "advisor_mode")


def ksm_read(knob):
    try:
        with open(os.path.join(KSM, knob)) as f:
            return f.read().strip()
    except OSError:
        return None


def ksm_write(knob, value):
    with open(os.path.join(KSM, knob), "w") as f:
        f.write(str(value))


def ksm_settings(knobs=KSM_SHOWN):
    return {k: v for k in knobs if (v := ksm_read(k)) is not None}


def ksmd_pid():
    pids = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout.split()
    return pids[0] if pids else None


def ksmd_cpu_seconds():
    pid = ksmd_pid()
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ksm_problem():
    """Why KSM cannot run here, or None."""
    if not os.path.isdir(KSM):
        return f"{KSM} is missing (a kernel without CONFIG_KSM)"
    if not os.access(os.path.join(KSM, "run"), os.W_OK):
        return f"cannot write {KSM}/run (run the benchmark as root)"
    if ksmd_pid() is None:
        return "no ksmd thread"
    return None


def ksm_start(pages_to_scan, sleep_ms):
    """Starts KSM with these settings; why it did not start, or None."""
    ksm_write("pages_to_scan", pages_to_scan)
    ksm_write("sleep_millisecs", sleep_ms)
    ksm_write("run", 1)
    if ksm_read("run") != "1":
        return f"{KSM}/run reads {ksm_read('run')} after writing 1"
    return None


def ksm_stop():
    ksm_write("run", 2)  # unmerge whatever is left, then stop
    ksm_write("run", 0)


def ksm_restore(saved):
    """Puts back the settings `ksm_settings()` read before the runs (nothing if None)."""
    if not saved:
        return
    ksm_write("run", 2)
    for knob in ("pages_to_scan", "sleep_millisecs", "run"):
        ksm_write(knob, saved[knob])
    print(f"KSM settings restored: {ksm_settings(KSM_TUNED)}")


# --- Tables --------------------------------------------------------------------------------

def print_table(table, full=lambda row: True):
    """Prints rows of strings (the header first) in columns two spaces apart, each as wide as
    its widest cell. A row for which `full(row)` is false (a note instead of figures) prints
    only its first three cells and leaves the widths alone."""
    measured = [row for row in table if full(row)]
    widths = [max(len(row[i]) for row in measured) for i in range(len(table[0]))]
    for row in table:
        cells = row if full(row) else row[:3]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def markdown(table):
    """The same rows as a Markdown table."""
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines) + "\n"


def load_line(load):
    """The load averages at the start and the end of the runs, `load` = (before, after)."""
    before, after = load
    return (f"  load average (1, 5, 15 min) {before[0]:.1f} {before[1]:.1f} {before[2]:.1f} at the start, "
            f"{after[0]:.1f} {after[1]:.1f} {after[2]:.1f} at the end: other work on the machine adds noise")

#!/usr/bin/env python3
"""What the guest RAM of running samepage VMs holds on the host, page by page: which pages are
shared (file-backed: the store, a disk image, the kernel file) and, of the private ones, what
they hold (zeros, one repeated byte, a page of a disk image or of the kernel file, the same bytes
as another private page, nothing else) by guest-physical region (the kernel's ELF segments,
the rest). "KSM-mergeable" counts the private pages beyond the first of each content: what
KSM could still merge that samepage did not (docs/bench-linux-density.md, "What KSM merges
that samepage does not").

Usage (as root, while the VMs hold their pages):
  scripts/guest-memory-census.py --kernel target/guest/vmlinux --image target/linux-density/root.img \\
      --initrd target/guest/initramfs.cpio PID...
PID: `samepage run` processes (for `samepage density`, its children), each one VM of --mem-mib.

Where a VM's RAM starts in its process is found from its mappings: the kernel file's text
segment mapped at guest-physical 16 MiB (the kernel held once, samepage's defaults), or else the
end of the store's reservation, which the VMM maps right before guest RAM. A diagnostic for
Linux guests of the project's kernel, not a stable interface.
"""

import argparse
import collections
import hashlib
import os
import struct
import sys

PAGE = 4096
MIB = 1 << 20
KERNEL_PHYS = 0x1000000  # where the project's vmlinux loads its first segment
KERNEL_TEXT_OFFSET = 0x200000  # that segment's offset in the file


def page_hashes(path):
    hashes = set()
    with open(path, "rb") as f:
        while True:
            b = f.read(PAGE)
            if len(b) < PAGE:
                return hashes
            hashes.add(hashlib.blake2b(b, digest_size=16).digest())


def load_segments(path):
    data = open(path, "rb").read()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phnum, = struct.unpack_from("<H", data, 0x38)
    segs = []
    for i in range(phnum):
        kind, _flags, _off, _va, pa, _fs, memsz, _al = struct.unpack_from("<IIQQQQQQ", data, phoff + i * 56)
        if kind == 1:
            segs.append((i, pa, memsz))
    return segs


def zero_page_pfn():
    """The host zero page's frame: a read of never-written anonymous memory maps it, and such
    guest pages hold no memory of their own (PFNs need root)."""
    import mmap
    m = mmap.mmap(-1, PAGE)
    _ = m[0]
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry, = struct.unpack("<Q", f.read(8))
    return entry & ((1 << 55) - 1)


def read_maps(pid):
    maps = []
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split()
        start, end = (int(x, 16) for x in parts[0].split("-"))
        maps.append((start, end, int(parts[2], 16), parts[5] if len(parts) > 5 else ""))
    return maps


def ram_base(maps, kernel):
    name = os.path.basename(kernel)
    at = [s - KERNEL_PHYS - (off - KERNEL_TEXT_OFFSET) for s, e, off, path in maps if path.endswith(name)]
    if at:
        return at[0]
    store = [e for s, e, off, path in maps if "samepage-store" in path and e - s >= 1 << 40]
    if store:
        return store[0]
    sys.exit(f"guest-memory-census: cannot find guest RAM in {maps and 'the process'}'s mappings")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--initrd")
    parser.add_argument("--mem-mib", type=int, default=256)
    parser.add_argument("pids", nargs="+", type=int)
    args = parser.parse_args()
    image = set().union(*(page_hashes(p) for p in args.image)) if args.image else set()
    kernel = page_hashes(args.kernel)
    initrd = page_hashes(args.initrd) if args.initrd else set()
    segments = load_segments(args.kernel)

    def region(gpa):
        for i, pa, size in segments:
            if pa <= gpa < pa + size:
                return f"kernel segment {i}"
        return "other"

    pages = args.mem_mib * MIB // PAGE
    zero_pfn = zero_page_pfn()
    private, uniform, seen, shared = {}, {}, collections.Counter(), collections.Counter()
    for vm, pid in enumerate(args.pids):
        maps = read_maps(pid)
        base = ram_base(maps, args.kernel)
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/mem", "rb") as mem:
            pagemap.seek(base // PAGE * 8)
            entries = struct.unpack(f"<{pages}Q", pagemap.read(pages * 8))
            for i, entry in enumerate(entries):
                if not entry >> 63:
                    continue  # not resident
                if zero_pfn and entry & ((1 << 55) - 1) == zero_pfn:
                    shared["the host's zero page"] += 1
                    continue
                host = base + i * PAGE
                if entry & (1 << 61):
                    path = next((p for s, e, _o, p in maps if s <= host < e), "")
                    shared[os.path.basename(path) or "anonymous shared"] += 1
                    continue
                mem.seek(host)
                b = mem.read(PAGE)
                h = hashlib.blake2b(b, digest_size=16).digest()
                private[(vm, i * PAGE)] = h
                seen[h] += 1
                if b.count(b[:1]) == PAGE:
                    uniform[h] = "zeros" if b[0] == 0 else f"all {b[0]:#04x}"

    def kind(h):
        if h in uniform:
            return uniform[h]
        if h in image:
            return "a disk image's page"
        if h in kernel:
            return "a kernel file page"
        if h in initrd:
            return "an initrd page"
        return "same as another private page" if seen[h] > 1 else "unique"

    n = len(args.pids)
    print(f"{n} VM(s), {args.mem_mib} MiB each")
    print("shared (file-backed) resident pages, MiB: "
          + ", ".join(f"{k} {v * PAGE / MIB:.1f}" for k, v in shared.most_common()))
    print(f"private pages: {len(private) * PAGE / MIB:.1f} MiB ({len(private) * PAGE / MIB / n:.1f} per VM)")
    by_kind, by_region = collections.Counter(), collections.defaultdict(collections.Counter)
    for (vm, gpa), h in private.items():
        by_kind[kind(h)] += 1
        by_region[region(gpa)][kind(h)] += 1
    for k, v in by_kind.most_common():
        print(f"  {k:30s} {v * PAGE / MIB:7.2f} MiB")
    print("by guest-physical region, MiB:")
    for r, counts in sorted(by_region.items()):
        print(f"  {r:18s} " + ", ".join(f"{k} {v * PAGE / MIB:.2f}" for k, v in counts.most_common()))
    mergeable = collections.Counter()
    for h, count in seen.items():
        if count > 1:
            mergeable[kind(h) if kind(h) != "same as another private page" else "other content"] += count - 1
    total = sum(mergeable.values())
    print(f"KSM-mergeable (private pages beyond the first of their content): {total * PAGE / MIB:.1f} MiB"
          + (" = " + ", ".join(f"{k} {v * PAGE / MIB:.2f}" for k, v in mergeable.most_common()) if total else ""))


if __name__ == "__main__":
    main()

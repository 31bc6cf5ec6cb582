#!/usr/bin/env python3
"""Builds the dedup benchmark's mixed workload: one disk image per VM, each a different but
overlapping set of real ELF binaries and shared libraries of this host (regular files under
/usr/lib, /usr/bin, /usr/libexec, /usr/sbin; not /usr/lib/debug, not kernel modules).

Every image holds a common base set (the same files in every image, COMMON of its size) plus
files drawn at random, per VM, from the rest of the pool, up to MIB MiB in all. Each file
starts at a 4 KiB-aligned offset and its last page is zero-filled, as a page cache holds it,
so one file gives the same guest pages in every VM that has it; the files' order is shuffled
per VM. Images are cached in target/bench/mixed-<parameters>/vm<N>.img: the pool and the base
set are fixed when that directory is first made, and image N depends only on them, the seed
and N, so a larger --vms adds images without changing the first ones.

Prints one JSON line: {"dir", "images": [paths], "files": [count per image]}.
"""
import argparse
import hashlib
import json
import os
import random
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from benchlib import OUT, PAGE  # noqa: E402

DEFAULT_DIRS = ("/usr/lib", "/usr/bin", "/usr/libexec", "/usr/sbin")
SKIP_UNDER = ("/usr/lib/debug",)
ELF_EXEC, ELF_DYN = 2, 3


def padded(size):
    return (size + PAGE - 1) // PAGE * PAGE


def is_program_or_library(path):
    """An ELF executable or shared object (not a relocatable object such as a kernel module)."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError:
        return False
    return len(head) == 18 and head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") in (ELF_EXEC, ELF_DYN)


def scan_pool(dirs, max_file_bytes):
    """(path, size) of every program and library under `dirs`, once per inode, sorted."""
    seen, pool = set(), []
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if os.path.join(root, d) not in SKIP_UNDER)
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not os.path.isfile(path) or os.path.islink(path) or (st.st_dev, st.st_ino) in seen:
                    continue
                if 0 < st.st_size <= max_file_bytes and is_program_or_library(path):
                    seen.add((st.st_dev, st.st_ino))
                    pool.append((path, st.st_size))
    return pool


def take_until(files, budget):
    """Files from `files`, in order, while their padded sizes fit in `budget` bytes."""
    chosen, total = [], 0
    for path, size in files:
        if total + padded(size) <= budget:
            chosen.append((path, size))
            total += padded(size)
    return chosen, total


def load_or_make_plan(directory, args):
    """The pool and the base set, fixed when the directory is first made."""
    plan_path = os.path.join(directory, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            return json.load(f)
    budget = args.mib << 20
    pool = scan_pool(args.dirs, min(args.max_file_mib << 20, budget // 4))
    if sum(padded(s) for _, s in pool) < budget * 2:
        sys.exit(f"bench-mixed-images: only {sum(s for _, s in pool) >> 20} MiB of programs and libraries "
                 f"under {', '.join(args.dirs)}; need at least {2 * args.mib} MiB")
    shuffled = list(pool)
    random.Random(f"{args.seed}-base").shuffle(shuffled)
    base, _ = take_until(shuffled, int(budget * args.common))
    in_base = {p for p, _ in base}
    plan = {"dirs": args.dirs, "mib": args.mib, "common": args.common, "seed": args.seed,
            "base": base, "rest": [(p, s) for p, s in pool if p not in in_base]}
    os.makedirs(directory, exist_ok=True)
    with open(plan_path + ".tmp", "w") as f:
        json.dump(plan, f)
    os.rename(plan_path + ".tmp", plan_path)
    return plan


def build_image(path, plan, index, seed, mib):
    """Writes image `index` (base set plus its own draw, shuffled); returns its file count."""
    rng = random.Random(f"{seed}-vm{index}")
    rest = [tuple(f) for f in plan["rest"]]
    rng.shuffle(rest)
    base = [tuple(f) for f in plan["base"]]
    base_bytes = sum(padded(s) for _, s in base)
    own, _ = take_until(rest, (mib << 20) - base_bytes)
    files = base + own
    rng.shuffle(files)
    layout, offset = [], 0
    with open(path + ".tmp", "wb") as out:
        for file_path, _ in files:
            try:
                with open(file_path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # gone since the pool was scanned: the image is just smaller
            out.write(data + b"\0" * (padded(len(data)) - len(data)))
            layout.append({"path": file_path, "offset": offset, "size": len(data)})
            offset += padded(len(data))
    with open(path + ".json", "w") as f:
        json.dump({"bytes": offset, "files": layout}, f)
    os.rename(path + ".tmp", path)
    return len(layout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, required=True, help="images to have: vm0 .. vm<VMS-1>")
    parser.add_argument("--mib", type=int, default=150, help="file data per image, MiB")
    parser.add_argument("--common", type=float, default=0.5, help="fraction of each image every image shares")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dirs", default=",".join(DEFAULT_DIRS), help="comma-separated directories to draw from")
    parser.add_argument("--max-file-mib", type=int, default=32, help="largest file taken (also at most MIB/4)")
    args = parser.parse_args()
    if args.vms < 1 or args.mib < 1 or not 0.0 <= args.common <= 1.0:
        sys.exit("bench-mixed-images: --vms and --mib must be at least 1, --common within 0..1")
    args.dirs = [d for d in args.dirs.split(",") if d]
    key = f"mixed-{args.mib}M-c{round(args.common * 100)}-s{args.seed}"
    if tuple(args.dirs) != DEFAULT_DIRS:
        key += "-" + hashlib.sha256(",".join(args.dirs).encode()).hexdigest()[:8]
    directory = os.path.join(OUT, key)
    plan = load_or_make_plan(directory, args)
    images, counts = [], []
    for index in range(args.vms):
        path = os.path.join(directory, f"vm{index}.img")
        if os.path.exists(path) and os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                counts.append(len(json.load(f)["files"]))
        else:
            print(f"bench-mixed-images: building {path}", file=sys.stderr, flush=True)
            counts.append(build_image(path, plan, index, args.seed, args.mib))
        images.append(path)
    print(json.dumps({"dir": directory, "images": images, "files": counts}))


if __name__ == "__main__":
    main()

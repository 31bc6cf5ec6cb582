#!/usr/bin/env bash
# Builds what the Linux clone benchmark needs and runs it:
#   scripts/bench-linux-clones.sh [--n 4,8] [--hold 30] ...
# (scripts/bench-linux-clones.py --help lists every option; docs/snapshot.md, "Benchmark",
# says what it measures and what a run measured).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --linux-bench
cargo build --release --locked
resources/guest/build.sh        # the patched guest kernel (cached)
resources/guest/mkinitramfs.sh  # its initramfs, whose /init runs the workload from the image
resources/guest/mkrootimage.sh  # the read-only root image of Debian files (cached)
exec /usr/bin/python3 scripts/bench-linux-clones.py "$@"

#!/usr/bin/env bash
# Builds what the Linux density benchmark needs and runs it (as root: it tunes and restores
# KSM for the ksm mode):
#   scripts/bench-linux-density.sh [--modes off,sharing,hinted-guest] [--n 2,4] [--hold 30] ...
# (scripts/bench-linux-density.py --help lists every option and mode; docs/bench-linux-density.md
# says what they mean and what a run measured).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --linux-bench
cargo build --release --locked
resources/guest/build.sh        # the patched guest kernel (cached; ~4-5 min on 2 cores otherwise)
resources/guest/mkinitramfs.sh  # its initramfs, whose /init runs the workload from the image
resources/guest/mkrootimage.sh  # the read-only root image of Debian files (cached)
exec /usr/bin/python3 scripts/bench-linux-density.py "$@"

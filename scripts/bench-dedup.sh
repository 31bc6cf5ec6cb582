#!/usr/bin/env bash
# Builds what the dedup benchmark needs and runs it (as root: it tunes and restores KSM):
#   scripts/bench-dedup.sh [--vms 1,4,16] [--mib 256] [--hold 60]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --bench
cargo build --release --locked
resources/test-guest/build.sh
exec /usr/bin/python3 scripts/bench-dedup.py "$@"

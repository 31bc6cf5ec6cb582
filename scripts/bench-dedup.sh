#!/usr/bin/env bash
# Builds what the dedup benchmark needs and runs it (as root: it tunes and restores KSM):
#   scripts/bench-dedup.sh [--quick] [--vms 4,16] [--workloads identical,mixed] [--hold 40,75] ...
# (scripts/bench-dedup.py --help lists every option).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --bench
cargo build --release --locked
resources/test-guest/build.sh
exec /usr/bin/python3 scripts/bench-dedup.py "$@"

#!/usr/bin/env bash
# Builds what the balloon benchmark needs and runs it (as root for the ksm mode: it tunes and
# restores KSM):
#   scripts/bench-balloon.sh [--quick] [--vms 4] [--modes off,merging,reporting,both,ksm] ...
# (scripts/bench-balloon.py --help lists every option). Not part of the test command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --bench
cargo build --release --locked
resources/test-guest/build.sh
exec /usr/bin/python3 scripts/bench-balloon.py "$@"

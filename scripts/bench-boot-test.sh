#!/usr/bin/env bash
# Builds what the boot-test benchmark needs and runs it: scripts/bench-boot-test.sh [--runs N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --bench
cargo build --release --locked
resources/guest/build.sh
exec /usr/bin/python3 scripts/bench-boot-test.py "$@"

#!/usr/bin/env bash
# Builds what the boot benchmark needs (release samepage, test guest, Linux guest, QEMU) and
# runs it: scripts/bench-boot.sh [--runs N] [--vcpus N] [--no-qemu]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-host.sh --bench
cargo build --release --locked
resources/test-guest/build.sh
resources/guest/build.sh
resources/guest/mkinitramfs.sh
exec /usr/bin/python3 scripts/bench-boot.py "$@"

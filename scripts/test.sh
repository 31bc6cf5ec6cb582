#!/usr/bin/env bash
# The README's test command: installs what the tests need, builds the guests, checks
# formatting and lints, and runs every test (unit tests and integration tests through the
# real binary on real KVM, with the test guest and the patched Linux guest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "host packages"
scripts/setup-host.sh

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "test guest (freestanding, resources/test-guest)"
resources/test-guest/build.sh

step "Linux guest kernel and initramfs (resources/guest)"
resources/guest/build-test-kernels.sh   # the guest kernel, then the boot-test tests' broken variant
resources/guest/mkinitramfs.sh

step "tests"
cargo build --workspace --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

step "fuzz targets, 10 s each from the seeds (fuzz/)"
scripts/fuzz.sh --smoke

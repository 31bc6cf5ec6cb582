#!/usr/bin/env bash
# Longer runs of the stress tests that the README's test command runs at a size CI affords:
# host memory compaction while merged pages are held (engine and real binary), the VMA-count
# attack by a guest until the VMA budget is spent, one image on two disks read alternately past
# the VMA budget, a broker client of another domain storing and releasing pages (10 s x FACTOR:
# 11 gives the 110 s that used to stall the broker past a VMM's patience), and the CLI fuzz test
# with more seeds.
# Needs root (it writes /proc/sys/vm/compact_memory), like the test command.
#
# Usage: scripts/stress.sh [FACTOR]   (default 4: each compaction run 4x longer and 4x more
#                                      attempts; the VMA attack and the alternate reads to
#                                      the budget; 4 fuzz seeds)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
factor="${1:-4}"
resources/test-guest/build.sh
cargo build --workspace --locked
export SAMEPAGE_STRESS="$factor"
# The integration tests are one binary (tests/integration/), a module per subject: a test's
# name there is `module::test`.
cargo nextest run --workspace --locked --no-fail-fast --no-capture \
  -E '(binary(integration) & test(/^compaction::/)) | test(compacts_memory) | test(vma_attack) | test(drive_the_process) | test(read_alternately) | test(churning_client)'
for seed in $(seq 1 "$factor"); do
  SAMEPAGE_FUZZ_SEED="$seed" cargo nextest run --workspace --locked --no-capture \
    -E 'binary(integration) & test(/^cli_fuzz::/)'
done

#!/usr/bin/env bash
# The README's main-job command: the density demo on a built-in default. Builds samepage and
# the test guest, makes a 64 MiB file image, and runs 4 test guests that each read it into
# their page cache and report its pages through fphash. The image is read-only, so their reads
# map its one copy in the host's page cache (docs/fphash.md, "Read-only images"); with
# `,ro,share=off` they copy it and the host merges the reported pages instead. The run ends
# with how much host memory that saved.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-host.sh
cargo build --release --locked
resources/test-guest/build.sh

work=target/quickstart
mkdir -p "$work"
image="$work/files.img"
[[ -f "$image" ]] || head -c $((64 << 20)) /dev/urandom >"$image"
echo "quickstart: 4 VMs, each reading the same 64 MiB image ($image) into its page cache"
target/release/samepage density --vms 4 --kernel target/test-guest/test-guest.elf \
  --disk "$image,ro" --cmdline "testguest.mode=fphash" --console-dir "$work/consoles" \
  --progress-every 0.5 --timeout 120
echo "quickstart: guest consoles are in $work/consoles/"

#!/usr/bin/env bash
# The README's quick start: the density demo with the defaults a user gets. Builds samepage and
# the test guest, makes a 64 MiB file image and a copy of it for each of 4 VMs (as an
# orchestrator hands each VM its own image), and runs 4 test guests that each read their copy
# into their page cache and report its pages through fphash. The disks are read-only (`,ro`,
# nothing else): reads map each copy's page cache, and the reports merge the pages by content
# into one store (docs/fphash.md, "Read-only images"), so 4 copies end up as one on the host.
# The run ends with what image sharing and merging saved.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-host.sh
cargo build --release --locked
resources/test-guest/build.sh

work=target/quickstart
mkdir -p "$work"
base="$work/base.img"
[[ -f "$base" ]] || head -c $((64 << 20)) /dev/urandom >"$base"
for vm in 0 1 2 3; do
  [[ -f "$work/vm$vm.img" ]] || cp "$base" "$work/vm$vm.img"
done
echo "quickstart: 4 VMs, each reading its own copy of one 64 MiB image ($work/vm{0..3}.img)"
target/release/samepage density --vms 4 --kernel target/test-guest/test-guest.elf \
  --disk "$work/vm{vm}.img,ro" --cmdline "testguest.mode=fphash" --console-dir "$work/consoles" \
  --progress-every 0.5 --timeout 120
echo "quickstart: guest consoles are in $work/consoles/"

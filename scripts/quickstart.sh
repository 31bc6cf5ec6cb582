#!/usr/bin/env bash
# The README's main-job command: builds samepage and the test guest, makes a disk image, and
# boots the test guest on it; the guest prints the disk's BLAKE3, which is compared with the
# host's b3sum of the same image.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-host.sh
cargo build --release --locked
resources/test-guest/build.sh

work=target/quickstart
mkdir -p "$work"
image="$work/base.img"
[[ -f "$image" ]] || head -c $((64 << 20)) /dev/urandom >"$image"
echo "host:  b3sum of $image = $(b3sum --no-names "$image")"
echo "guest: booting the test guest with $image as a read-only virtio-blk disk"
target/release/samepage run --kernel target/test-guest/test-guest.elf --disk "$image,ro" \
  --cmdline "testguest.mode=disks" --timeout 60

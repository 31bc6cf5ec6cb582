#!/usr/bin/env bash
# Builds the freestanding test guest into <repo>/target/test-guest/test-guest.elf.
#
# Only the host target (x86_64-unknown-linux-gnu) is installed, so the guest is built for it as a
# static, non-PIE executable without libc or start files, laid out by our own linker script.
# `--target` is given explicitly so that these RUSTFLAGS apply to the guest only, not to build
# scripts of dependencies.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/target/test-guest"
target=x86_64-unknown-linux-gnu

export CARGO_TARGET_DIR="$out/build"
export RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static \
 -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-Wl,--build-id=none \
 -C link-arg=-Wl,-z,noexecstack -C link-arg=-T$here/link.ld"

cargo build --manifest-path "$here/Cargo.toml" --release --target "$target" "$@"
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/$target/release/test-guest" "$out/test-guest.elf"
echo "built $out/test-guest.elf"

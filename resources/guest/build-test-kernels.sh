#!/usr/bin/env bash
# Build the kernels the boot-test tests boot (tests/integration/boot_test.rs):
#   target/guest/vmlinux         the project's guest (build.sh; cached)
#   target/guest-broken/vmlinux  the same plus test-patches/0001-samepage-selftest-deliberate-failure.patch:
#                                "samepage_selftest=warn|panic|oops" on the command line makes it
#                                fail on purpose; without it, it boots like the guest.
#   target/guest-kunit/vmlinux   the guest plus test-configs/kunit.config: KUnit's own
#                                self-tests and examples run at boot (kunit_fault oopses on
#                                purpose, inside KUnit's try-catch thread).
#   target/guest-net/vmlinux     the guest plus test-configs/net.config: sockets, IPv4,
#                                virtio-vsock and virtio-net, for the device tests.
# The variants are seeded from the main build, so after the main kernel only the files the
# test patch or options touch are compiled. Cached like build.sh.
#
# Usage: resources/guest/build-test-kernels.sh [-f|--force]   (-f is passed to both builds)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

say() { printf 'test-kernels: %s\n' "$*"; }

start=$SECONDS
say "1/4 guest kernel: target/guest/vmlinux"
"$here/build.sh" "$@"

say "2/4 broken kernel (deliberate failures on request): target/guest-broken/vmlinux"
SAMEPAGE_GUEST_OUT="$repo/target/guest-broken" \
  SAMEPAGE_GUEST_EXTRA_PATCHES="$here/test-patches/0001-samepage-selftest-deliberate-failure.patch" \
  "$here/build.sh" "$@"

say "3/4 KUnit kernel (KUnit self-tests at boot): target/guest-kunit/vmlinux"
SAMEPAGE_GUEST_OUT="$repo/target/guest-kunit" \
  SAMEPAGE_GUEST_EXTRA_CONFIG="$here/test-configs/kunit.config" \
  "$here/build.sh" "$@"

say "4/4 networking kernel (vsock, virtio-net): target/guest-net/vmlinux"
SAMEPAGE_GUEST_OUT="$repo/target/guest-net" \
  SAMEPAGE_GUEST_EXTRA_CONFIG="$here/test-configs/net.config" \
  "$here/build.sh" "$@"

say "done in $((SECONDS - start)) s"

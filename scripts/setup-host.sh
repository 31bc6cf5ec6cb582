#!/usr/bin/env bash
# Installs the Debian 12 packages samepage's builds, tests and benchmarks need (as root, on a
# fresh machine). Idempotent: installs only what is missing.
#   build:      build-essential flex bison bc libelf-dev cpio xz-utils patch (guest kernel)
#               linux-source-6.12 (the guest kernel's source), busybox-static (its initramfs)
#   tests:      b3sum (the host's view of a disk's BLAKE3), e2fsprogs, acl (setfacl: the
#               unprivileged tests grant a user access to /dev/kvm), curl (a real client of
#               the Firecracker API socket), iproute2 (`ip`: the network test's namespace
#               and tap)
#   benchmarks: qemu-system-x86 (the QEMU baseline), procps; --linux-bench: the Debian
#               packages whose files make the Linux density benchmark's root image
set -euo pipefail

packages=(build-essential flex bison bc libelf-dev cpio xz-utils patch linux-source-6.12
  busybox-static b3sum e2fsprogs acl procps curl iproute2)
[[ "${1:-}" == "--bench" ]] && packages+=(qemu-system-x86 python3-matplotlib)
[[ "${1:-}" == "--linux-bench" ]] && packages+=(python3-matplotlib coreutils libc6 python3.11-minimal
  libpython3.11-minimal libpython3.11-stdlib perl-base)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "setup-host: all Debian packages present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-host: error: missing Debian packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "setup-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup-host: done"

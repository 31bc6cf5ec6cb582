#!/usr/bin/env bash
# Build the samepage guest initramfs: an uncompressed newc cpio (emulated gunzip is slow)
# with Debian's static busybox, a few applet links, /dev/console and resources/guest/init.
#
# Output: <repo>/target/guest/initramfs.cpio. Cached: rebuilt only when the inputs change.
# Device nodes come from the kernel's usr/gen_init_cpio (no mknod, no root needed for it):
# taken from build.sh's tree when there, otherwise compiled from the Debian source tarball.
#
# Usage: resources/guest/mkinitramfs.sh [-f|--force]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${SAMEPAGE_GUEST_OUT:-$repo/target/guest}"
cpio="$out/initramfs.cpio"
busybox=/bin/busybox
tarball=/usr/src/linux-source-6.12.tar.xz
force=0
[[ "${1:-}" == "-f" || "${1:-}" == "--force" ]] && force=1

# Applets /init uses (plus a few handy ones for interactive debugging). Each link is a
# little kernel work at unpack time, so this is not `busybox --install`.
applets=(sh mount dd reboot sleep umount cat echo printf nproc poweroff ls mkdir grep
  sed head tail wc uname dmesg sync true false test env sha256sum date)

say() { printf 'guest-initramfs: %s\n' "$*"; }
die() { printf 'guest-initramfs: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=install-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-packages.sh"

# --- Debian packages --------------------------------------------------------------------
missing=()
[[ -x "$busybox" ]] || missing+=(busybox-static)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
if ((${#missing[@]})); then
  install_packages "${missing[@]}"
fi
[[ -x "$busybox" ]] || die "missing $busybox (apt-get install busybox-static)"
file_out="$(LC_ALL=C od -An -c -N4 "$busybox" | tr -d ' ')"
[[ "$file_out" == '177ELF' ]] || die "$busybox is not an ELF binary"
if command -v ldd >/dev/null && ldd "$busybox" 2>&1 | grep -q '=>'; then
  die "$busybox is dynamically linked: install busybox-static, not busybox"
fi

# --- Cache ------------------------------------------------------------------------------
bb_version="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum <"$busybox")"
key="$( { echo "busybox $bb_version ${applets[*]}"; cat "$here/init" "${BASH_SOURCE[0]}"; } \
  | sha256sum | cut -d' ' -f1)"
mkdir -p "$out"
if ((!force)) && [[ -f "$cpio" && "$(cat "$cpio.stamp" 2>/dev/null)" == "$key" ]]; then
  say "cached (inputs unchanged): $cpio"
  exit 0
fi

# --- gen_init_cpio ----------------------------------------------------------------------
gen="$out/linux-build/usr/gen_init_cpio"
if [[ ! -x "$gen" ]]; then
  gen="$out/gen_init_cpio"
  if [[ ! -x "$gen" ]]; then
    csrc="$out/linux-src/usr/gen_init_cpio.c"
    if [[ ! -f "$csrc" ]]; then
      [[ -r "$tarball" ]] || die "no kernel tree and no $tarball: run build.sh first"
      say "extracting usr/gen_init_cpio.c from $tarball"
      mkdir -p "$out/gen_init_cpio.tmp"
      tar -xf "$tarball" -C "$out/gen_init_cpio.tmp" linux-source-6.12/usr/gen_init_cpio.c
      csrc="$out/gen_init_cpio.tmp/linux-source-6.12/usr/gen_init_cpio.c"
    fi
    say "compiling gen_init_cpio"
    gcc -O2 -o "$gen" "$csrc" || die "cannot compile $csrc"
    rm -rf "$out/gen_init_cpio.tmp"
  fi
fi

# --- File list (gen_init_cpio format, see usr/gen_init_cpio.c) --------------------------
# /init mounts these with a single `mount -a`.
fstab="$out/initramfs.fstab"
printf '%s\n' "proc /proc proc defaults 0 0" "sysfs /sys sysfs defaults 0 0" \
  "devtmpfs /dev devtmpfs defaults 0 0" >"$fstab"

list="$out/initramfs.list"
{
  echo "dir /dev 0755 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  echo "dir /proc 0755 0 0"
  echo "dir /sys 0755 0 0"
  echo "dir /tmp 01777 0 0"
  echo "dir /mnt 0755 0 0"
  echo "dir /root 0700 0 0"
  echo "dir /bin 0755 0 0"
  echo "dir /sbin 0755 0 0"
  echo "dir /etc 0755 0 0"
  echo "file /etc/fstab $fstab 0644 0 0"
  echo "file /bin/busybox $busybox 0755 0 0"
  for a in "${applets[@]}"; do
    echo "slink /bin/$a busybox 0777 0 0"
  done
  echo "file /init $here/init 0755 0 0"
} >"$list"

say "writing $cpio"
"$gen" -t 0 "$list" >"$cpio.tmp" || die "gen_init_cpio failed"
mv "$cpio.tmp" "$cpio"
echo "$key" >"$cpio.stamp"
say "outputs:"
say "  $cpio ($(stat -c %s "$cpio") bytes)"

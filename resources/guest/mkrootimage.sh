#!/usr/bin/env bash
# Build the read-only ext4 root image of the Linux density benchmark
# (scripts/bench-linux-density.sh): real files of Debian packages installed on this host
# (static busybox, coreutils, the C library, Python 3.11 with its standard library and
# byte-compiled modules, perl), every shared library their programs need, and the workload
# in rootimage/ (start.sh, run from the guest's initramfs, and workload.sh, run chrooted
# into the image).
#
# Outputs (cached: rebuilt only when the packages' versions or these scripts change):
#   target/linux-density/root.img        the ext4 image (4 KiB blocks)
#   target/linux-density/root.img.json   what it holds: files, bytes, 4 KiB pages, packages,
#                                        the SHA-256 of all file data in files.list order
#
# Usage: resources/guest/mkrootimage.sh [-f|--force]
# Env:   SAMEPAGE_ROOTIMAGE_PACKAGES="pkg ..." replaces the package list below;
#        SAMEPAGE_ROOTIMAGE_MIN_MIB (default 64): the least file data the image must hold.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/target/linux-density"
image="$out/root.img"
stage="$out/root"
min_mib="${SAMEPAGE_ROOTIMAGE_MIN_MIB:-64}"
force=0
[[ "${1:-}" == "-f" || "${1:-}" == "--force" ]] && force=1

# Programs the workload executes, their libraries and data: about 70 MiB of file data.
packages=(busybox-static coreutils libc6 python3.11-minimal libpython3.11-minimal
  libpython3.11-stdlib perl-base)
if [[ -n "${SAMEPAGE_ROOTIMAGE_PACKAGES:-}" ]]; then
  read -r -a packages <<<"$SAMEPAGE_ROOTIMAGE_PACKAGES"
fi

say() { printf 'rootimage: %s\n' "$*"; }
die() { printf 'rootimage: error: %s\n' "$*" >&2; exit 1; }

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) || die "missing Debian packages: ${missing[*]} (scripts/setup-host.sh --linux-bench installs them)"
for t in mkfs.ext4 ldd sha256sum; do
  command -v "$t" >/dev/null || die "missing tool: $t (scripts/setup-host.sh installs it)"
done

# --- Cache ------------------------------------------------------------------------------
versions="$(dpkg-query -W -f='${Package} ${Version}\n' "${packages[@]}")"
key="$( { echo "$versions $min_mib"; cat "${BASH_SOURCE[0]}" "$here"/rootimage/*; } | sha256sum | cut -d' ' -f1)"
mkdir -p "$out"
if ((!force)) && [[ -f "$image" && -f "$image.json" && "$(cat "$image.stamp" 2>/dev/null)" == "$key" ]]; then
  say "cached (inputs unchanged): $image"
  exit 0
fi
rm -f "$image.stamp"

# --- File list --------------------------------------------------------------------------
# Every regular file and symlink the packages installed (no documentation), the byte-compiled
# module next to each Python source (Debian compiles them at install time, so they are not in
# the package lists), and for each ELF file the libraries ldd resolves and its interpreter.
skip='^/usr/share/(doc|man|info|locale|lintian|bug)/'
declare -A want=()
add() {
  local f="$1"
  [[ -n "${want[$f]:-}" ]] && return
  want[$f]=1
  if [[ -L "$f" ]]; then
    add "$(readlink -f "$f")"
  fi
}
for p in "${packages[@]}"; do
  while IFS= read -r f; do
    [[ "$f" =~ $skip ]] && continue
    [[ -L "$f" || -f "$f" ]] || continue
    add "$f"
    if [[ "$f" == *.py ]]; then
      pyc="$(dirname "$f")/__pycache__/$(basename "$f" .py).cpython-311.pyc"
      [[ -f "$pyc" ]] && add "$pyc"
    fi
  done < <(dpkg -L "$p")
done
for f in "${!want[@]}"; do
  [[ -f "$f" && ! -L "$f" ]] || continue
  [[ "$(LC_ALL=C od -An -c -N4 "$f" | tr -d ' ')" == '177ELF' ]] || continue
  while read -r lib; do
    add "$lib"
  done < <(ldd "$f" 2>/dev/null | sed -n -e 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p')
done

# --- Staging tree -----------------------------------------------------------------------
# Each file lands at its canonical directory (this host merges /bin, /lib, /lib64 and /sbin
# into /usr; so does the image, with the same top-level links).
say "staging ${#want[@]} files and links from: ${packages[*]}"
rm -rf "$stage"
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,mnt,density}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$stage/$d"; done
for f in "${!want[@]}"; do
  [[ -d "$f" && ! -L "$f" ]] && continue  # a link's target directory: the link is enough
  dir="$(readlink -f "$(dirname "$f")")"
  mkdir -p "$stage$dir"
  cp -P --preserve=mode,timestamps "$f" "$stage$dir/"
done
# The workload's shell: busybox (busybox-static's /bin/busybox).
[[ -x "$stage/usr/bin/busybox" ]] || die "no busybox in the image (package busybox-static)"
ln -sf busybox "$stage/usr/bin/sh"
cp "$here/rootimage/start.sh" "$here/rootimage/workload.sh" "$here/rootimage/imports.py" "$stage/density/"

# files.list: every regular file of the image outside /density, NUL-separated, sorted; the
# workload prints the SHA-256 of `sha256sum` of each file in this order, which the host
# computes here too (paths as the chrooted guest sees them).
(cd "$stage" && find . -path ./density -prune -o -type f -print0 | sed -z 's|^\.||' | LC_ALL=C sort -z) \
  >"$stage/density/files.list"
# hash-files.sh: the guest's `sha256sum` of every file, in files.list order, a few hundred
# names per command line; busybox's `xargs -0` (1.35) garbles names that straddle its read
# buffer, so the guest runs this instead.
if tr '\0' '\n' <"$stage/density/files.list" | grep -q "'"; then
  die "a file name holds a single quote: $(tr '\0' '\n' <"$stage/density/files.list" | grep "'" | head -1)"
fi
tr '\0' '\n' <"$stage/density/files.list" | sed "s/.*/'&'/" | xargs -d '\n' -s 30000 echo sha256sum \
  >"$stage/density/hash-files.sh"
read -r files bytes pages < <(cd "$stage" && xargs -0 -a density/files.list -I{} stat -c %s ".{}" \
  | awk '{ n++; b += $1; p += int(($1 + 4095) / 4096) } END { print n, b, p }')
digest="$(cd "$stage" && sed -z 's|^|.|' density/files.list | xargs -0 sha256sum | sed 's|^\([0-9a-f]*\)  \./|\1  /|' \
  | sha256sum | cut -d' ' -f1)"
mib=$((bytes >> 20))
((mib >= min_mib)) || die "only $mib MiB of file data (at least $min_mib MiB wanted): add packages"

# --- ext4 image -------------------------------------------------------------------------
# Room for metadata and a little slack; 4 KiB blocks keep every file page at a 4 KiB-aligned
# image offset, so the VMM can map it (docs/fphash.md, "Read-only images").
size_mib=$((mib + mib / 4 + 16))
say "writing $image: $files files, $mib MiB of file data, ${size_mib} MiB image"
rm -f "$image.tmp"
mkfs.ext4 -q -F -b 4096 -L samepage-root -E root_owner=0:0 -d "$stage" "$image.tmp" "${size_mib}M" \
  || die "mkfs.ext4 failed"
mv "$image.tmp" "$image"
pkg_json="$(printf '%s\n' "$versions" | awk 'BEGIN { ORS = "" } { printf "%s\"%s\": \"%s\"", (NR > 1 ? ", " : ""), $1, $2 }')"
printf '{"files": %d, "file_bytes": %d, "file_pages": %d, "data_sha256": "%s", "image_bytes": %d, "packages": {%s}}\n' \
  "$files" "$bytes" "$pages" "$digest" "$(stat -c %s "$image")" "$pkg_json" >"$image.json"
echo "$key" >"$image.stamp"
say "outputs:"
say "  $image"
say "  $image.json: $(cat "$image.json")"

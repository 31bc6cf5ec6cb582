#!/usr/bin/env bash
# Build the samepage guest kernel: Linux 6.12 from Debian's linux-source-6.12, with the
# patch series in patches/ and the config fragment samepage.config on top of tinyconfig.
#
# Output: <repo>/target/guest/vmlinux (ELF with the PVH entry note). Work files live in
# <repo>/target/guest/ only: linux-src/ (unpacked, patched tree), linux-build/ (objects,
# make O=...), build.log. Cached: nothing is done when the inputs have not changed.
#
# Usage: resources/guest/build.sh [-f|--force]
# Env:   JOBS (default: nproc), SAMEPAGE_GUEST_OUT (default: <repo>/target/guest),
#        SAMEPAGE_GUEST_EXTRA_PATCHES="a.patch b.patch": a variant (test kernels only) with
#        these patches applied after the series; SAMEPAGE_GUEST_EXTRA_CONFIG="a.config": a
#        variant with these config fragments merged after samepage.config. A variant needs
#        its own SAMEPAGE_GUEST_OUT. When the main build in <repo>/target/guest is current,
#        the variant's tree and objects are seeded from it (hard-linked tree, copied
#        objects), so only what the extra patches or options touch is recompiled.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${SAMEPAGE_GUEST_OUT:-$repo/target/guest}"
src="$out/linux-src"
obj="$out/linux-build"
log="$out/build.log"
pkg=linux-source-6.12
tarball=/usr/src/linux-source-6.12.tar.xz
force=0
[[ "${1:-}" == "-f" || "${1:-}" == "--force" ]] && force=1

say() { printf 'guest-kernel: %s\n' "$*"; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=install-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-packages.sh"

# --- 1. Debian build dependencies -------------------------------------------------------
# Package -> a file that proves it is installed (dpkg -s is slow and fails in chroots
# without a dpkg database, a file test is neither).
deps=(
  "build-essential:/usr/bin/gcc"
  "build-essential:/usr/bin/make"
  "flex:/usr/bin/flex"
  "bison:/usr/bin/bison"
  "bc:/usr/bin/bc"
  "libelf-dev:/usr/include/gelf.h"
  "cpio:/usr/bin/cpio"
  "xz-utils:/usr/bin/xz"
  "patch:/usr/bin/patch"
  "$pkg:$tarball"
  "busybox-static:/bin/busybox"   # for mkinitramfs.sh: one install step for the guest side
)
missing=()
for d in "${deps[@]}"; do
  [[ -e "${d#*:}" ]] || missing+=("${d%%:*}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  install_packages "${missing[@]}"
fi
for t in gcc make flex bison bc tar xz patch cmp sha256sum; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
[[ -r "$tarball" ]] || die "missing $tarball (apt-get install $pkg)"

# --- 2. Cache key -----------------------------------------------------------------------
pkg_version="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || stat -c %s-%Y "$tarball")"
series="$here/patches/series"
patches=()
if [[ -f "$series" ]]; then
  while read -r p _; do
    [[ -z "$p" || "$p" == \#* ]] && continue
    [[ -f "$here/patches/$p" ]] || die "patches/series names a missing patch: $p"
    patches+=("$here/patches/$p")
  done <"$series"
fi
series_key="$( { echo "$pkg $pkg_version"; cat "$series" 2>/dev/null; for p in "${patches[@]}"; do cat "$p"; done; } \
  | sha256sum | cut -d' ' -f1)"
build_key_of() { { echo "$1"; cat "$here/../kconfig/required.config" "$here/samepage.config" "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1; }

# Extra patches (variants for tests): applied after the series, part of the tree's key.
main_out="$repo/target/guest"
extra=()
for p in ${SAMEPAGE_GUEST_EXTRA_PATCHES:-}; do
  [[ -f "$p" ]] || die "SAMEPAGE_GUEST_EXTRA_PATCHES names a missing patch: $p"
  extra+=("$(cd "$(dirname "$p")" && pwd)/$(basename "$p")")
done
# Extra config fragments (variants for tests): merged after samepage.config, part of the
# build's key only (the tree is the same).
extra_config=()
for c in ${SAMEPAGE_GUEST_EXTRA_CONFIG:-}; do
  [[ -f "$c" ]] || die "SAMEPAGE_GUEST_EXTRA_CONFIG names a missing fragment: $c"
  extra_config+=("$(cd "$(dirname "$c")" && pwd)/$(basename "$c")")
done
variant=$(( ${#extra[@]} + ${#extra_config[@]} ))
tree_key="$series_key"
if ((variant)); then
  mkdir -p "$out"
  out="$(cd "$out" && pwd)" src="$out/linux-src" obj="$out/linux-build" log="$out/build.log"
  [[ "$out" != "$main_out" ]] || die "a variant (extra patches or config) needs its own SAMEPAGE_GUEST_OUT, not $main_out"
fi
if ((${#extra[@]})); then
  tree_key="$( { echo "$series_key"; for p in "${extra[@]}"; do basename "$p"; cat "$p"; done; } | sha256sum | cut -d' ' -f1)"
fi
build_key="$(build_key_of "$tree_key")"
if ((${#extra_config[@]})); then
  build_key="$( { echo "$build_key"; for c in "${extra_config[@]}"; do basename "$c"; cat "$c"; done; } | sha256sum | cut -d' ' -f1)"
fi

mkdir -p "$out"
if ((!force)) && [[ -f "$out/vmlinux" && "$(cat "$out/.vmlinux.stamp" 2>/dev/null)" == "$build_key" ]]; then
  say "cached (inputs unchanged): $out/vmlinux"
  exit 0
fi

# Names a patch in progress lines: patches/NNNN-x.patch, or its path in the repo.
patch_name() { case "$1" in "$here/patches/"*) echo "patches/$(basename "$1")" ;; *) echo "${1#"$repo/"}" ;; esac; }
# Applies patch $1 to tree $2 and appends the files it touches to new_files. GNU patch writes
# each file it changes anew and renames it into place, so a hard-linked tree stays safe.
apply_patch() {
  say "applying $(patch_name "$1")"
  patch -p1 -d "$2" --forward --batch --quiet <"$1" || die "patch does not apply: $(patch_name "$1")"
  mapfile -t -O "${#new_files[@]}" new_files < <(sed -n 's#^+++ b/\([^[:space:]]*\).*#\1#p' "$1")
}

# --- 3a. Variant: seed tree and objects from the main build ------------------------------
# A variant's tree is the main tree plus the extra patches: hard-link the main tree (files
# are only ever replaced, never written in place, in either tree), copy the main objects with
# their timestamps, point the copied kbuild command files at the variant's paths (kbuild
# rebuilds an object whose command line changed), then patch: only the files the extra
# patches touch are newer than their objects.
if ((variant)) && [[ "$(cat "$src/.samepage-tree.stamp" 2>/dev/null)" != "$tree_key" || ! -d "$obj" ]]; then
  if [[ "$(cat "$main_out/linux-src/.samepage-tree.stamp" 2>/dev/null)" == "$series_key" \
     && "$(cat "$main_out/.vmlinux.stamp" 2>/dev/null)" == "$(build_key_of "$series_key")" \
     && -d "$main_out/linux-build" ]]; then
    say "seeding from the main build in $main_out (hard-linked tree, copied objects)"
    rm -rf "$src" "$obj"
    cp -al "$main_out/linux-src" "$src"
    cp -a "$main_out/linux-build" "$obj"
    from="$(printf '%s/' "$main_out" | sed 's/[][\\.*^$|]/\\&/g')"
    to="$(printf '%s/' "$out" | sed 's/[\\&|]/\\&/g')"
    grep -rlIZF -- "$main_out/" "$obj" | xargs -0 -r sed -i "s|$from|$to|g"
    ln -sfn "$src" "$obj/source"
    rm -f "$src/.samepage-patched-files" "$src/.samepage-tree.stamp"   # hard links: never write through
    new_files=()
    [[ -f "$main_out/linux-src/.samepage-patched-files" ]] && mapfile -t new_files <"$main_out/linux-src/.samepage-patched-files"
    for p in "${extra[@]}"; do apply_patch "$p" "$src"; done
    printf '%s\n' "${new_files[@]}" >"$src/.samepage-patched-files"
    echo "$tree_key" >"$src/.samepage-tree.stamp"
  else
    say "main build in $main_out is missing or not current: building the variant from scratch"
  fi
fi

# --- 3. Source tree: unpack and apply the series (only when the series changed) ---------
# A fresh tree is patched in a scratch directory. When a tree already exists, only the files
# whose content changed (those the old or the new series touch) are copied over it, so make
# rebuilds just what depends on them; a fresh unpack would carry the tarball's old mtimes
# and make would miss files that a dropped patch no longer touches.
if [[ "$(cat "$src/.samepage-tree.stamp" 2>/dev/null)" != "$tree_key" ]]; then
  old_files=()
  [[ -f "$src/.samepage-patched-files" ]] && mapfile -t old_files <"$src/.samepage-patched-files"
  scratch="$out/unpack.tmp"
  say "unpacking $tarball ($pkg $pkg_version)"
  rm -rf "$scratch"
  mkdir -p "$scratch"
  tar -xf "$tarball" -C "$scratch"
  fresh="$scratch/linux-source-6.12"
  new_files=()
  for p in "${patches[@]}" "${extra[@]}"; do apply_patch "$p" "$fresh"; done
  printf '%s\n' "${new_files[@]}" >"$fresh/.samepage-patched-files"
  echo "$tree_key" >"$fresh/.samepage-tree.stamp"
  echo "$pkg_version" >"$fresh/.samepage-pkg-version"
  if [[ -f "$src/.samepage-tree.stamp" && "$(cat "$src/.samepage-pkg-version" 2>/dev/null)" == "$pkg_version" ]]; then
    changed=0
    for f in $(printf '%s\n' "${old_files[@]}" "${new_files[@]}" | sort -u); do
      if [[ -e "$fresh/$f" ]]; then
        if ! cmp -s "$fresh/$f" "$src/$f"; then
          mkdir -p "$(dirname "$src/$f")"
          cp --remove-destination "$fresh/$f" "$src/$f"
          changed=$((changed + 1))
        fi
      elif [[ -e "$src/$f" ]]; then
        rm -f "$src/$f"
        changed=$((changed + 1))
      fi
    done
    cp --remove-destination "$fresh/.samepage-patched-files" "$fresh/.samepage-tree.stamp" "$src/"
    rm -rf "$scratch"
    say "source tree updated: $changed file(s) changed"
  else
    # New tree (or new Debian source): objects from another tree must not survive.
    rm -rf "$src" "$obj"
    mv "$fresh" "$src"
    rm -rf "$scratch"
  fi
else
  say "source tree up to date: $src"
fi

# --- 4. Configure: tinyconfig + required.config + samepage.config (+ extra) + olddefconfig --
mkdir -p "$obj"
mk=(make -C "$src" O="$obj" ARCH=x86_64 -j"${JOBS:-$(nproc)}")
fragments=("$here/../kconfig/required.config" "$here/samepage.config" "${extra_config[@]}")
say "configuring: tinyconfig + kconfig/required.config + samepage.config${extra_config[*]:+ + ${extra_config[*]#"$repo/"}}"
"${mk[@]}" -s tinyconfig >/dev/null
KCONFIG_CONFIG="$obj/.config" "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" \
  "$obj/.config" "${fragments[@]}" >"$out/merge_config.log" 2>&1 \
  || die "merge_config.sh failed (see $out/merge_config.log)"
"${mk[@]}" -s olddefconfig >/dev/null
# Warn about fragment lines that did not survive olddefconfig (a missing dependency).
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=n) sym="${line%%=*}"; grep -q "^$sym=" "$obj/.config" && say "warning: $sym is set, fragment wants n" ;;
    CONFIG_*=*) grep -qxF "$line" "$obj/.config" || say "warning: $line did not stick (missing dependency?)" ;;
  esac
done < <(cat "${fragments[@]}")

# --- 5. Build ---------------------------------------------------------------------------
say "building vmlinux with ${JOBS:-$(nproc)} jobs (log: $log)"
start=$SECONDS
if ! "${mk[@]}" vmlinux 2>&1 | tee "$log"; then
  die "kernel build failed (see $log)"
fi
cp "$obj/vmlinux" "$out/vmlinux"
cp "$obj/.config" "$out/vmlinux.config"
echo "$build_key" >"$out/.vmlinux.stamp"
say "built in $((SECONDS - start)) s"
say "outputs:"
say "  $out/vmlinux"
say "  $out/vmlinux.config"

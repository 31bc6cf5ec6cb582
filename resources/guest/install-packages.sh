# Sourced by the guest build scripts: install_packages PKG... installs the Debian packages
# given (as root, with apt-get), refreshing the package lists only if a first try fails.
# Expects the caller's say() and die().
install_packages() {
  (($#)) || return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "missing Debian packages: $* (install them: apt-get install $*)"
  fi
  say "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update >/dev/null
    apt-get install -y --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
  fi
}

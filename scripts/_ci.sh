# shellcheck shell=bash
# Sourced by scripts/check-image and scripts/check-systemd: the result lines, waiting,
# and Debian root filesystems made with debootstrap and cached between runs.
#
# The cache lives in $DISPATCHER_CI_CACHE (default /var/cache/dispatcher-ci). A root
# filesystem is kept under a name made from everything it is made of (suite, mirror,
# packages, the host's trust settings it copies, this file), so a change to any of them
# makes a new one and an unchanged one is reused. Delete the folder to start afresh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CI_CACHE="${DISPATCHER_CI_CACHE:-/var/cache/dispatcher-ci}"
CI_SUITE="${DISPATCHER_CI_SUITE:-bookworm}"
CI_MIRROR="${DISPATCHER_CI_MIRROR:-http://deb.debian.org/debian}"
CI_STARTED=$SECONDS
CI_PASSED=0
CI_FAILED=0

# The host's own settings for reaching the package registries (a CA bundle, pip's and
# apt's configuration), copied into every root filesystem: what the host can download,
# the containers can too.
CI_TRUST_FILES=(/etc/ssl/certs/ca-certificates.crt /etc/pip.conf)

ci_name() { basename "$0"; }

ci_skip() {
  echo "$(ci_name): skipped: $*"
  exit 0
}

ci_die() {
  echo "$(ci_name): error: $*" >&2
  exit 1
}

ci_ok() {
  CI_PASSED=$((CI_PASSED + 1))
  printf 'ok    %s\n' "$*"
}

ci_fail() {
  CI_FAILED=$((CI_FAILED + 1))
  printf 'FAIL  %s\n' "$*"
}

# ci_check WHAT COMMAND...: run COMMAND (a function that may print a detail on its
# last line of stdout); one line of result either way.
ci_check() {
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    ci_ok "$what${out:+: ${out##*$'\n'}}"
  else
    ci_fail "$what${out:+: ${out//$'\n'/ | }}"
  fi
}

ci_elapsed() {
  local s=$((SECONDS - CI_STARTED))
  printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# ci_summary [EXTRA]: the last line; exit status 1 when a check failed.
ci_summary() {
  local total=$((CI_PASSED + CI_FAILED))
  echo "$(ci_name): $CI_PASSED of $total checks passed in $(ci_elapsed)${1:+ ($1)}"
  [[ $CI_FAILED -eq 0 ]]
}

# ci_wait SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; 1 if it never does.
ci_wait() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [[ $SECONDS -lt $deadline ]] || return 1
    sleep 0.2
  done
}

ci_require_root() {
  [[ $(id -u) -eq 0 ]] || ci_skip "needs root (containers, debootstrap)"
}

# ci_apt_install PACKAGE...: install Debian packages that are missing (root, apt-get).
ci_apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$package")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || return 1
  echo "$(ci_name): installing ${missing[*]} (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/dev/null 2>&1
}

_ci_hash() { sha256sum | cut -c1-16; }

# ci_rootfs NAME PACKAGE...: a Debian root filesystem (debootstrap --variant=minbase)
# with these packages, built once and kept in the cache; prints its folder.
ci_rootfs() {
  local name="$1"
  shift
  local key
  key="$(
    {
      echo "$CI_SUITE $CI_MIRROR $*"
      cat "${BASH_SOURCE[0]}"
      for file in "${CI_TRUST_FILES[@]}"; do [[ -f $file ]] && cat "$file"; done
      cat /etc/apt/apt.conf.d/* 2>/dev/null || true
    } | _ci_hash
  )"
  local dir="$CI_CACHE/rootfs/$name-$key"
  mkdir -p "$CI_CACHE/rootfs"
  (
    flock 9
    if [[ ! -f $dir/.complete ]]; then
      rm -rf "$dir" "$dir.new"
      echo "$(ci_name): building the $name root filesystem (debootstrap $CI_SUITE; cached as $dir)" >&2
      local include
      include="$(IFS=,; echo "$*")"
      debootstrap --variant=minbase --include="$include" "$CI_SUITE" "$dir.new" "$CI_MIRROR" \
        >"$CI_CACHE/rootfs/$name.log" 2>&1 \
        || { tail -5 "$CI_CACHE/rootfs/$name.log" >&2; exit 1; }
      _ci_trust "$dir.new"
      rm -rf "$dir.new"/var/cache/apt/archives/*.deb "$dir.new"/var/lib/apt/lists/*
      touch "$dir.new/.complete"
      mv "$dir.new" "$dir"
      # Older root filesystems of this name are of no use any more.
      find "$CI_CACHE/rootfs" -maxdepth 1 -name "$name-*" ! -name "$name-$key" \
        -exec rm -rf {} + 2>/dev/null || true
    fi
  ) 9>"$CI_CACHE/rootfs/.$name.lock" || return 1
  echo "$dir"
}

_ci_trust() {
  local dir="$1" file
  for file in "${CI_TRUST_FILES[@]}"; do
    [[ -f $file ]] && install -D -m 0644 "$file" "$dir$file"
  done
  # The host's local apt settings (no package owns them: a mirror's quirks, say).
  for file in /etc/apt/apt.conf.d/*; do
    dpkg-query -S "$file" >/dev/null 2>&1 || install -m 0644 "$file" "$dir$file"
  done
}

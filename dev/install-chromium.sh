#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver packages when chromium or chromedriver
# is missing: the web page's browser test (tests/integration/web.rs) drives a headless
# Chromium through ChromeDriver. Idempotent; apt-get's output goes to a log file, shown
# only when it fails.
#
# Usage: dev/install-chromium.sh      (as root, or with sudo available, for apt-get)
# Exit status 0 when chromium and chromedriver are on PATH.
set -euo pipefail

prog=dev/install-chromium.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    note "chromium and chromedriver are installed ($(chromedriver --version 2>&1 | head -n 1))"
    exit 0
fi

sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null ||
        die "chromium/chromedriver missing and no root (or sudo) to apt-get install them"
    sudo=(sudo)
fi
log=$(mktemp -t orchgpu-apt-chromium.XXXXXX.log)
note "installing Debian's chromium and chromium-driver packages with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent or stale on a fresh machine.
if ! timeout 900 "${sudo[@]}" apt-get update -qq >"$log" 2>&1 ||
    ! timeout 900 "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get install chromium chromium-driver failed (full log: $log)"
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    die "chromium or chromedriver still missing after installing the packages"
fi
rm -f -- "$log"
note "installed $(chromedriver --version 2>&1 | head -n 1)"

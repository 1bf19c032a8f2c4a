#!/usr/bin/env bash
# Installs Debian's prometheus package when promtool or prometheus is missing: the
# alert-rule tests run promtool, and the integration harness starts a real Prometheus
# (tests/integration/alert_rules.rs). Idempotent; apt-get's output goes to a log file,
# shown only when it fails. On a host running systemd the package enables and starts its
# own prometheus.service (port 9090); this script stops and disables it again, since the
# tests start their own on a free port.
#
# Usage: dev/install-prometheus.sh      (as root, or with sudo available, for apt-get)
# Exit status 0 when promtool and prometheus are on PATH.
set -euo pipefail

prog=dev/install-prometheus.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    note "promtool and prometheus are installed ($(promtool --version 2>&1 | head -n 1))"
    exit 0
fi

sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null ||
        die "promtool/prometheus missing and no root (or sudo) to apt-get install prometheus"
    sudo=(sudo)
fi
log=$(mktemp -t orchgpu-apt-prometheus.XXXXXX.log)
note "installing Debian's prometheus package with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent or stale on a fresh machine.
if ! timeout 600 "${sudo[@]}" apt-get update -qq >"$log" 2>&1 ||
    ! timeout 600 "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus \
        >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get install prometheus failed (full log: $log)"
fi
if [[ -d /run/systemd/system ]] && systemctl is-enabled --quiet prometheus 2>/dev/null; then
    "${sudo[@]}" systemctl disable --now --quiet prometheus >>"$log" 2>&1 ||
        note "could not stop the prometheus service the package started"
fi
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    die "promtool or prometheus still missing after installing the package"
fi
rm -f -- "$log"
note "installed $(promtool --version 2>&1 | head -n 1)"

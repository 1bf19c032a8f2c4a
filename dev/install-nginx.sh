#!/usr/bin/env bash
# Installs Debian's nginx, ssl-cert and curl packages when one is missing: the
# reverse-proxy test (tests/integration/web.rs) checks deploy/nginx/orchgpu.conf with
# `nginx -t` (its certificate is ssl-cert's snake-oil pair), runs it in front of orchgpu
# and asks through it with curl. Idempotent; the package's own service is not started (RUNLEVEL=1
# makes invoke-rc.d skip it); apt-get's output goes to a log file, shown only when it fails.
#
# Usage: dev/install-nginx.sh      (as root, or with sudo available, for apt-get)
# Exit status 0 when all three are installed.
set -euo pipefail

prog=dev/install-nginx.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

nginx_bin() { command -v nginx || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; }; }

snakeoil=/etc/ssl/certs/ssl-cert-snakeoil.pem
if bin=$(nginx_bin) && [[ -f $snakeoil ]] && command -v curl >/dev/null; then
    note "nginx, ssl-cert and curl are installed ($("$bin" -v 2>&1 | head -n 1))"
    exit 0
fi

sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || die "nginx, ssl-cert or curl missing and no root (or sudo) to apt-get install them"
    sudo=(sudo env RUNLEVEL=1)
fi
log=$(mktemp -t orchgpu-apt-nginx.XXXXXX.log)
note "installing Debian's nginx, ssl-cert and curl packages with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
# The package lists may be absent or stale on a fresh machine.
if ! timeout 900 "${sudo[@]}" apt-get install -y -qq --no-install-recommends nginx ssl-cert curl >"$log" 2>&1; then
    timeout 900 "${sudo[@]}" apt-get update -qq >>"$log" 2>&1 || true
    if ! timeout 900 "${sudo[@]}" apt-get install -y -qq --no-install-recommends nginx ssl-cert curl >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "apt-get install nginx ssl-cert curl failed (full log: $log)"
    fi
fi
bin=$(nginx_bin) || die "nginx still missing after installing the package"
[[ -f $snakeoil ]] || die "$snakeoil still missing after installing ssl-cert"
command -v curl >/dev/null || die "curl still missing after installing it"
rm -f -- "$log"
note "installed $("$bin" -v 2>&1 | head -n 1)"

#!/usr/bin/env bash
# Builds the Debian package (deploy/build-deb.sh), checks its contents and maintainer
# scripts, installs it on this machine with dpkg -i, checks the installed files (and the
# unit with systemd-analyze verify), then purges it again. Needs root; changes the
# machine only while it runs (the orchgpu system user the package creates stays, as
# Debian does for system users).
#
# Usage: deploy/check-deb.sh [--profile PROFILE]   (passed to deploy/build-deb.sh)
#        deploy/check-deb.sh --deb FILE.deb        (check an already built package)
# Exit status: 0 when every check passed; 1 otherwise (the failed check on stderr).
set -euo pipefail

prog=deploy/check-deb.sh
repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
die() {
    printf '%s: FAILED: %s\n' "$prog" "$*" >&2
    exit 1
}
ok() { printf '%s: ok: %s\n' "$prog" "$*" >&2; }

((EUID == 0)) || die "needs root (dpkg -i)"
deb=
build_args=()
while (($#)); do
    case $1 in
        --deb)
            deb=${2:?--deb needs a file}
            shift 2
            ;;
        --profile)
            build_args+=(--profile "${2:?--profile needs a value}")
            shift 2
            ;;
        *) die "unknown argument '$1'" ;;
    esac
done
[[ -n $deb ]] || deb=$("$repo_root/deploy/build-deb.sh" "${build_args[@]}")
[[ -f $deb ]] || die "no package at '$deb'"

if dpkg-query -W -f='${Status}' orchgpu 2>/dev/null | grep -q 'installed'; then
    die "orchgpu is already installed here; remove it first (dpkg --purge orchgpu)"
fi

work=$(mktemp -d)
installed=0
cleanup() {
    if ((installed)); then dpkg --purge orchgpu >/dev/null 2>&1 || true; fi
    rm -rf -- "$work"
}
trap cleanup EXIT

# --- The archive --------------------------------------------------------------------------
dpkg-deb -c "$deb" >"$work/contents"
entry() { # PATH MODE: a line of dpkg-deb -c for ./PATH with permissions MODE
    local path=$1 mode=$2
    grep -Eq "^${mode} [^ ]+ +[0-9]+ [0-9-]+ [0-9:]+ \./${path#/}\$" "$work/contents" ||
        die "the package has no ${path} with mode ${mode}:$(printf '\n%s' "$(cat "$work/contents")")"
    ok "contains $path ($mode)"
}
entry /usr/bin/orchgpu -rwxr-xr-x
entry /usr/bin/mock-ssgm -rwxr-xr-x
entry /usr/bin/orchgpu-function -rwxr-xr-x
unit_path=$(grep -Eo '\./(usr/)?lib/systemd/system/orchgpu\.service$' "$work/contents" || true)
[[ -n $unit_path ]] || die "the package has no lib/systemd/system/orchgpu.service"
# The template unit (one instance per use case) beside it, from the same unit-scripts dir.
entry "${unit_path#.}" -rw-r--r--
entry "$(dirname -- "${unit_path#.}")/orchgpu@.service" -rw-r--r--
entry /etc/orchgpu/orchgpu.env -rw-r-----
entry /usr/share/doc/orchgpu/operations.md -rw-r--r--
entry /usr/share/doc/orchgpu/inference.md -rw-r--r--
entry /usr/share/doc/orchgpu/copyright -rw-r--r--
entry /usr/share/doc/orchgpu/examples/orchgpu.env.example -rw-r--r--
entry /usr/share/doc/orchgpu/examples/scar/bundle.sh -rw-r--r--
entry /usr/share/doc/orchgpu/examples/scar/yolo/orchgpu-yolo.yaml -rw-r--r--
entry /usr/share/doc/orchgpu/examples/scar/yolo/detect.sh -rwxr-xr-x
entry /usr/share/doc/orchgpu/examples/scar/yolo/yolo.env.example -rw-r--r--
entry /usr/share/doc/orchgpu/examples/scar/ocr/orchgpu-ocr.yaml -rw-r--r--
entry /usr/share/doc/orchgpu/examples/scar/ocr/recognize.sh -rwxr-xr-x
entry /usr/share/doc/orchgpu/examples/scar/ocr/ocr.env.example -rw-r--r--
entry /usr/share/doc/orchgpu/examples/docker/yolo/Dockerfile -rw-r--r--
entry /usr/share/doc/orchgpu/examples/docker/ocr/Dockerfile -rw-r--r--
entry /usr/share/doc/orchgpu/examples/prometheus/orchgpu-alerts.yml -rw-r--r--
entry /usr/share/doc/orchgpu/examples/prometheus/prometheus.example.yml -rw-r--r--
entry /usr/share/doc/orchgpu/examples/grafana/orchgpu-dashboard.json -rw-r--r--
entry /usr/share/doc/orchgpu/examples/nginx/orchgpu.conf -rw-r--r--

dpkg-deb -e "$deb" "$work/control"
grep -qx '/etc/orchgpu/orchgpu.env' "$work/control/conffiles" ||
    die "/etc/orchgpu/orchgpu.env is not a conffile"
ok "/etc/orchgpu/orchgpu.env is a conffile"
grep -q 'useradd --system' "$work/control/postinst" || die "postinst does not create the orchgpu user"
# enable = false, start = false: no enable and no start of the unit on install.
# shellcheck disable=SC2016 # a literal $_dh_action in the generated script
if grep -Eq 'deb-systemd-invoke (start|\$_dh_action)' "$work/control/postinst"; then
    die "postinst enables or starts the service:$(printf '\n%s' "$(cat "$work/control/postinst")")"
fi
ok "postinst creates the user and neither enables nor starts the service"
cmp -s "$repo_root/deploy/systemd/orchgpu.env.example" <(dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./etc/orchgpu/orchgpu.env) ||
    die "the packaged /etc/orchgpu/orchgpu.env differs from deploy/systemd/orchgpu.env.example"
ok "the env file is the example"

# --- Installed ----------------------------------------------------------------------------
dpkg -i "$deb" >"$work/dpkg-i.log" 2>&1 || die "dpkg -i failed: $(cat "$work/dpkg-i.log")"
installed=1
ok "dpkg -i $(basename -- "$deb")"
version=$(/usr/bin/orchgpu --version) || die "/usr/bin/orchgpu --version failed"
want=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo_root/Cargo.toml" | head -n 1)
[[ $version == "orchgpu $want" ]] || die "orchgpu --version says '$version', expected 'orchgpu $want'"
ok "/usr/bin/orchgpu --version: $version"
/usr/bin/mock-ssgm --help >/dev/null || die "/usr/bin/mock-ssgm --help failed"
/usr/bin/orchgpu-function --version >/dev/null || die "/usr/bin/orchgpu-function --version failed"
ok "mock-ssgm and orchgpu-function run"
[[ -f /etc/orchgpu/orchgpu.env ]] || die "/etc/orchgpu/orchgpu.env is missing after install"
[[ $(stat -c '%a %U %G' /etc/orchgpu/orchgpu.env) == "640 root orchgpu" ]] ||
    die "/etc/orchgpu/orchgpu.env is $(stat -c '%a %U %G' /etc/orchgpu/orchgpu.env), expected 640 root orchgpu"
ok "/etc/orchgpu/orchgpu.env exists (640 root:orchgpu)"
getent passwd orchgpu >/dev/null || die "the orchgpu user was not created"
[[ $(getent passwd orchgpu | cut -d: -f7) == /usr/sbin/nologin ]] || die "the orchgpu user has a login shell"
ok "system user orchgpu exists"
unit=/${unit_path#./}
if command -v systemd-analyze >/dev/null; then
    verify=$(systemd-analyze verify "$unit" 2>&1) || die "systemd-analyze verify $unit: $verify"
    [[ -z $verify ]] || die "systemd-analyze verify $unit: $verify"
    ok "systemd-analyze verify $unit"
    # The template, as an instance (verify refuses a bare template name).
    instance=$work/orchgpu@check.service
    cp -- "${unit%/orchgpu.service}/orchgpu@.service" "$instance"
    verify=$(systemd-analyze verify "$instance" 2>&1) || die "systemd-analyze verify orchgpu@.service: $verify"
    [[ -z $verify ]] || die "systemd-analyze verify orchgpu@.service: $verify"
    ok "systemd-analyze verify orchgpu@.service (as orchgpu@check)"
else
    printf '%s: note: systemd-analyze is not installed; the unit was not verified here\n' "$prog" >&2
fi
# The unconfigured service refuses to start (exit 2) rather than run half-configured.
set +e
# shellcheck source=/dev/null
(set -a && . /etc/orchgpu/orchgpu.env && exec /usr/bin/orchgpu) >"$work/run.log" 2>&1
status=$?
set -e
[[ $status == 2 ]] || die "orchgpu with the shipped env file exited $status, expected 2: $(cat "$work/run.log")"
ok "with the shipped (empty) env file orchgpu exits 2: $(head -n 1 "$work/run.log")"

# --- Removed ------------------------------------------------------------------------------
dpkg -r orchgpu >"$work/dpkg-r.log" 2>&1 || die "dpkg -r failed: $(cat "$work/dpkg-r.log")"
[[ ! -e /usr/bin/orchgpu ]] || die "/usr/bin/orchgpu is still there after dpkg -r"
[[ -f /etc/orchgpu/orchgpu.env ]] || die "dpkg -r removed the conffile (only --purge should)"
ok "dpkg -r removes the binaries and keeps the conffile"
dpkg --purge orchgpu >"$work/dpkg-purge.log" 2>&1 || die "dpkg --purge failed: $(cat "$work/dpkg-purge.log")"
installed=0
[[ ! -e /etc/orchgpu/orchgpu.env ]] || die "/etc/orchgpu/orchgpu.env is still there after --purge"
ok "dpkg --purge removes the configuration"
printf '%s: all checks passed for %s\n' "$prog" "$deb" >&2

#!/usr/bin/env bash
# Checks an SSGM layer zip the way Lambda will use it: unpacked as /opt would be, bin/ssgm
# present and executable. With --mock (a layer made by layer.sh --mock) it also runs the
# layer's own client as the function would, against the same binary's scheduler
# (`ssgm serve`): one -alloc must be granted and its -dealloc succeed.
#
# Usage: deploy/lambda/check-layer.sh ZIP [--mock]
# Exit status: 0 when every check passed, 1 otherwise.
set -euo pipefail

prog=deploy/lambda/check-layer.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
(($# == 1 || $# == 2)) || die "usage: $prog ZIP [--mock]"
zip=$1 mock=0
[[ ${2:-} == --mock ]] && mock=1
[[ ${2:-} == '' || $mock == 1 ]] || die "unknown argument '$2'"
[[ -f $zip ]] || die "no such file: $zip"

opt=$(mktemp -d)
server_pid=''
cleanup() {
    [[ -z $server_pid ]] || kill -- "$server_pid" 2>/dev/null || true
    rm -rf -- "$opt"
}
trap cleanup EXIT
unzip -q -- "$zip" -d "$opt" || die "cannot unpack $zip"
[[ -f $opt/bin/ssgm && -x $opt/bin/ssgm ]] || die "$zip has no executable bin/ssgm"
printf '%s: %s: bin/ssgm is there and executable\n' "$prog" "$zip" >&2
((mock)) || exit 0

# The scheduler prints `listening on IP:PORT` first.
exec {out}< <(exec "$opt/bin/ssgm" serve --gpus 1 2>/dev/null)
server_pid=$!
read -r -t 10 -u "$out" line || die "the layer's mock scheduler did not start"
[[ $line =~ ^listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]] || die "unexpected first line: $line"
port=${BASH_REMATCH[1]}
reply=$(LD_LIBRARY_PATH=$opt/lib "$opt/bin/ssgm" -S 127.0.0.1 -P "$port" -alloc -g 1) ||
    die "-alloc failed"
[[ $reply =~ ^SSGM_ERROR=0\;[A-Z_]+=([0-9]+)\; ]] || die "-alloc was not granted: $reply"
LD_LIBRARY_PATH=$opt/lib "$opt/bin/ssgm" -S 127.0.0.1 -P "$port" -dealloc -j "${BASH_REMATCH[1]}" ||
    die "-dealloc of job ${BASH_REMATCH[1]} failed"
printf '%s: the layer'"'"'s client was granted a GPU and released it (%s)\n' "$prog" "$reply" >&2

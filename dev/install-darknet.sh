#!/usr/bin/env bash
# Installs what real inference needs on a Debian machine (a developer's or CI's): Debian's
# darknet package (pjreddie's darknet, CPU build with OpenCV, with yolov3-tiny.cfg,
# coco.names and sample images under /usr/share/darknet), netpbm (scar/yolo/detect.sh turns
# darknet's JPEG into the PNG orchgpu waits for), then the YOLOv3-tiny weights with
# dev/fetch-weights.sh. Idempotent: installs only what is missing.
#
# Usage: dev/install-darknet.sh      (as root, or with sudo available, for apt-get)
# Prints the weights path on stdout. Exit status 0 when everything is in place.
set -euo pipefail

prog=dev/install-darknet.sh
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

missing=()
command -v darknet >/dev/null && [[ -f /usr/share/darknet/cfg/yolov3-tiny.cfg ]] ||
    missing+=(darknet)
command -v jpegtopnm >/dev/null && command -v pnmtopng >/dev/null || missing+=(netpbm)

if ((${#missing[@]})); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${missing[*]}"
        sudo=(sudo)
    fi
    # apt-get's (and dpkg's) output goes to a log file, shown only when it fails: -qq does
    # not silence dpkg's hundreds of unpacking and setting-up lines.
    log=$(mktemp -t orchgpu-apt-darknet.XXXXXX.log)
    note "installing ${missing[*]} with apt-get (log: $log)"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent or stale on a fresh machine.
    if ! "${sudo[@]}" apt-get update -qq >"$log" 2>&1 ||
        ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "apt-get install ${missing[*]} failed (full log: $log)"
    fi
    rm -f -- "$log"
else
    note "darknet and netpbm are installed"
fi

for f in /usr/share/darknet/cfg/yolov3-tiny.cfg /usr/share/darknet/cfg/coco.data \
    /usr/share/darknet/data/coco.names /usr/share/darknet/data/dog.jpg; do
    [[ -f $f ]] || die "$f is missing after installing darknet"
done

"$script_dir/fetch-weights.sh"

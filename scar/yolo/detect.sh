#!/usr/bin/env bash
# The SCAR function's script: runs YOLOv3-tiny (darknet) on the image of one orchgpu bundle,
# on the remote GPU that the bundle's rCUDA reservation names.
#
# SCAR's supervisor runs it once per bundle uploaded to the intermediate bucket, with:
#   INPUT_FILE_PATH     the downloaded bundle, <job id>.tar.gz
#   TMP_OUTPUT_DIR      where to leave the outputs; the supervisor uploads every file in it
#                       to the function's output bucket/dir
#   STORAGE_OBJECT_KEY  (optional) the bundle's key, only logged
# The local stand-in (orchgpu-function) sets the same variables.
#
# It writes:
#   $TMP_OUTPUT_DIR/<job id>.png  the image with the detections drawn (orchgpu waits for it)
#   $TMP_OUTPUT_DIR/<job id>.txt  the detections, darknet's "label: NN%" lines, after
#                                 "# "-prefixed lines that describe the run
#
# The bundle (see orchgpu's DESIGN.md §3.2) holds tmp/<id>.<ext> (the image),
# tmp/<id>.env (the reservation as NAME='value' lines) and tmp/<id>.json; bundles from the
# old orchGPU hold only tmp/<id>.txt, whose line 1 is RCUDA_DEVICE_COUNT and line 2
# RCUDA_DEVICE_0. Every RCUDA_* setting is exported for the rCUDA client library that
# darknet's CUDA calls go through.
#
# Settings (environment; the defaults match docker/yolo/Dockerfile's image, and fall back to
# Debian's darknet package so the same script runs on a developer's machine):
#   DARKNET_HOME     darknet's folder, the working directory while it runs (pjreddie's
#                    darknet loads data/labels/ relative to it)
#                    default /opt/darknet, else /usr/share/darknet
#   DARKNET_BIN      the darknet executable; default $DARKNET_HOME/darknet, else `darknet`
#   DARKNET_CFG      network config; default $DARKNET_HOME/cfg/yolov3-tiny.cfg
#   DARKNET_DATA     .data file naming the class names; default $DARKNET_HOME/cfg/coco.data
#   DARKNET_WEIGHTS  weights; default $DARKNET_HOME/yolov3-tiny.weights, else
#                    ~/.cache/orchgpu/weights/yolov3-tiny.weights (dev/fetch-weights.sh)
#   DARKNET_THRESH   detection threshold, default 0.5
#   DETECT_REQUIRE_RCUDA  1 (default) fails when the bundle has no reservation; 0 only warns
#
# Exit status: 0 when both outputs were written; 1 (with a message on stderr) otherwise.
set -euo pipefail

prog=detect.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
log() { printf '%s: %s\n' "$prog" "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }

# --- The invocation and the bundle: scar/bundle.sh ------------------------------------------
# Found beside this script, one folder up (this repository), or where the function's image
# puts it (SCAR may run the script from a copy elsewhere); ORCHGPU_BUNDLE_LIB overrides.
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
for bundle_lib in "${ORCHGPU_BUNDLE_LIB:-}" "$here/bundle.sh" "$here/../bundle.sh" /opt/orchgpu/bundle.sh; do
    [[ -n $bundle_lib && -f $bundle_lib ]] && break
done
[[ -f $bundle_lib ]] || die "no bundle.sh beside $here, one folder up or in /opt/orchgpu"
# What bundle.sh sets: the job id, the unpacked bundle's folder and the input member.
id='' work='' input=''
# shellcheck source=/dev/null
source "$bundle_lib"
bundle_invocation

# --- Darknet and the model ----------------------------------------------------------------
if [[ -z ${DARKNET_HOME:-} ]]; then
    if [[ -d /opt/darknet ]]; then
        DARKNET_HOME=/opt/darknet
    else
        DARKNET_HOME=/usr/share/darknet
    fi
fi
[[ -d $DARKNET_HOME ]] || die "DARKNET_HOME '$DARKNET_HOME' is not a directory"
if [[ -z ${DARKNET_BIN:-} ]]; then
    if [[ -x $DARKNET_HOME/darknet ]]; then
        DARKNET_BIN=$DARKNET_HOME/darknet
    else
        DARKNET_BIN=$(command -v darknet) ||
            die "no darknet executable: set DARKNET_BIN, or install it (dev/install-darknet.sh)"
    fi
fi
[[ -f $DARKNET_BIN && -x $DARKNET_BIN ]] || die "DARKNET_BIN '$DARKNET_BIN' is not an executable file"
DARKNET_CFG=${DARKNET_CFG:-$DARKNET_HOME/cfg/yolov3-tiny.cfg}
DARKNET_DATA=${DARKNET_DATA:-$DARKNET_HOME/cfg/coco.data}
if [[ -z ${DARKNET_WEIGHTS:-} ]]; then
    DARKNET_WEIGHTS=$DARKNET_HOME/yolov3-tiny.weights
    if [[ ! -f $DARKNET_WEIGHTS && -n ${HOME:-} ]]; then
        DARKNET_WEIGHTS=$HOME/.cache/orchgpu/weights/yolov3-tiny.weights
    fi
fi
DARKNET_THRESH=${DARKNET_THRESH:-0.5}
[[ $DARKNET_THRESH =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] ||
    die "DARKNET_THRESH '$DARKNET_THRESH' is not a number between 0 and 1"
# darknet prints "Couldn't open file" and still exits 0 when one of these is missing, so
# check them first.
[[ -f $DARKNET_CFG ]] || die "DARKNET_CFG '$DARKNET_CFG' is missing"
[[ -f $DARKNET_DATA ]] || die "DARKNET_DATA '$DARKNET_DATA' is missing"
[[ -f $DARKNET_WEIGHTS ]] ||
    die "DARKNET_WEIGHTS '$DARKNET_WEIGHTS' is missing (dev/fetch-weights.sh fetches it)"
names=$(sed -n 's/^[[:space:]]*names[[:space:]]*=[[:space:]]*//p' -- "$DARKNET_DATA" | tail -n 1)
[[ -n $names ]] || die "DARKNET_DATA '$DARKNET_DATA' has no 'names =' line"
[[ $names == /* ]] || names=$DARKNET_HOME/$names
[[ -f $names ]] || die "the class names '$names' (from $DARKNET_DATA) are missing"

# --- The bundle ---------------------------------------------------------------------------
bundle_open "${DETECT_REQUIRE_RCUDA:-1}"

# --- Inference ----------------------------------------------------------------------------
prediction=$work/prediction
log "running $DARKNET_BIN detector test $DARKNET_DATA $DARKNET_CFG $DARKNET_WEIGHTS (threshold $DARKNET_THRESH)"
status=0
(cd -- "$DARKNET_HOME" &&
    exec "$DARKNET_BIN" detector test "$DARKNET_DATA" "$DARKNET_CFG" "$DARKNET_WEIGHTS" \
        "$input" -thresh "$DARKNET_THRESH" -out "$prediction") \
    >"$work/darknet.out" 2>"$work/darknet.err" </dev/null || status=$?
if ((status != 0)) || ! grep -q 'Predicted in' "$work/darknet.out"; then
    printf '%s: darknet stderr (last lines):\n' "$prog" >&2
    tail -n 20 -- "$work/darknet.err" >&2 || true
    printf '%s: darknet stdout:\n' "$prog" >&2
    cat -- "$work/darknet.out" >&2 || true
    die "darknet failed (exit status $status) on tmp/${input##*/}"
fi
seconds=$(sed -n 's/.*Predicted in \([0-9.]*\) seconds.*/\1/p' -- "$work/darknet.out" | head -n 1)
log "darknet: predicted in ${seconds:-?} s"

# --- The outputs --------------------------------------------------------------------------
is_png() { [[ $(head -c 8 -- "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]]; }

# pjreddie's darknet appends ".jpg" to -out whatever it says (docker/yolo/Dockerfile patches its
# build to write ".png"), so take whichever it wrote and make sure the result is a PNG.
out_png=$TMP_OUTPUT_DIR/$id.png
tmp_png=$work/result.png
if [[ -f $prediction.png ]] && is_png "$prediction.png"; then
    mv -f -- "$prediction.png" "$tmp_png"
    how="written as PNG by darknet"
elif [[ -f $prediction.jpg ]]; then
    jpg=$prediction.jpg
    if command -v jpegtopnm >/dev/null && command -v pnmtopng >/dev/null; then
        jpegtopnm -quiet -- "$jpg" | pnmtopng >"$tmp_png" || die "jpegtopnm | pnmtopng failed on $jpg"
        how="converted from darknet's JPEG with netpbm"
    elif command -v python3 >/dev/null && python3 -c 'import PIL' 2>/dev/null; then
        python3 -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).save(sys.argv[2], "PNG")' \
            "$jpg" "$tmp_png" || die "PIL could not convert $jpg"
        how="converted from darknet's JPEG with PIL"
    elif command -v magick >/dev/null; then
        magick "$jpg" "png:$tmp_png" || die "magick could not convert $jpg"
        how="converted from darknet's JPEG with ImageMagick"
    else
        die "darknet wrote a JPEG and no converter to PNG is installed (netpbm, python3-pil or ImageMagick)"
    fi
else
    die "darknet reported a prediction but wrote no image ($prediction.jpg or .png)"
fi
is_png "$tmp_png" || die "the result image is not a PNG ($how)"

mapfile -t detections < <(grep -E '^[^:#][^:]*: [0-9]+%$' -- "$work/darknet.out" || true)
{
    printf '# orchgpu detections for job %s\n' "$id"
    printf '# input: tmp/%s\n' "${input##*/}"
    printf '# model: %s, weights %s, threshold %s\n' "${DARKNET_CFG##*/}" "${DARKNET_WEIGHTS##*/}" "$DARKNET_THRESH"
    printf '# darknet_seconds: %s\n' "${seconds:-unknown}"
    printf '# rcuda: %s\n' "${RCUDA_DEVICE_COUNT:-0} device(s)${RCUDA_DEVICE_0:+, first $RCUDA_DEVICE_0}"
    printf '# detections: %d\n' "${#detections[@]}"
    if ((${#detections[@]})); then printf '%s\n' "${detections[@]}"; fi
} >"$work/result.txt"

mv -f -- "$work/result.txt" "$TMP_OUTPUT_DIR/$id.txt"
mv -f -- "$tmp_png" "$out_png"
log "output: $out_png ($how), $TMP_OUTPUT_DIR/$id.txt (${#detections[@]} detections)"
for d in "${detections[@]}"; do log "detected $d"; done

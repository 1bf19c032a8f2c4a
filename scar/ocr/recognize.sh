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
bundle_open "${OCR_REQUIRE_RCUDA:-1}"

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

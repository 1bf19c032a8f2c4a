#!/usr/bin/env bash
# Installs what the OCR use case (scar/ocr/) needs on a Debian machine (a developer's or
# CI's): Debian's tesseract-ocr (Tesseract 5, LSTM engine) with tesseract-ocr-eng (its
# English model), and ImageMagick with the DejaVu fonts, which the tests and dev/demo.sh
# use to draw the sample document pages they recognise. Idempotent: installs only what is
# missing; apt-get's output goes to a log file, shown only when it fails.
#
# Usage: dev/install-tesseract.sh      (as root, or with sudo available, for apt-get)
# Exit status 0 when tesseract (with the eng language) and convert are on PATH.
set -euo pipefail

prog=dev/install-tesseract.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

has_eng() { tesseract --list-langs 2>/dev/null | grep -qx eng; }
missing=()
command -v tesseract >/dev/null || missing+=(tesseract-ocr)
command -v tesseract >/dev/null && has_eng || missing+=(tesseract-ocr-eng)
# convert-im6.q16 is the Debian package's own name for ImageMagick 6's convert; a bare
# `convert` elsewhere on PATH is not proof that ImageMagick is installed.
command -v convert-im6.q16 >/dev/null || command -v magick >/dev/null || missing+=(imagemagick)
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || missing+=(fonts-dejavu-core)

if ((${#missing[@]})); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${missing[*]}"
        sudo=(sudo)
    fi
    log=$(mktemp -t orchgpu-apt-tesseract.XXXXXX.log)
    note "installing ${missing[*]} with apt-get (log: $log)"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent or stale on a fresh machine.
    if ! timeout 900 "${sudo[@]}" apt-get update -qq >"$log" 2>&1 ||
        ! timeout 900 "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "apt-get install ${missing[*]} failed (full log: $log)"
    fi
    rm -f -- "$log"
    command -v tesseract >/dev/null || die "tesseract is still missing after installing tesseract-ocr"
    has_eng || die "tesseract has no 'eng' language after installing tesseract-ocr-eng"
    note "installed $(tesseract --version 2>&1 | head -n 1)"
else
    note "tesseract (eng), ImageMagick and the DejaVu fonts are installed ($(tesseract --version 2>&1 | head -n 1))"
fi

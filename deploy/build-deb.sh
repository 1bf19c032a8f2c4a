#!/usr/bin/env bash
# Builds orchgpu's Debian package with cargo-deb (installing cargo-deb first when it is
# missing) and prints the path of the .deb. The package's contents are declared in
# Cargo.toml's [package.metadata.deb]; deploy/check-deb.sh checks them.
#
# Usage: deploy/build-deb.sh [--profile PROFILE]
#   --profile  cargo profile of the binaries (default release; CI's package check may use
#              dev to reuse the test build, which makes a larger, slower package)
# Environment: CARGO_TARGET_DIR is honoured. Exit status 0 with the .deb path on stdout.
set -euo pipefail

prog=deploy/build-deb.sh
repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

profile=release
while (($#)); do
    case $1 in
        --profile)
            (($# >= 2)) || die "--profile needs a value"
            profile=$2
            shift 2
            ;;
        -h | --help)
            sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

readonly cargo_deb_version=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    note "installing cargo-deb $cargo_deb_version (cargo install --locked)"
    cargo install cargo-deb --version "$cargo_deb_version" --locked >&2 ||
        die "cargo install cargo-deb failed"
fi

cd -- "$repo_root"
# The docs the package ships must exist (cargo-deb's own error is less clear).
for f in docs/operations.md docs/inference.md docs/functions.md scar/yolo/orchgpu-yolo.yaml \
    scar/ocr/orchgpu-ocr.yaml docker/yolo/Dockerfile docker/ocr/Dockerfile deploy/systemd/orchgpu@.service \
    deploy/systemd/orchgpu.service deploy/systemd/orchgpu.env.example; do
    [[ -f $f ]] || die "$f is missing"
done
note "building the package (profile $profile) with $(cargo deb --version)"
output=$(cargo deb --locked --profile "$profile" 2>&1) || {
    printf '%s\n' "$output" >&2
    die "cargo deb failed"
}
deb=$(printf '%s\n' "$output" | grep -E '\.deb$' | tail -n 1)
[[ -n $deb && -f $deb ]] || {
    printf '%s\n' "$output" >&2
    die "cargo deb did not name the .deb it wrote"
}
note "built $deb"
printf '%s\n' "$deb"

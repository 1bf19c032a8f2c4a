#!/usr/bin/env bash
# Runs orchgpu's whole test suite in one command: shellcheck on the scripts (when
# installed), cargo fmt --check, clippy with warnings denied, then the unit and integration
# tests (cargo nextest, or cargo test without it) against a local S3/SQS emulator, which it
# starts with dev/localstack.sh and stops again at exit if it started it.
#
# Usage: dev/test.sh [TEST FILTER...]     (extra arguments go to nextest / cargo test)
#   ORCHGPU_TEST_ENDPOINT=URL   use the emulator at URL and start none
#   ORCHGPU_EMULATOR=moto       start moto instead of LocalStack
# Exports ORCHGPU_TEST_ENDPOINT and ORCHGPU_TEST_EMULATOR (localstack, moto or external)
# for the tests, and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=test, AWS_REGION=us-east-1
# where they are unset. Exit status: 0 when every step passed, 1 otherwise.
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd -- "$repo_root"

note() { printf '==> %s\n' "$*" >&2; }

started_emulator=0
stop_emulator() {
    if ((started_emulator)); then
        dev/localstack.sh stop || true
    fi
}
trap stop_emulator EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${ORCHGPU_TEST_ENDPOINT:-} ]]; then
    export ORCHGPU_TEST_EMULATOR=${ORCHGPU_TEST_EMULATOR:-external}
    emulator_desc="$ORCHGPU_TEST_ENDPOINT (from ORCHGPU_TEST_ENDPOINT, not started here)"
else
    export ORCHGPU_TEST_EMULATOR=${ORCHGPU_EMULATOR:-localstack}
    t0=$SECONDS
    pid_before=$(dev/localstack.sh pid 2>/dev/null) || pid_before=
    ORCHGPU_TEST_ENDPOINT=$(dev/localstack.sh start)
    pid_after=$(dev/localstack.sh pid 2>/dev/null) || pid_after=
    # Ours to stop only if this start launched it (a new pid); otherwise it was reused.
    if [[ -n $pid_after && $pid_after != "$pid_before" ]]; then
        started_emulator=1
        how="started here, stopped at exit"
    else
        how="already running, reused"
    fi
    emulator_desc="$ORCHGPU_TEST_EMULATOR at $ORCHGPU_TEST_ENDPOINT ($how, $((SECONDS - t0)) s)"
fi
export ORCHGPU_TEST_ENDPOINT
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_REGION=${AWS_REGION:-us-east-1}
note "emulator: $emulator_desc"

failed=()
results=()
step() { # NAME COMMAND...
    local name=$1 t0=$SECONDS
    shift
    note "$name: $*"
    if "$@"; then
        results+=("$name: ok ($((SECONDS - t0)) s)")
    else
        results+=("$name: FAILED ($((SECONDS - t0)) s)")
        failed+=("$name")
    fi
}

# Prerequisites beyond Rust and Python, installed when missing (apt-get needs root or
# sudo): darknet, netpbm and the YOLOv3-tiny weights for the real-inference test,
# Tesseract (with its English model), ImageMagick and the DejaVu fonts for the OCR tests,
# promtool and prometheus (Debian's prometheus package) for the alert-rule and scrape
# tests, Chromium and ChromeDriver (Debian's chromium and chromium-driver) for the web
# page's browser test, nginx (with ssl-cert and curl) for the reverse-proxy test, and
# the tool shellcheck for the scripts.
step prerequisites dev/install-darknet.sh
step tesseract dev/install-tesseract.sh
step prometheus dev/install-prometheus.sh
step chromium dev/install-chromium.sh
step nginx dev/install-nginx.sh
if ! command -v shellcheck >/dev/null 2>&1 && ((EUID == 0)); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
        note "shellcheck did not install"
fi
if command -v shellcheck >/dev/null 2>&1; then
    # Tracked and new (not ignored) scripts; a plain list outside a git work tree.
    mapfile -t scripts < <(git ls-files --cached --others --exclude-standard -- '*.sh' .ci/run \
        2>/dev/null || printf '%s\n' dev/*.sh dev/function/*.sh deploy/*.sh .ci/run)
    ((${#scripts[@]} == 0)) || step shellcheck shellcheck -- "${scripts[@]}"
else
    results+=("shellcheck: skipped (not installed; apt-get install -y shellcheck)")
fi
step fmt cargo fmt --all -- --check
step clippy cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    step tests cargo nextest run --locked --no-fail-fast "$@"
else
    note "cargo-nextest is not installed; using cargo test"
    step tests cargo test --locked --no-fail-fast "$@"
fi

note "emulator: $emulator_desc"
for line in "${results[@]}"; do note "$line"; done
if ((${#failed[@]})); then
    note "FAILED: ${failed[*]}"
    exit 1
fi
note "all passed"

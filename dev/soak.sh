#!/usr/bin/env bash
# Runs the reliability soak: ORCHGPU_SOAK_JOBS jobs (default 500) through two daemons on one
# queue while SSGM faults, daemon SIGKILLs and SIGTERMs and duplicate notifications are
# injected, then prints the figures the README's reliability section reports (lines
# starting with SOAK). Starts LocalStack like dev/test.sh unless ORCHGPU_TEST_ENDPOINT is set.
#
# Usage: dev/soak.sh            ORCHGPU_SOAK_JOBS=N dev/soak.sh
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd -- "$repo_root"

started_emulator=0
stop_emulator() {
    if ((started_emulator)); then
        dev/localstack.sh stop || true
    fi
}
trap stop_emulator EXIT

if [[ -z ${ORCHGPU_TEST_ENDPOINT:-} ]]; then
    pid_before=$(dev/localstack.sh pid 2>/dev/null) || pid_before=
    ORCHGPU_TEST_ENDPOINT=$(dev/localstack.sh start)
    pid_after=$(dev/localstack.sh pid 2>/dev/null) || pid_after=
    [[ -z $pid_after || $pid_after == "$pid_before" ]] || started_emulator=1
fi
export ORCHGPU_TEST_ENDPOINT
export ORCHGPU_SOAK_JOBS=${ORCHGPU_SOAK_JOBS:-500}

cargo nextest run --locked --run-ignored only --no-capture soak 2>&1 |
    tee "${TMPDIR:-/tmp}/orchgpu-soak.log" | grep -E '^SOAK|PASS|FAIL|Summary'

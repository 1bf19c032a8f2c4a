#!/usr/bin/env bash
# Runs orchgpu's benchmark suite in one command: builds the release binaries and the
# bench, starts a LocalStack of its own (port 4580, its own FILESYSTEM_ROOT, stopped at
# exit) unless ORCHGPU_BENCH_ENDPOINT names an emulator to use, then runs every scenario
# and prints the table (also saved to bench/last-run.md). See BENCHMARKS.md.
#
# Usage: bench/run.sh [--quick] [--only overhead,detection,throughput,contended,memory,waiting]
#   ORCHGPU_BENCH_ENDPOINT=URL  use the emulator at URL (LocalStack, moto) and start none
#   ORCHGPU_BENCH_PORT=N        port of the LocalStack started here (default 4580)
#   ORCHGPU_LS_VENV=DIR         LocalStack venv (default ~/.cache/orchgpu/localstack-venv;
#                               dev/localstack.sh install creates it)
#   ORCHGPU_BENCH_DAEMON_ARGS="FLAGS"  extra flags for every daemon (compare settings)
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd -- "$repo_root"
note() { printf 'bench/run.sh: %s\n' "$*" >&2; }

port=${ORCHGPU_BENCH_PORT:-4580}
venv=${ORCHGPU_LS_VENV:-$HOME/.cache/orchgpu/localstack-venv}
state=$HOME/.cache/orchgpu/bench
ls_pid=

stop_emulator() {
    if [[ -n $ls_pid ]] && kill -0 "$ls_pid" 2>/dev/null; then
        note "stopping LocalStack (pid $ls_pid)"
        kill -TERM "$ls_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$ls_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$ls_pid" 2>/dev/null || true
    fi
}
trap stop_emulator EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

note "building release binaries and the bench"
cargo build --release --locked --bins --example orchgpu-bench
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin_dir=$target_dir/release

if [[ -n ${ORCHGPU_BENCH_ENDPOINT:-} ]]; then
    endpoint=$ORCHGPU_BENCH_ENDPOINT
    emulator="$endpoint (given, not started here)"
else
    [[ -x $venv/bin/python ]] || dev/localstack.sh install
    endpoint=http://127.0.0.1:$port
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        note "port $port is taken; set ORCHGPU_BENCH_PORT or ORCHGPU_BENCH_ENDPOINT"
        exit 1
    fi
    mkdir -p "$state/fs-$port"
    note "starting LocalStack on $endpoint (log: $state/localstack-$port.log)"
    env GATEWAY_SERVER=hypercorn GATEWAY_LISTEN="127.0.0.1:$port" \
        LOCALSTACK_HOST="127.0.0.1:$port" SERVICES=s3,sqs EAGER_SERVICE_LOADING=1 \
        PERSISTENCE=0 DNS_ADDRESS=0 DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 \
        SQS_ENDPOINT_STRATEGY=off OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$state/fs-$port" \
        LS_LOG=warn "$venv/bin/python" -m localstack.runtime.main \
        >"$state/localstack-$port.log" 2>&1 &
    ls_pid=$!
    for _ in $(seq 1 900); do
        if curl -fsS --max-time 2 "$endpoint/_localstack/init/ready" 2>/dev/null |
            grep -q '"completed": *true'; then
            break
        fi
        kill -0 "$ls_pid" 2>/dev/null || {
            note "LocalStack exited; see $state/localstack-$port.log"
            exit 1
        }
        sleep 0.1
    done
    version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("localstack-core"))')
    emulator="LocalStack $version at $endpoint (started here)"
    export ORCHGPU_BENCH_EMULATOR_PID=$ls_pid
fi

export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
unset AWS_PROFILE
note "emulator: $emulator"
note "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -sr)"
"$bin_dir/examples/orchgpu-bench" --endpoint "$endpoint" --bin-dir "$bin_dir" "$@" |
    tee bench/last-run.md

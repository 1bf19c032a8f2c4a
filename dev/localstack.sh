#!/usr/bin/env bash
# Installs, starts, stops and inspects the local AWS emulator (S3 + SQS) that orchgpu's
# tests and demo run against, on the host, without Docker, listening on 127.0.0.1 only.
#
# Usage: dev/localstack.sh {install|start|stop|status|url|pid|log}
#   install  create the emulator's venv if it is missing or incomplete
#   start    install if needed, start in the background and wait until ready; reuses an
#            emulator that already answers on the port; prints the endpoint URL
#   stop     stop the emulator this script started (SIGTERM, then SIGKILL after 4 s)
#   status   say whether it runs and is ready (exit 0 when ready, 1 otherwise)
#   url      print the endpoint URL
#   pid      print the pid of the emulator this script started (exit 1 if none runs)
#   log      print the path of its log file
#
# Environment:
#   ORCHGPU_EMULATOR   localstack (default) or moto
#   ORCHGPU_STATE      state dir for pid and log files (default ~/.cache/orchgpu):
#                      localstack.pid, localstack.log (localstack-PORT.* on another port)
#   ORCHGPU_LS_VENV    LocalStack venv (default ~/.cache/orchgpu/localstack-venv)
#   ORCHGPU_LS_PORT    LocalStack port (default 4566)
#   ORCHGPU_LS_GATEWAY_SERVER  hypercorn (default: listens on 127.0.0.1 only) or twisted
#                      (LocalStack's own default; listens on all interfaces)
#   ORCHGPU_MOTO_VERSION  moto version (default 5.2.5; CI also runs 5.2.1, whose
#                      CompleteMultipartUpload answer the SDK cannot parse)
#   ORCHGPU_MOTO_VENV  moto venv (default ~/.cache/orchgpu/moto-venv, or
#                      moto-VERSION-venv for another ORCHGPU_MOTO_VERSION)
#   ORCHGPU_MOTO_PORT  moto port (default 5000)
#   ORCHGPU_PYTHON     interpreter that creates the venvs (default python3; LocalStack's
#                      pinned requirements are for Python 3.11)
#   ORCHGPU_EMULATOR_START_TIMEOUT  seconds to wait for readiness (default 90)
set -euo pipefail

prog=dev/localstack.sh
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$script_dir/.." && pwd)
state_dir=${ORCHGPU_STATE:-$HOME/.cache/orchgpu}
emulator=${ORCHGPU_EMULATOR:-localstack}
python=${ORCHGPU_PYTHON:-python3}
start_timeout=${ORCHGPU_EMULATOR_START_TIMEOUT:-90}
# An idle LocalStack exits about 2.7 s after SIGTERM; one that served clients which then
# vanished (killed daemons mid long-poll) logs "received signal 15" and never exits, so
# waiting longer only delays the SIGKILL that ends it anyway.
stop_timeout=4

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
# Progress goes to stderr so that `start` and `url` print only the URL on stdout.
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

case $emulator in
    localstack)
        display_name=LocalStack
        venv=${ORCHGPU_LS_VENV:-$HOME/.cache/orchgpu/localstack-venv}
        port=${ORCHGPU_LS_PORT:-4566}
        default_port=4566
        requirements=$repo_root/dev/localstack/requirements.txt
        gateway_server=${ORCHGPU_LS_GATEWAY_SERVER:-hypercorn}
        ;;
    moto)
        display_name=moto
        moto_version=${ORCHGPU_MOTO_VERSION:-5.2.5}
        [[ $moto_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
            die "ORCHGPU_MOTO_VERSION must look like 5.2.5, not '$moto_version'"
        if [[ $moto_version == 5.2.5 ]]; then
            venv=${ORCHGPU_MOTO_VENV:-$HOME/.cache/orchgpu/moto-venv}
        else
            venv=${ORCHGPU_MOTO_VENV:-$HOME/.cache/orchgpu/moto-$moto_version-venv}
        fi
        port=${ORCHGPU_MOTO_PORT:-5000}
        default_port=5000
        moto_spec="moto[server]==$moto_version"
        ;;
    *) die "ORCHGPU_EMULATOR must be 'localstack' or 'moto', not '$emulator'" ;;
esac
if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "bad port '$port'"
fi
[[ $start_timeout =~ ^[0-9]+$ ]] || die "ORCHGPU_EMULATOR_START_TIMEOUT must be whole seconds"

url=http://127.0.0.1:$port
# An emulator on another port gets its own files, so that both can run and be stopped.
instance=$emulator
[[ $port == "$default_port" ]] || instance=$emulator-$port
pid_file=$state_dir/$instance.pid
log_file=$state_dir/$instance.log
marker=$venv/.orchgpu-installed
start_lock_fd=

# --- helpers ---------------------------------------------------------------------------

http_get() { # URL -> body on stdout; fails on connection errors and HTTP errors
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 3 -- "$1" 2>/dev/null
    else
        "$python" - "$1" 2>/dev/null <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.stdout.write(r.read().decode("utf-8", "replace"))
EOF
    fi
}

is_ready() {
    local body
    case $emulator in
        localstack)
            body=$(http_get "$url/_localstack/init/ready") || return 1
            [[ $body =~ \"completed\":[[:space:]]*true ]]
            ;;
        moto) http_get "$url/moto-api/" >/dev/null ;;
    esac
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

# Alive and not a zombie (a start that failed in this shell leaves an unreaped child).
pid_alive() {
    local stat
    # read, not $(<file): under set -e a failed $(<file) ends the whole script.
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# The pid recorded in the pid file, if that process is alive and is our emulator (a stale
# pid file may name a recycled pid).
recorded_pid() {
    local pid cmdline
    read -r pid 2>/dev/null <"$pid_file" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    { cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline"); } 2>/dev/null || return 1
    case $emulator in
        localstack) [[ $cmdline == *localstack.runtime.main* ]] || return 1 ;;
        moto) [[ $cmdline == *moto_server* ]] || return 1 ;;
    esac
    printf '%s\n' "$pid"
}

# --- install ---------------------------------------------------------------------------

install_stamp() { # what the marker must contain: the install spec and the interpreter
    case $emulator in
        localstack) sha256sum <"$requirements" | cut -d' ' -f1 ;;
        moto) printf '%s\n' "$moto_spec" ;;
    esac
    "$venv/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo none
}

venv_complete() {
    [[ -f $marker && -x $venv/bin/python ]] && [[ $(cat -- "$marker" 2>/dev/null) == "$(install_stamp)" ]]
}

cmd_install() {
    if [[ $emulator == localstack && ! -r $requirements ]]; then
        die "missing $requirements"
    fi
    if venv_complete; then
        note "$display_name venv is complete: $venv"
        return 0
    fi
    command -v "$python" >/dev/null 2>&1 || die "'$python' not found; set ORCHGPU_PYTHON"
    mkdir -p -- "$(dirname -- "$venv")"
    # One pip at a time per venv: a second caller waits, then finds the marker.
    local lock_fd
    exec {lock_fd}>"$venv.lock"
    if ! flock -n "$lock_fd"; then
        note "another install into $venv is running; waiting for it"
        flock -w 1800 "$lock_fd" || die "gave up waiting for the install lock $venv.lock"
    fi
    if venv_complete; then
        note "$display_name venv is complete: $venv"
        exec {lock_fd}>&-
        return 0
    fi
    if [[ -e $venv ]]; then
        # Never rm -rf something that is not a venv (a mistyped ORCHGPU_*_VENV=$HOME).
        [[ -f $venv/pyvenv.cfg || -z $(ls -A -- "$venv") ]] ||
            die "$venv exists but is not a venv; refusing to remove it"
        note "removing incomplete venv $venv (no or outdated install marker)"
        rm -rf -- "$venv"
    fi
    local pyver
    pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $emulator == localstack && $pyver != 3.11 ]]; then
        note "warning: $python is Python $pyver; the pinned LocalStack requirements are for 3.11"
    fi
    local t0=$SECONDS
    note "creating $display_name venv at $venv (Python $pyver)"
    "$python" -m venv -- "$venv" ||
        die "could not create a venv with $python (on Debian: apt-get install python3-venv)"
    note "installing $display_name into it (LocalStack: about 80 s and 520 MB; moto: about 40 s)"
    case $emulator in
        localstack)
            "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$requirements" ||
                die "pip install failed; the venv stays incomplete and is rebuilt next time"
            "$venv/bin/python" -c 'import localstack.runtime.main' ||
                die "localstack does not import after pip install"
            ;;
        moto)
            "$venv/bin/pip" install -q --disable-pip-version-check "$moto_spec" ||
                die "pip install failed; the venv stays incomplete and is rebuilt next time"
            [[ -x $venv/bin/moto_server ]] || die "moto_server missing after pip install"
            ;;
    esac
    install_stamp >"$marker"
    exec {lock_fd}>&-
    note "$display_name installed in $((SECONDS - t0)) s"
}

# --- start / stop ----------------------------------------------------------------------

launch() {
    mkdir -p -- "$state_dir"
    [[ -f $log_file ]] && mv -f -- "$log_file" "$log_file.1"
    local -a cmd
    case $emulator in
        localstack)
            local fs_root=$HOME/.cache/localstack-fs
            [[ $port == "$default_port" ]] || fs_root=$fs_root-$port
            mkdir -p -- "$fs_root"
            # OVERRIDE_IN_DOCKER=0 and DNS_ADDRESS=0 keep it from acting as if it ran in a
            # container (writing under /etc and /var/lib, taking port 53).
            # GATEWAY_SERVER=hypercorn: LocalStack 4.13's default server (twisted) ignores
            # the host part of GATEWAY_LISTEN and listens on 0.0.0.0; hypercorn honours it.
            cmd=(env GATEWAY_SERVER="$gateway_server"
                GATEWAY_LISTEN="127.0.0.1:$port" LOCALSTACK_HOST="127.0.0.1:$port"
                'SERVICES=s3,sqs' EAGER_SERVICE_LOADING=1 PERSISTENCE=0 DNS_ADDRESS=0
                DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 SQS_ENDPOINT_STRATEGY=off
                OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$fs_root" LS_LOG=warn
                "$venv/bin/python" -m localstack.runtime.main)
            ;;
        moto)
            cmd=("$venv/bin/moto_server" -H 127.0.0.1 -p "$port")
            ;;
    esac
    # setsid: its own session and process group, so a Ctrl-C in the caller's terminal
    # does not reach it and stop can signal the whole group. Without job control the
    # background child is no group leader, so setsid does not fork and $! is its pid.
    # The emulator must not inherit (and so hold) the start lock.
    (
        [[ -z $start_lock_fd ]] || exec {start_lock_fd}>&-
        cd -- "$state_dir" && exec setsid nohup "${cmd[@]}"
    ) >"$log_file" 2>&1 </dev/null &
    printf '%s\n' "$!" >"$pid_file"
    note "started $display_name (pid $!), log: $log_file"
}

wait_ready() { # PID -> 0 when ready, 1 when it died or timed out
    local deadline=$((SECONDS + start_timeout)) t0=$SECONDS
    while ((SECONDS < deadline)); do
        if is_ready; then
            note "$display_name ready at $url after $((SECONDS - t0)) s"
            return 0
        fi
        if ! pid_alive "$1"; then
            note "$display_name (pid $1) exited before it became ready"
            return 1
        fi
        sleep 0.5
    done
    note "$display_name was not ready after $start_timeout s"
    return 1
}

cmd_start() {
    if is_ready; then
        note "$display_name already answers at $url; reusing it"
        printf '%s\n' "$url"
        return 0
    fi
    # One start at a time: a concurrent caller waits here, then reuses this one's emulator.
    mkdir -p -- "$state_dir"
    local pid
    exec {start_lock_fd}>"$state_dir/$instance.start.lock"
    flock -w $((start_timeout + 60)) "$start_lock_fd" ||
        die "another start holds $state_dir/$instance.start.lock"
    if is_ready; then
        note "$display_name already answers at $url; reusing it"
        printf '%s\n' "$url"
        return 0
    fi
    if pid=$(recorded_pid); then
        note "$display_name (pid $pid) is starting; waiting for it"
    else
        port_taken && die "127.0.0.1:$port is taken by something that is not a ready $display_name"
        cmd_install
        launch
        read -r pid <"$pid_file"
        # Interrupted while waiting: do not leave a half-started emulator behind.
        trap 'note "interrupted; stopping $display_name"; cmd_stop; exit 130' INT TERM
    fi
    if ! wait_ready "$pid"; then
        if [[ -f $log_file ]]; then
            note "last lines of $log_file:"
            tail -n 40 -- "$log_file" >&2
        fi
        cmd_stop
        exit 1
    fi
    trap - INT TERM
    printf '%s\n' "$url"
}

cmd_stop() {
    local pid
    if ! pid=$(recorded_pid); then
        rm -f -- "$pid_file"
        if is_ready; then
            note "$display_name at $url was not started by this script (no pid file); leaving it alone"
        else
            note "$display_name is not running"
        fi
        return 0
    fi
    # The group id equals the pid when launch's setsid made it a group leader.
    local stat='' pgrp='' target=$pid
    read -r stat 2>/dev/null <"/proc/$pid/stat" || true
    stat=${stat##*) }
    read -r _ _ pgrp _ <<<"$stat"
    [[ $pgrp == "$pid" ]] && target=-$pid
    kill -TERM -- "$target" 2>/dev/null || true
    # After a client vanished mid-request, LocalStack's hypercorn server may never exit on
    # SIGTERM (a worker thread waits on its stopped event loop): SIGKILL then ends it; its
    # state is in memory only (PERSISTENCE=0), so nothing is lost.
    local deadline=$((SECONDS + stop_timeout))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid"; then
        note "$display_name (pid $pid) did not exit $stop_timeout s after SIGTERM; sending SIGKILL"
        kill -KILL -- "$target" 2>/dev/null || true
        while pid_alive "$pid"; do sleep 0.1; done
    fi
    rm -f -- "$pid_file"
    note "stopped $display_name (pid $pid)"
}

cmd_status() {
    local pid=
    pid=$(recorded_pid) || pid=
    if is_ready; then
        if [[ -n $pid ]]; then
            echo "$display_name is running (pid $pid) and ready at $url"
        else
            echo "$display_name is ready at $url (not started by this script)"
        fi
        return 0
    fi
    if [[ -n $pid ]]; then
        echo "$display_name is running (pid $pid) but not ready at $url; log: $log_file"
    else
        echo "$display_name is not running"
    fi
    return 1
}

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) printf '%s\n' "$url" ;;
    pid) recorded_pid ;;
    log) printf '%s\n' "$log_file" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac

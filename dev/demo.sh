#!/usr/bin/env bash
# Runs orchgpu's local stack end to end in one command: LocalStack (S3 + SQS), the buckets
# and queues (deploy/aws-setup.sh), the mock rCUDA scheduler (mock-ssgm), the local SCAR
# function stand-in running scar/yolo/detect.sh (real YOLOv3-tiny inference with Debian's darknet,
# installed with dev/install-darknet.sh when missing), and the orchgpu daemon; then uploads a
# few sample images with awkward names, waits for one result per image in the output
# bucket, downloads them and shows the scheduler's view. Everything listens on 127.0.0.1.
# With --use-case ocr the same stack runs the second use case instead: the function runs
# scar/ocr/recognize.sh (Tesseract, installed with dev/install-tesseract.sh when missing),
# the samples are document pages drawn here with ImageMagick in a DejaVu font, and the
# recognised text is printed. The two use cases have their own buckets, queues, state,
# logs and page port, so both demos can run at once.
# With --lambda the jobs run through orchgpu-lambda instead of the daemon: the function
# polls a Runtime API of the test kit's own (orchgpu-lambda-local, which plays the event
# source mappings of the jobs and results queues and the schedule), same configuration
# (the daemon's ORCHGPU_* variables), no web page; it prints the time each invocation
# would be billed.
#
# Usage: dev/demo.sh [--use-case yolo|ocr] [--lambda] [--once]
#   --use-case   yolo (default): object detection; ocr: text recognition
#   --lambda     run the jobs through orchgpu-lambda (docs/serverless.md)
#   --once       exit (stopping everything) once the results are there, instead of running
#                until Ctrl-C
# Environment:
#   ORCHGPU_PROFILE=release       build and run release binaries (default: debug)
#   ORCHGPU_DEMO_OUT=DIR          where results are downloaded (default demo-out, with
#                                 --use-case ocr demo-out-ocr)
#   ORCHGPU_DEMO_TIMEOUT=S        how long to wait for the results (default 120)
#   ORCHGPU_DEMO_HTTP_PORT=PORT   the web page's port on 127.0.0.1 (default 8642, ocr 8643)
#   ORCHGPU_STATE=DIR             logs go to DIR/demo/*.log, ocr DIR/demo-ocr/*.log
#                                 (default ~/.cache/orchgpu)
#   ORCHGPU_EMULATOR=moto         use moto instead of LocalStack (see dev/localstack.sh)
#   ORCHGPU_DEMO_SCRIPT=PATH      the function's script, from the repository root (default
#                                 scar/yolo/detect.sh, darknet; dev/function/example.sh: no
#                                 inference; with --use-case ocr scar/ocr/recognize.sh)
#   AWS_CLI=PATH                  aws CLI (default: LocalStack venv's, else aws on PATH;
#                                 with neither, the LocalStack venv is installed for it)
set -euo pipefail

prog=dev/demo.sh
repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
state_dir=${ORCHGPU_STATE:-$HOME/.cache/orchgpu}
profile=${ORCHGPU_PROFILE:-debug}
result_timeout=${ORCHGPU_DEMO_TIMEOUT:-120}
stop_timeout=30

say() { printf '%s: %s\n' "$prog" "$*"; }
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

once=0
lambda=0
use_case=yolo
while (($#)); do
    case $1 in
        --once) once=1 ;;
        --lambda) lambda=1 ;;
        --use-case)
            (($# >= 2)) || die "--use-case needs yolo or ocr"
            use_case=$2
            shift
            ;;
        --use-case=*) use_case=${1#*=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$1' (usage: dev/demo.sh [--use-case yolo|ocr] [--lambda] [--once])" ;;
    esac
    shift
done

# What differs between the use cases: names, the function, the result, the page.
case $use_case in
    yolo)
        tag=
        default_script=scar/yolo/detect.sh
        default_port=8642
        result_suffix=.png
        web_title="Object detection (YOLO)"
        web_hint="Upload photos; each comes back with the objects found in it drawn and listed."
        ;;
    ocr)
        tag=-ocr
        default_script=scar/ocr/recognize.sh
        default_port=8643
        result_suffix=.txt
        web_title="Text recognition (OCR)"
        web_hint="Upload scanned pages or photos of documents (PNG, JPEG, TIFF); each comes back as text you can copy."
        ;;
    *) die "--use-case must be yolo or ocr, not '$use_case'" ;;
esac
((lambda)) && tag=$tag-lambda
demo_dir=$state_dir/demo$tag
out_dir=$(realpath -m -- "${ORCHGPU_DEMO_OUT:-demo-out$tag}")
http_port=${ORCHGPU_DEMO_HTTP_PORT:-$default_port}
function_script=${ORCHGPU_DEMO_SCRIPT:-$default_script}
[[ $function_script == /* ]] || function_script=$repo_root/$function_script
if [[ $function_script == "$repo_root/scar/yolo/detect.sh" ]] &&
    ! "$repo_root/dev/install-darknet.sh" >/dev/null; then
    printf '%s: darknet could not be installed; falling back to dev/function/example.sh (NO inference)\n' \
        dev/demo.sh >&2
    function_script=$repo_root/dev/function/example.sh
fi
if [[ $use_case == ocr ]]; then
    # Tesseract for the function, ImageMagick and a DejaVu font to draw the sample pages.
    "$repo_root/dev/install-tesseract.sh" ||
        die "Tesseract could not be installed (dev/install-tesseract.sh needs root or sudo)"
fi

input_bucket=orchgpu-demo$tag-input
work_bucket=orchgpu-demo$tag-work work_dir=bundles
output_bucket=orchgpu-demo$tag-output output_dir=results
jobs_queue=orchgpu-demo$tag-jobs
function_queue=orchgpu-demo$tag-function
results_queue=
((lambda)) && results_queue=orchgpu-demo$tag-results
case $profile in
    debug) cargo_profile_args=() ;;
    release) cargo_profile_args=(--release) ;;
    *) die "ORCHGPU_PROFILE must be debug or release, not '$profile'" ;;
esac
[[ $result_timeout =~ ^[0-9]+$ ]] || die "ORCHGPU_DEMO_TIMEOUT must be whole seconds"
[[ $http_port =~ ^[0-9]+$ ]] || die "ORCHGPU_DEMO_HTTP_PORT must be a port number"
[[ -x $function_script ]] || die "the function script $function_script is not executable"
cd -- "$repo_root"

# --- processes -------------------------------------------------------------------------

child_pids=()
child_names=()
started_emulator=0
samples_dir=
cleaned_up=0

pid_alive() { # alive and not a zombie
    local stat
    # read, not $(<file): under set -e a failed $(<file) ends the whole script.
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# SIGTERM, up to stop_timeout seconds for a graceful exit (the daemon returns messages
# and releases GPUs), then SIGKILL.
stop_pid() { # PID NAME
    local pid=$1 name=$2 deadline=$((SECONDS + stop_timeout))
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid"; then
        say "$name (pid $pid) still runs after $stop_timeout s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    say "stopped $name"
}

# A child in its own session: Ctrl-C reaches only this script, which then stops the
# children in order (the daemon before the scheduler it releases GPUs through).
start_child() { # NAME COMMAND...
    local name=$1
    shift
    # NO_COLOR: the logs are files, not terminals.
    setsid env NO_COLOR=1 "$@" >"$demo_dir/$name.log" 2>&1 </dev/null &
    child_pids+=("$!")
    child_names+=("$name")
    printf '%s\n' "$!" >"$demo_dir/$name.pid"
    say "started $name (pid $!), log $demo_dir/$name.log"
}

check_children() {
    local i
    for i in "${!child_pids[@]}"; do
        pid_alive "${child_pids[i]}" || die "${child_names[i]} (pid ${child_pids[i]}) exited"
    done
}

# Processes a killed earlier demo left behind (their pid files name them).
stop_leftovers() {
    local pid_file pid name
    for pid_file in "$demo_dir"/*.pid; do
        [[ -f $pid_file ]] || continue
        name=$(basename -- "$pid_file" .pid)
        read -r pid 2>/dev/null <"$pid_file" || pid=
        rm -f -- "$pid_file"
        if ! [[ $pid =~ ^[0-9]+$ ]] || ! pid_alive "$pid"; then continue; fi
        case $name in mock-ssgm | function | orchgpu | orchgpu-lambda-local) ;; *) continue ;; esac
        [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$name"* ]] || continue
        say "stopping $name (pid $pid) left over from an earlier demo"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + stop_timeout))
        while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

print_log_tails() {
    local log
    for log in "$demo_dir"/*.log; do
        [[ -s $log ]] || continue
        printf '\n----- last lines of %s -----\n' "$log" >&2
        tail -n 25 -- "$log" >&2
    done
    if ((started_emulator)); then
        log=$(dev/localstack.sh log)
        if [[ -s $log ]]; then
            printf '\n----- last lines of %s -----\n' "$log" >&2
            tail -n 15 -- "$log" >&2
        fi
    fi
}

cleanup() {
    local rc=$? i
    ((cleaned_up)) && return
    cleaned_up=1
    trap '' INT TERM
    case $rc in
        0) ;;
        130 | 143) say "interrupted; stopping everything" ;;
        *)
            say "failed (exit $rc); logs follow" >&2
            print_log_tails
            ;;
    esac
    for ((i = ${#child_pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${child_pids[i]}" "${child_names[i]}"
        rm -f -- "$demo_dir/${child_names[i]}.pid"
    done
    if ((started_emulator)); then
        dev/localstack.sh stop || true
    fi
    [[ -z $samples_dir ]] || rm -rf -- "$samples_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- aws CLI ---------------------------------------------------------------------------

# Found (or installed) before anything needs it: AWS_CLI, else the LocalStack venv's, else
# aws on PATH; with none of them, the LocalStack venv is installed (it has one), even when
# the emulator is moto.
find_aws_cli() {
    local venv_aws=${ORCHGPU_LS_VENV:-$HOME/.cache/orchgpu/localstack-venv}/bin/aws
    if [[ -n ${AWS_CLI:-} ]]; then
        command -v "$AWS_CLI" >/dev/null 2>&1 || die "AWS_CLI=$AWS_CLI is not a command"
        return
    fi
    if [[ -x $venv_aws ]]; then
        AWS_CLI=$venv_aws
    elif command -v aws >/dev/null 2>&1; then
        AWS_CLI=aws
    else
        say "no aws CLI on PATH: installing LocalStack's venv, which has one (dev/localstack.sh install)"
        ORCHGPU_EMULATOR=localstack dev/localstack.sh install ||
            die "could not install an aws CLI: set AWS_CLI or install one"
        [[ -x $venv_aws ]] || die "dev/localstack.sh install left no $venv_aws"
        AWS_CLI=$venv_aws
    fi
}
find_aws_cli
export AWS_CLI AWS_PAGER=""
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_REGION=${AWS_REGION:-us-east-1}
endpoint=
awsl() { "$AWS_CLI" --endpoint-url "$endpoint" --region "$AWS_REGION" "$@"; }

# --- main ------------------------------------------------------------------------------

mkdir -p -- "$demo_dir"
stop_leftovers
rm -f -- "$demo_dir"/*.log

say "building the binaries (cargo build --locked${cargo_profile_args[*]/#/ }; a first build takes minutes)"
t_build=$SECONDS
cargo build -q --locked "${cargo_profile_args[@]}"
say "built in $((SECONDS - t_build)) s"
bin_dir=${CARGO_TARGET_DIR:-$repo_root/target}/$profile
[[ $bin_dir == /* ]] || bin_dir=$repo_root/$bin_dir
for exe in orchgpu mock-ssgm orchgpu-function orchgpu-lambda orchgpu-lambda-local; do
    [[ -x $bin_dir/$exe ]] || die "cargo build did not produce $bin_dir/$exe"
done

pid_before=$(dev/localstack.sh pid 2>/dev/null) || pid_before=
endpoint=$(dev/localstack.sh start)
pid_after=$(dev/localstack.sh pid 2>/dev/null) || pid_after=
# Ours to stop only if this start launched it (a new pid); otherwise it was reused.
if [[ -n $pid_after && $pid_after != "$pid_before" ]]; then
    started_emulator=1
else
    say "reusing the running emulator (it stays up afterwards)"
fi

deploy/aws-setup.sh --endpoint-url "$endpoint" --region "$AWS_REGION" \
    --input-bucket "$input_bucket" --intermediate "$work_bucket/$work_dir" \
    --output "$output_bucket/$output_dir" --jobs-queue "$jobs_queue" \
    --function-queue "$function_queue" ${results_queue:+--results-queue "$results_queue"} \
    >"$demo_dir/aws-setup.log" 2>&1 ||
    die "deploy/aws-setup.sh failed; see $demo_dir/aws-setup.log"
say "buckets and queues ready (details in $demo_dir/aws-setup.log)"

# The emulator may hold objects and messages of an earlier demo: start from empty buckets
# and queues so that the results counted below are this run's.
for location in "$input_bucket" "$work_bucket/$work_dir/" "$output_bucket/$output_dir/"; do
    awsl s3 rm "s3://$location" --recursive --only-show-errors >/dev/null ||
        die "could not empty s3://$location"
done
for queue in "$jobs_queue" "$jobs_queue-dlq" "$function_queue" $results_queue; do
    queue_url=$(awsl sqs get-queue-url --queue-name "$queue" --query QueueUrl --output text)
    awsl sqs purge-queue --queue-url "$queue_url" ||
        say "warning: could not purge queue $queue; orchgpu drops stale messages it finds"
done

start_child mock-ssgm "$bin_dir/mock-ssgm" serve --listen 127.0.0.1:0 --gpus 2
port=
deadline=$((SECONDS + 15))
while [[ -z $port ]] && ((SECONDS < deadline)); do
    check_children
    port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$demo_dir/mock-ssgm.log" | head -n 1)
    [[ -n $port ]] || sleep 0.1
done
[[ -n $port ]] || die "mock-ssgm did not print 'listening on 127.0.0.1:PORT' within 15 s"
say "mock-ssgm listens on 127.0.0.1:$port"

start_child function "$bin_dir/orchgpu-function" --queue "$function_queue" \
    --output "$output_bucket/$output_dir" --script "$function_script" \
    --endpoint-url "$endpoint" --region "$AWS_REGION"
if ((lambda)); then
    # The same settings as the daemon's below, as the function's environment.
    start_child orchgpu-lambda-local env ORCHGPU_QUEUE="$jobs_queue" \
        ORCHGPU_SCHEDULER_HOST=127.0.0.1 ORCHGPU_SCHEDULER_PORT="$port" \
        ORCHGPU_SSGM="$bin_dir/mock-ssgm" ORCHGPU_INTERMEDIATE="$work_bucket/$work_dir" \
        ORCHGPU_OUTPUT="$output_bucket/$output_dir" ORCHGPU_ENDPOINT_URL="$endpoint" \
        ORCHGPU_REGION="$AWS_REGION" ORCHGPU_RESULT_SUFFIX="$result_suffix" \
        ORCHGPU_RESULTS_QUEUE="$results_queue" ORCHGPU_SSGM_TIMEOUT=10 \
        ORCHGPU_STATE_DIR="$demo_dir/state" ORCHGPU_WORK_DIR="$demo_dir/work" \
        "$bin_dir/orchgpu-lambda-local" --function "$bin_dir/orchgpu-lambda" \
        --results-queue "$results_queue" --schedule-every 5 --timeout 120 --visibility 5
    sleep 1
    check_children
    say "no web page with --lambda (a function serves no listener)"
else
    start_child orchgpu "$bin_dir/orchgpu" -q "$jobs_queue" -S 127.0.0.1 -P "$port" \
        -m "$bin_dir/mock-ssgm" -i "$work_bucket/$work_dir" -o "$output_bucket/$output_dir" \
        -b 1 -u 1 -w 2 --endpoint-url "$endpoint" --region "$AWS_REGION" --max-jobs 2 \
        --state-dir "$demo_dir/state" --http-listen "127.0.0.1:$http_port" \
        --upload-to "$input_bucket/web" --result-suffix "$result_suffix" \
        --web-title "$web_title" --web-hint "$web_hint"
    sleep 1
    check_children
    page_url=http://127.0.0.1:$http_port/
    say "the web page: $page_url"
fi

# Sample images: darknet's when installed, else small PNGs made with python3's stdlib.
samples_dir=$(mktemp -d)
shopt -s nullglob
darknet_images=(/usr/share/darknet/data/*.jpg)
shopt -u nullglob
names=("my photo" "a+b=c" "ünïcødé ☀ 写真")
samples=()
if [[ $use_case == ocr ]]; then
    # Document pages: text drawn in DejaVu Sans with ImageMagick (Debian's convert first:
    # a bare `convert` elsewhere on PATH may be another program).
    convert=$(command -v magick || command -v convert-im6.q16 || command -v convert) ||
        die "no ImageMagick: run dev/install-tesseract.sh"
    font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
    draw_page() { # FILE LINE...
        local file=$1 y=90 args=()
        shift
        for line in "$@"; do
            args+=(-annotate "+60+$y" "$line")
            y=$((y + 56))
        done
        "$convert" -size "1400x$((y + 30))" xc:white -fill black -font "$font" -pointsize 36 \
            "${args[@]}" -colorspace Gray "$file" || die "ImageMagick could not draw $file"
        samples+=("$file")
    }
    draw_page "$samples_dir/invoice 4711.png" "Invoice number 4711 from Valencia" \
        "Remote GPUs, one job at a time" "Total due: 120 EUR"
    draw_page "$samples_dir/scanned page ☀.png" "The quick brown fox" "jumps over the lazy dog"
elif ((${#darknet_images[@]} >= ${#names[@]})); then
    for i in "${!names[@]}"; do
        cp -- "${darknet_images[i]}" "$samples_dir/${names[i]}.jpg"
        samples+=("$samples_dir/${names[i]}.jpg")
    done
else
    python3 - "$samples_dir" "${names[@]}" <<'EOF' || die "could not generate sample PNGs"
import struct, sys, zlib

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

out, names = sys.argv[1], sys.argv[2:]
for n, name in enumerate(names):
    w, h = 64, 48
    rows = b"".join(
        b"\x00" + b"".join(bytes(((x * 4 + n * 80) % 256, (y * 5) % 256, (n * 90) % 256)) for x in range(w))
        for y in range(h)
    )
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with open(f"{out}/{name}.png", "wb") as f:
        f.write(png)
EOF
    for name in "${names[@]}"; do samples+=("$samples_dir/$name.png"); done
fi

t0=$SECONDS
for sample in "${samples[@]}"; do
    key=${sample##*/}
    awsl s3api put-object --bucket "$input_bucket" --key "$key" --body "$sample" >/dev/null ||
        die "upload of '$key' failed"
    say "uploaded s3://$input_bucket/$key"
done

list_results() { # keys of the results (<id><result suffix>), one a line
    awsl s3api list-objects-v2 --bucket "$output_bucket" --prefix "$output_dir/" \
        --query "Contents[?ends_with(Key, '$result_suffix')].Key" --output text | tr '\t' '\n' |
        grep -v -e '^None$' -e '^$' || true
}
# The scheduler's live grants, while the jobs run: `-top` lists one line per grant under
# its header (shown once, the first time a grant is live).
top_shown=0
show_live_grants() {
    local top
    ((top_shown)) && return 0
    top=$("$bin_dir/mock-ssgm" -S 127.0.0.1 -P "$port" -top 2>/dev/null) || return 0
    (($(wc -l <<<"$top") > 1)) || return 0
    top_shown=1
    say "the scheduler's live grants (mock-ssgm -S 127.0.0.1 -P $port -top):"
    printf '    %s\n' "${top//$'\n'/$'\n'    }"
}
want=${#samples[@]}
have=0
deadline=$((t0 + result_timeout))
while :; do
    show_live_grants
    mapfile -t results < <(list_results)
    if ((${#results[@]} != have)); then
        have=${#results[@]}
        say "$have of $want results after $((SECONDS - t0)) s"
    fi
    ((have >= want)) && break
    ((SECONDS < deadline)) || die "only $have of $want results after $result_timeout s"
    check_children
    sleep 0.5
done

# The output prefix was emptied above, so all of it is this run's: the PNGs and the
# function's .txt notes.
mkdir -p -- "$out_dir"
awsl s3 cp "s3://$output_bucket/$output_dir/" "$out_dir" --recursive --only-show-errors ||
    die "download of s3://$output_bucket/$output_dir/ failed"
if [[ $use_case == ocr ]]; then
    say "recognised text (downloaded to $out_dir, with each page's word table, .tsv):"
else
    say "results (downloaded to $out_dir, with the function's .txt notes):"
fi
# Which upload gave which result: the job history maps each key to its job id (the
# function keeps none: there each result is listed by its job id).
if ((lambda)); then
    python3 - "$out_dir" "$result_suffix" >"$demo_dir/jobs.json" <<'EOF' ||
import json, os, sys
out, suffix = sys.argv[1], sys.argv[2]
ids = sorted(f[: -len(suffix)] for f in os.listdir(out) if f.endswith(suffix))
print(json.dumps([{"job_id": i, "key": i} for i in ids]))
EOF
        die "could not list the results"
else
    "$bin_dir/orchgpu" jobs --state-dir "$demo_dir/state" --json --limit 0 >"$demo_dir/jobs.json" ||
        die "orchgpu jobs could not read the history"
fi
python3 - "$demo_dir/jobs.json" "$out_dir" "$use_case" <<'EOF' || die "could not list the results"
import json, os, sys

def summary(path):
    """Labels by their best confidence, highest first; a label found more than once is
    folded: `car ×2 (71%, 30%), dog 56%`."""
    by_label = {}
    for line in open(path, encoding="utf-8"):
        label, _, rest = line.strip().partition(": ")
        if not line.startswith("#") and rest.endswith("%") and rest[:-1].isdigit():
            by_label.setdefault(label, []).append(int(rest[:-1]))
    parts = []
    for label, found in sorted(by_label.items(), key=lambda kv: (-max(kv[1]), kv[0])):
        found.sort(reverse=True)
        if len(found) == 1:
            parts.append(f"{label} {found[0]}%")
        else:
            parts.append(f"{label} \u00d7{len(found)} ({', '.join(f'{c}%' for c in found)})")
    return ", ".join(parts) or "nothing detected"

jobs, out, use_case = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
for job in sorted(jobs, key=lambda j: j["key"]):
    if use_case == "ocr":
        # The recognised text, as the function wrote it.
        txt = os.path.join(out, job["job_id"] + ".txt")
        if not os.path.exists(txt):
            continue
        text = open(txt, encoding="utf-8").read().strip()
        gpu = job.get("gpu_seconds")
        took = f" ({gpu:.2f} GPU-seconds)" if gpu is not None else ""
        print(f"  {job['key']} \u2192 {txt}{took}:")
        for line in (text or "(no text found)").splitlines():
            if line.strip():
                print(f"      {line}")
        continue
    png = os.path.join(out, job["job_id"] + ".png")
    if not os.path.exists(png):
        continue
    try:
        found = summary(os.path.join(out, job["job_id"] + ".txt"))
    except FileNotFoundError:
        found = "(no detections file)"
    print(f"  {job['key']} \u2192 {png}: {found}")
EOF

((top_shown)) || say "(no grant was live at a -top call: the jobs were quicker than the polls)"
# The scheduler's books: every grant released once the jobs are done (with --lambda by
# the results handler, once the results queue's events have been played).
if ((lambda)); then
    deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        stats=$("$bin_dir/mock-ssgm" -S 127.0.0.1 -P "$port" -stats) || break
        python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1])["live"] != 0)' "$stats" && break
        sleep 0.5
    done
    say "invocations (orchgpu-lambda-local):"
    grep -h 'billed_ms' "$demo_dir/orchgpu-lambda-local.log" | sed 's/^/    /' || true
fi
if stats=$("$bin_dir/mock-ssgm" -S 127.0.0.1 -P "$port" -stats); then
    python3 - "$stats" <<'EOF' || say "mock-ssgm -stats answered: $stats"
import json, sys

s = json.loads(sys.argv[1])
print(f"mock-ssgm: {s['granted']} granted, {s['released']} released, {s['busy']} busy, "
      f"{s['live']} live; {s['free_gpus']} of {s['total_gpus']} GPUs free")
EOF
else
    say "mock-ssgm -stats failed"
fi

if ((once)); then
    say "done (--once); stopping everything"
    exit 0
fi
say "everything keeps running (endpoint $endpoint, scheduler 127.0.0.1:$port);"
if ((lambda)); then
    :
elif [[ $use_case == ocr ]]; then
    say "try it in a browser: $page_url (upload scanned pages, watch them run, copy their text)"
else
    say "try it in a browser: $page_url (upload images, watch them run, see what was found)"
fi
say "or upload with: $AWS_CLI --endpoint-url $endpoint s3 cp FILE s3://$input_bucket/"
say "logs: $demo_dir/*.log. Press Ctrl-C to stop everything this script started."
while :; do
    check_children
    sleep 2
done

#!/usr/bin/env bash
# Creates the AWS side of orchgpu, or brings it to the desired state: the input,
# intermediate and output buckets, the SQS jobs queue with its dead-letter queue, the queue
# policies that let S3 send to the queues, the S3 -> SQS event notifications, and the
# lifecycle rules that expire stale job claims and abort incomplete multipart uploads.
# Idempotent: a second run changes nothing and exits 0. Works against real AWS or an
# emulator (LocalStack, moto) given --endpoint-url or AWS_ENDPOINT_URL.
#
# Usage: deploy/aws-setup.sh --input-bucket BUCKET --intermediate BUCKET/DIR \
#          --output BUCKET/DIR --jobs-queue NAME [options]     (see --help)
#    or: deploy/aws-setup.sh --use-case NAME [options]   (every name from the use case's)
set -euo pipefail

prog=aws-setup.sh

usage() {
    cat <<'EOF'
Usage: deploy/aws-setup.sh [options]

Creates (or updates to the desired state) what orchgpu needs on AWS. Running it twice
changes nothing. Every option can also come from the environment variable in brackets.

Required (each may come from --use-case instead):
  --input-bucket BUCKET      bucket users upload to; its ObjectCreated events go to the
                             jobs queue                                [ORCHGPU_INPUT_BUCKET]
  --intermediate BUCKET/DIR  where orchgpu uploads bundles (orchgpu -i) [ORCHGPU_INTERMEDIATE]
  --output BUCKET/DIR        where the function writes results (orchgpu -o)   [ORCHGPU_OUTPUT]
  --jobs-queue NAME          SQS queue orchgpu consumes (orchgpu -q)
                                                [ORCHGPU_JOBS_QUEUE, else ORCHGPU_QUEUE]

A use case (several on one host, each served by its own orchgpu@NAME instance):
  --use-case NAME            fills in every name not given otherwise, from PREFIX-NAME:
                             input bucket PREFIX-NAME-input, intermediate
                             PREFIX-NAME-work/bundles, output PREFIX-NAME-output/results,
                             jobs queue PREFIX-NAME-jobs (scar/NAME/NAME.env.example uses
                             the same names). NAME: 1-20 of a-z 0-9 -     [ORCHGPU_USE_CASE]
  --name-prefix PREFIX       the first part of those names (default orchgpu; bucket names
                             are global on AWS, so pick your own there)
                                                                   [ORCHGPU_NAME_PREFIX]

Optional:
  --dlq NAME                 dead-letter queue (default: <jobs-queue>-dlq)      [ORCHGPU_DLQ]
  --max-receive-count N      receives before a message moves to the DLQ (default 5)
                                                                 [ORCHGPU_MAX_RECEIVE_COUNT]
  --visibility-timeout S     jobs queue default visibility timeout, seconds (default 300)
                                                            [ORCHGPU_JOBS_VISIBILITY_TIMEOUT]
  --function-queue NAME      queue for the intermediate bucket's ObjectCreated events under
                             DIR/ ending in .tar.gz; used by the local function stand-in
                             (on AWS, SCAR wires its function itself)  [ORCHGPU_FUNCTION_QUEUE]
  --results-queue NAME       queue for the output bucket's ObjectCreated events under DIR/
                                                                     [ORCHGPU_RESULTS_QUEUE]
  --claims BUCKET/DIR        where daemons claim job ids (orchgpu --claims; default
                             <output bucket>/orchgpu-claims; 'off' for none). Gets a
                             lifecycle rule expiring claims after 1 day; must not be under
                             the intermediate DIR (the function fires there) [ORCHGPU_CLAIMS]
  --region REGION            [ORCHGPU_REGION, else AWS_REGION, else AWS_DEFAULT_REGION,
                             else us-east-1]
  --endpoint-url URL         AWS-compatible endpoint, e.g. http://127.0.0.1:4566
                                           [ORCHGPU_ENDPOINT_URL, else AWS_ENDPOINT_URL]
  -h, --help                 this text

ORCHGPU_QUEUE, ORCHGPU_INTERMEDIATE, ORCHGPU_OUTPUT, ORCHGPU_REGION and
ORCHGPU_ENDPOINT_URL are the daemon's own variables, so one environment file serves both.
The aws CLI is taken from AWS_CLI (default: aws on PATH); python3 is needed to edit JSON.
Credentials come from the usual AWS sources; emulators accept any (e.g. test/test).
The input bucket must differ from the intermediate and output buckets (its notification
has no filter, so bundles or results written there would become new jobs); with
--function-queue or --results-queue all three buckets must be distinct.
EOF
}

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
say() { printf '%s\n' "$*"; }

# --- options ---------------------------------------------------------------------------

input_bucket=${ORCHGPU_INPUT_BUCKET:-}
intermediate=${ORCHGPU_INTERMEDIATE:-}
output=${ORCHGPU_OUTPUT:-}
jobs_queue=${ORCHGPU_JOBS_QUEUE:-${ORCHGPU_QUEUE:-}}
dlq=${ORCHGPU_DLQ:-}
max_receive_count=${ORCHGPU_MAX_RECEIVE_COUNT:-5}
visibility_timeout=${ORCHGPU_JOBS_VISIBILITY_TIMEOUT:-300}
function_queue=${ORCHGPU_FUNCTION_QUEUE:-}
results_queue=${ORCHGPU_RESULTS_QUEUE:-}
claims=${ORCHGPU_CLAIMS:-}
region=${ORCHGPU_REGION:-${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}}
endpoint=${ORCHGPU_ENDPOINT_URL:-${AWS_ENDPOINT_URL:-}}
use_case=${ORCHGPU_USE_CASE:-}
name_prefix=${ORCHGPU_NAME_PREFIX:-orchgpu}

while (($#)); do
    opt=$1
    case $opt in
        -h | --help)
            usage
            exit 0
            ;;
        --*=*)
            value=${opt#*=}
            opt=${opt%%=*}
            shift
            ;;
        --*)
            (($# >= 2)) || die "$opt needs a value (see --help)"
            value=$2
            shift 2
            ;;
        *) die "unexpected argument '$opt' (see --help)" ;;
    esac
    case $opt in
        --input-bucket) input_bucket=$value ;;
        --intermediate) intermediate=$value ;;
        --output) output=$value ;;
        --jobs-queue) jobs_queue=$value ;;
        --dlq) dlq=$value ;;
        --max-receive-count) max_receive_count=$value ;;
        --visibility-timeout) visibility_timeout=$value ;;
        --function-queue) function_queue=$value ;;
        --results-queue) results_queue=$value ;;
        --claims) claims=$value ;;
        --region) region=$value ;;
        --endpoint-url) endpoint=$value ;;
        --use-case) use_case=$value ;;
        --name-prefix) name_prefix=$value ;;
        *) die "unknown option '$opt' (see --help)" ;;
    esac
done

if [[ -n $use_case ]]; then
    [[ $use_case =~ ^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$ ]] ||
        die "--use-case: '$use_case' is not 1-20 of a-z 0-9 - (starting and ending with a letter or digit)"
    [[ $name_prefix =~ ^[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?$ ]] ||
        die "--name-prefix: '$name_prefix' is not 1-30 of a-z 0-9 - (starting and ending with a letter or digit)"
    base=$name_prefix-$use_case
    input_bucket=${input_bucket:-$base-input}
    intermediate=${intermediate:-$base-work/bundles}
    output=${output:-$base-output/results}
    jobs_queue=${jobs_queue:-$base-jobs}
fi
[[ -n $input_bucket ]] || die "--input-bucket is required (see --help)"
[[ -n $intermediate ]] || die "--intermediate is required (see --help)"
[[ -n $output ]] || die "--output is required (see --help)"
[[ -n $jobs_queue ]] || die "--jobs-queue is required (see --help)"
dlq=${dlq:-$jobs_queue-dlq}

check_bucket_name() {
    [[ $2 =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ && $2 != *..* ]] ||
        die "$1: '$2' is not a valid bucket name (3-63 of a-z 0-9 . -)"
}
check_queue_name() {
    [[ $2 =~ ^[A-Za-z0-9_-]{1,80}$ ]] ||
        die "$1: '$2' is not a standard queue name (1-80 of A-Z a-z 0-9 _ -; S3 cannot notify FIFO queues; give a name, not a URL)"
}
# "bucket/dir/sub/" -> the bucket and "dir/sub"; a bare "bucket" means its root.
split_location() { # OPTION VALUE -> sets loc_bucket, loc_dir
    local loc=${2#s3://}
    loc_bucket=${loc%%/*}
    loc_dir=
    [[ $loc == */* ]] && loc_dir=${loc#*/}
    while [[ $loc_dir == */ ]]; do loc_dir=${loc_dir%/}; done
    check_bucket_name "$1" "$loc_bucket"
}
prefix_of() { if [[ -n $1 ]]; then printf '%s/' "$1"; fi; }

check_bucket_name --input-bucket "$input_bucket"
split_location --intermediate "$intermediate"
intermediate_bucket=$loc_bucket intermediate_dir=$loc_dir
split_location --output "$output"
output_bucket=$loc_bucket output_dir=$loc_dir
claims_bucket='' claims_dir=''
if [[ $claims != off ]]; then
    split_location --claims "${claims:-$output_bucket/orchgpu-claims}"
    claims_bucket=$loc_bucket claims_dir=$loc_dir
    # As orchgpu itself refuses: every object created under the intermediate dir invokes
    # the function, and a claim is no bundle.
    if [[ $claims_bucket == "$intermediate_bucket" ]] &&
        [[ -z $intermediate_dir || $claims_dir == "$intermediate_dir" || $claims_dir == "$intermediate_dir"/* ]]; then
        die "--claims must not be under the intermediate dir s3://$intermediate_bucket/$(prefix_of "$intermediate_dir") (the function fires there)"
    fi
    [[ $claims_bucket != "$input_bucket" ]] ||
        die "--claims must not be in the input bucket ('$input_bucket'): every claim would become a new job"
fi
check_queue_name --jobs-queue "$jobs_queue"
check_queue_name --dlq "$dlq"
[[ -z $function_queue ]] || check_queue_name --function-queue "$function_queue"
[[ -z $results_queue ]] || check_queue_name --results-queue "$results_queue"
[[ $dlq != "$jobs_queue" ]] || die "--dlq must differ from --jobs-queue"
if ! [[ $max_receive_count =~ ^[0-9]{1,4}$ ]] || ((10#$max_receive_count < 1 || 10#$max_receive_count > 1000)); then
    die "--max-receive-count must be 1..1000, not '$max_receive_count'"
fi
if ! [[ $visibility_timeout =~ ^[0-9]{1,5}$ ]] || ((10#$visibility_timeout > 43200)); then
    die "--visibility-timeout must be 0..43200 seconds, not '$visibility_timeout'"
fi
max_receive_count=$((10#$max_receive_count)) visibility_timeout=$((10#$visibility_timeout))
[[ $region =~ ^[a-z0-9-]+$ ]] || die "bad --region '$region'"

# The input notification has no filter: a bundle or result written to the input bucket
# would become a new job, and so on forever.
[[ $input_bucket != "$intermediate_bucket" ]] ||
    die "the input and intermediate buckets must differ ('$input_bucket'): every bundle would become a new job"
[[ $input_bucket != "$output_bucket" ]] ||
    die "the input and output buckets must differ ('$input_bucket'): every result would become a new job"
if [[ -n $function_queue || -n $results_queue ]] && [[ $intermediate_bucket == "$output_bucket" ]]; then
    die "with --function-queue or --results-queue the intermediate and output buckets must differ ('$output_bucket')"
fi

aws_cli=${AWS_CLI:-aws}
command -v "$aws_cli" >/dev/null 2>&1 || die "aws CLI '$aws_cli' not found (install it or set AWS_CLI)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed to edit policy and notification JSON)"
export AWS_PAGER=""
aws_args=(--region "$region")
[[ -z $endpoint ]] || aws_args+=(--endpoint-url "$endpoint")

err_file=$(mktemp)
trap 'rm -f -- "$err_file"' EXIT

awsq() { "$aws_cli" "${aws_args[@]}" "$@" 2>"$err_file"; }
# Runs an aws command; on failure dies with WHAT and the CLI's own message.
aws_or_die() { # WHAT ARGS...
    local what=$1
    shift
    awsq "$@" || die "$what failed: $(tr -s '\n' ' ' <"$err_file")"
}

# JSON edits, in one small python program: mode and arguments on argv, result on stdout.
json_tool() {
    python3 -c '
import json, sys

def canon(v):
    """Comparable form: sorted keys, sorted lists, one-item lists as scalars, numbers as text."""
    if isinstance(v, dict):
        return {k: canon(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        items = sorted((canon(x) for x in v), key=lambda x: json.dumps(x, sort_keys=True))
        return items[0] if len(items) == 1 else items
    if isinstance(v, bool) or v is None:
        return v
    return str(v)

def loads(text):
    text = text.strip()
    return json.loads(text) if text and text != "None" else {}

mode, args = sys.argv[1], sys.argv[2:]

if mode == "queue-attrs":          # VISIBILITY DLQ_ARN MAX_RECEIVE -> jobs queue attributes
    vis, dlq_arn, n = args
    attrs = {"VisibilityTimeout": vis}
    if dlq_arn:
        attrs["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": n})
    print(json.dumps(attrs))

elif mode == "attrs-diff":         # DESIRED CURRENT -> attributes to set, or nothing
    desired, current = loads(args[0]), loads(args[1])
    diff = {}
    for k, v in desired.items():
        have = current.get(k)
        if k in ("RedrivePolicy", "Policy"):
            same = have is not None and canon(loads(have)) == canon(loads(v))
        else:
            same = have is not None and str(have) == str(v)
        if not same:
            diff[k] = v
    if diff:
        print(json.dumps(diff))

elif mode == "policy":             # QUEUE_ARN BUCKET_ARN ACCOUNT SID CURRENT -> policy, or nothing
    queue_arn, bucket_arn, account, sid, current = args
    ours = {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {
            "ArnLike": {"aws:SourceArn": bucket_arn},
            "StringEquals": {"aws:SourceAccount": account},
        },
    }
    policy = loads(current) or {"Version": "2012-10-17"}
    statements = policy.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    if any(s.get("Sid") == sid and canon(s) == canon(ours) for s in statements):
        sys.exit(0)
    policy["Statement"] = [s for s in statements if s.get("Sid") != sid] + [ours]
    print(json.dumps(policy))

elif mode == "lifecycle":          # CURRENT RULES -> configuration, or nothing
    current, rules = loads(args[0]), json.loads(args[1])
    have = current.get("Rules", [])
    ids = {r["ID"] for r in rules}
    mine = {r.get("ID"): r for r in have if r.get("ID") in ids}
    if len(mine) == len(rules) and all(canon(mine[r["ID"]]) == canon(r) for r in rules):
        sys.exit(0)
    print(json.dumps({"Rules": [r for r in have if r.get("ID") not in ids] + rules}))

elif mode == "notification":       # CURRENT ID QUEUE_ARN PREFIX SUFFIX -> configuration, or nothing
    current, cid, queue_arn, prefix, suffix = args
    config = loads(current)
    config.pop("ResponseMetadata", None)
    ours = {"Id": cid, "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
    rules = [{"Name": n, "Value": v} for n, v in (("prefix", prefix), ("suffix", suffix)) if v]
    if rules:
        ours["Filter"] = {"Key": {"FilterRules": rules}}
    def lower_rule_names(q):
        # S3 documents "prefix"/"suffix" and answers "Prefix"/"Suffix"; moto takes only
        # the lower-case names, AWS either.
        q = json.loads(json.dumps(q))
        for r in q.get("Filter", {}).get("Key", {}).get("FilterRules", []):
            r["Name"] = r["Name"].lower()
        return q
    queues = config.get("QueueConfigurations", [])
    if any(canon(lower_rule_names(q)) == canon(ours) for q in queues):
        sys.exit(0)
    # Keep what other tools configured; replace an earlier orchgpu entry for this queue.
    keep = [q for q in queues if q.get("Id") != cid and q.get("QueueArn") != queue_arn]
    for kind in ("QueueConfigurations", "TopicConfigurations", "LambdaFunctionConfigurations"):
        if kind in config:
            config[kind] = [lower_rule_names(c) for c in config[kind]]
    config["QueueConfigurations"] = [lower_rule_names(q) for q in keep] + [ours]
    print(json.dumps(config))

elif mode == "get":                # JSON KEY -> the value, or nothing
    print(loads(args[0]).get(args[1], ""))

elif mode == "keys":               # JSON -> its keys, comma-separated
    print(", ".join(sorted(loads(args[0]))))

elif mode == "policy-attr":        # POLICY -> {"Policy": POLICY} for set-queue-attributes
    print(json.dumps({"Policy": args[0]}))

else:
    sys.exit("unknown mode " + mode)
' "$@"
}

# --- buckets ---------------------------------------------------------------------------

ensure_bucket() { # BUCKET
    local bucket=$1
    if awsq s3api head-bucket --bucket "$bucket" >/dev/null; then
        say "bucket s3://$bucket: exists"
        return 0
    fi
    if grep -qE '\(403\)|Forbidden' "$err_file"; then
        die "bucket '$bucket' exists but is not accessible to you (another account's, or no s3:ListBucket)"
    fi
    local -a args=(s3api create-bucket --bucket "$bucket")
    # us-east-1 refuses a LocationConstraint; every other region needs one.
    [[ $region == us-east-1 ]] || args+=(--create-bucket-configuration "LocationConstraint=$region")
    if awsq "${args[@]}" >/dev/null; then
        say "bucket s3://$bucket: created"
    elif grep -q BucketAlreadyOwnedByYou "$err_file"; then
        say "bucket s3://$bucket: exists"
    else
        die "creating bucket '$bucket' failed: $(tr -s '\n' ' ' <"$err_file")"
    fi
}

# --- queues ----------------------------------------------------------------------------

queue_url=
queue_arn=
queue_attrs=
# Creates queue NAME with ATTRS (JSON map), or sets the attributes that differ on an
# existing one. Sets queue_url, queue_attrs (all attributes, JSON) and queue_arn.
ensure_queue() { # NAME ATTRS_JSON
    local name=$1 attrs=$2 diff
    if queue_url=$(awsq sqs get-queue-url --queue-name "$name" --query QueueUrl --output text); then
        read_queue_attrs "$name"
        diff=$(json_tool attrs-diff "$attrs" "$queue_attrs")
        if [[ -n $diff ]]; then
            aws_or_die "updating queue $name" sqs set-queue-attributes \
                --queue-url "$queue_url" --attributes "$diff"
            say "queue $name: updated $(json_tool keys "$diff")"
        else
            say "queue $name: exists, attributes as wanted"
        fi
    elif grep -qE 'NonExistentQueue|QueueDoesNotExist' "$err_file"; then
        queue_url=$(aws_or_die "creating queue $name" sqs create-queue --queue-name "$name" \
            --attributes "$attrs" --query QueueUrl --output text)
        read_queue_attrs "$name"
        say "queue $name: created"
    else
        die "looking up queue '$name' failed: $(tr -s '\n' ' ' <"$err_file")"
    fi
    # ARNs come from the service (LocalStack's account id is 000000000000).
    queue_arn=$(json_tool get "$queue_attrs" QueueArn)
    [[ $queue_arn == arn:* ]] || die "queue $name has no QueueArn attribute"
}

read_queue_attrs() { # NAME; reads all attributes of queue_url into queue_attrs
    queue_attrs=$(aws_or_die "reading attributes of queue $1" sqs get-queue-attributes \
        --queue-url "$queue_url" --attribute-names All --query Attributes --output json)
}

# Lets S3 send BUCKET's events to the queue of the last ensure_queue, keeping the policy's
# other statements.
ensure_queue_policy() { # NAME BUCKET
    local name=$1 bucket=$2 partition account policy
    IFS=: read -r _ partition _ _ account _ <<<"$queue_arn"
    policy=$(json_tool policy "$queue_arn" "arn:$partition:s3:::$bucket" "$account" \
        OrchgpuAllowS3SendMessage "$(json_tool get "$queue_attrs" Policy)")
    if [[ -n $policy ]]; then
        aws_or_die "setting the policy of queue $name" sqs set-queue-attributes \
            --queue-url "$queue_url" --attributes "$(json_tool policy-attr "$policy")"
        say "queue $name: policy lets s3://$bucket send messages"
    else
        say "queue $name: policy already lets s3://$bucket send messages"
    fi
}

# --- notifications ---------------------------------------------------------------------

# Adds (or updates) one queue entry in BUCKET's notification configuration, keeping the
# entries of other tools: S3 holds one configuration per bucket and a put replaces it all.
# On every put S3 first sends an s3:TestEvent message to each queue; orchgpu drops it with
# a log line. An unchanged configuration is not put again, so reruns send no test event.
ensure_notification() { # BUCKET ID QUEUE_ARN PREFIX SUFFIX
    local bucket=$1 id=$2 arn=$3 prefix=$4 suffix=$5 current config attempt
    current=$(aws_or_die "reading the notification configuration of s3://$bucket" \
        s3api get-bucket-notification-configuration --bucket "$bucket" --output json)
    config=$(json_tool notification "$current" "$id" "$arn" "$prefix" "$suffix")
    local what="s3://$bucket/$prefix*$suffix ObjectCreated -> ${arn##*:}"
    if [[ -z $config ]]; then
        say "notification $what: already set"
        return 0
    fi
    # A fresh queue policy can take a while to reach S3, which then refuses the
    # configuration with "Unable to validate the following destination configurations".
    for attempt in 1 2 3 4 5 6 7; do
        if awsq s3api put-bucket-notification-configuration --bucket "$bucket" \
            --notification-configuration "$config"; then
            say "notification $what: set"
            return 0
        fi
        if ! grep -q 'Unable to validate' "$err_file" || ((attempt == 7)); then
            break
        fi
        say "notification $what: S3 cannot validate the queue yet; retrying in 10 s"
        sleep 10
    done
    die "setting the notification of s3://$bucket failed: $(tr -s '\n' ' ' <"$err_file")"
}

# --- lifecycle rules -------------------------------------------------------------------

# Adds (or updates) orchgpu's lifecycle rules of BUCKET, keeping the rules of other tools
# (a put replaces the whole configuration). RULES is a JSON list of rules with IDs.
ensure_lifecycle() { # BUCKET RULES WHAT
    local bucket=$1 rules=$2 what=$3 current config
    if ! current=$(awsq s3api get-bucket-lifecycle-configuration --bucket "$bucket" --output json); then
        grep -q NoSuchLifecycleConfiguration "$err_file" ||
            die "reading the lifecycle rules of s3://$bucket failed: $(tr -s '\n' ' ' <"$err_file")"
        current='{}'
    fi
    config=$(json_tool lifecycle "$current" "$rules")
    if [[ -z $config ]]; then
        say "lifecycle s3://$bucket: $what: already set"
        return 0
    fi
    aws_or_die "setting the lifecycle rules of s3://$bucket" \
        s3api put-bucket-lifecycle-configuration --bucket "$bucket" \
        --lifecycle-configuration "$config" >/dev/null
    say "lifecycle s3://$bucket: $what: set"
}

# One rule: ID, key prefix, and the action's JSON.
lifecycle_rule() { # ID PREFIX ACTION_JSON
    printf '{"ID": "%s", "Status": "Enabled", "Filter": {"Prefix": "%s"}, %s}' "$1" "$2" "$3"
}

# --- main ------------------------------------------------------------------------------

say "orchgpu AWS setup: region $region${endpoint:+, endpoint $endpoint}"

declare -A seen=()
for bucket in "$input_bucket" "$intermediate_bucket" "$output_bucket" ${claims_bucket:+"$claims_bucket"}; do
    [[ -n ${seen[$bucket]:-} ]] && continue
    seen[$bucket]=1
    ensure_bucket "$bucket"
done

# Dead-letter queue: the maximum retention, so poison messages wait long for a look.
ensure_queue "$dlq" '{"MessageRetentionPeriod": "1209600"}'
dlq_url=$queue_url dlq_arn=$queue_arn

ensure_queue "$jobs_queue" \
    "$(json_tool queue-attrs "$visibility_timeout" "$dlq_arn" "$max_receive_count")"
jobs_url=$queue_url jobs_arn=$queue_arn
ensure_queue_policy "$jobs_queue" "$input_bucket"
ensure_notification "$input_bucket" orchgpu-jobs "$jobs_arn" "" ""

function_url='' function_arn=''
if [[ -n $function_queue ]]; then
    ensure_queue "$function_queue" '{}'
    function_url=$queue_url function_arn=$queue_arn
    ensure_queue_policy "$function_queue" "$intermediate_bucket"
    ensure_notification "$intermediate_bucket" orchgpu-function "$function_arn" \
        "$(prefix_of "$intermediate_dir")" .tar.gz
fi

results_url='' results_arn=''
if [[ -n $results_queue ]]; then
    ensure_queue "$results_queue" '{}'
    results_url=$queue_url results_arn=$queue_arn
    ensure_queue_policy "$results_queue" "$output_bucket"
    ensure_notification "$output_bucket" orchgpu-results "$results_arn" \
        "$(prefix_of "$output_dir")" ""
fi

# Claims of finished jobs are deleted by orchgpu; one given up by a job that then
# reached the dead-letter queue, or of a daemon that died, is removed after a day.
# Parts of a multipart upload a killed daemon could not abort are removed after a day.
abort_rule=$(lifecycle_rule orchgpu-abort-incomplete-uploads "$(prefix_of "$intermediate_dir")" \
    '"AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}')
if [[ -n $claims_bucket && $claims_bucket == "$intermediate_bucket" ]]; then
    claims_rule=$(lifecycle_rule orchgpu-expire-claims "$(prefix_of "$claims_dir")" '"Expiration": {"Days": 1}')
    ensure_lifecycle "$intermediate_bucket" "[$abort_rule, $claims_rule]" \
        "abort incomplete uploads, expire claims"
else
    ensure_lifecycle "$intermediate_bucket" "[$abort_rule]" "abort incomplete uploads after 1 day"
    if [[ -n $claims_bucket ]]; then
        claims_rule=$(lifecycle_rule orchgpu-expire-claims "$(prefix_of "$claims_dir")" '"Expiration": {"Days": 1}')
        ensure_lifecycle "$claims_bucket" "[$claims_rule]" "expire claims after 1 day"
    fi
fi

claims_desc=off
[[ -z $claims_bucket ]] || claims_desc="s3://$claims_bucket/$(prefix_of "$claims_dir") (lifecycle: expire after 1 day)"
cat <<EOF

Summary
  input bucket      s3://$input_bucket/  (ObjectCreated -> $jobs_queue)
  intermediate      s3://$intermediate_bucket/$(prefix_of "$intermediate_dir")
  output            s3://$output_bucket/$(prefix_of "$output_dir")
  claims            $claims_desc
  jobs queue        $jobs_url
                    $jobs_arn
                    visibility ${visibility_timeout} s, to $dlq after $max_receive_count receives
  dead-letter queue $dlq_url
                    $dlq_arn
EOF
if [[ -n $function_queue ]]; then
    say "  function queue    $function_url"
    say "                    $function_arn"
    say "                    (s3://$intermediate_bucket/$(prefix_of "$intermediate_dir")*.tar.gz)"
fi
if [[ -n $results_queue ]]; then
    say "  results queue     $results_url"
    say "                    $results_arn"
    say "                    (s3://$output_bucket/$(prefix_of "$output_dir")*)"
fi
cat <<EOF

Run the daemon with, for example:
  orchgpu -q $jobs_queue -i $intermediate_bucket${intermediate_dir:+/$intermediate_dir} -o $output_bucket${output_dir:+/$output_dir}${claims:+ --claims $claims} -S <scheduler host> -P <scheduler port>${endpoint:+ --endpoint-url $endpoint}
EOF

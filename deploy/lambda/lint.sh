#!/usr/bin/env bash
# Lints the Lambda deployment's SAM template (deploy/lambda/template.yaml) offline with
# cfn-lint, which expands the SAM transform itself with aws-sam-translator (no AWS account,
# no network but PyPI for the first install). Both come from PyPI into a venv in
# ~/.cache/orchgpu when missing or of other versions. Pinned to cfn-lint 1.51: 1.58 no
# longer expands the transform and passed a function with Runtime provided.al2099 and
# FunctionResponseTypes [ReportBatchItemFailure] (both refused by 1.51, E3030). Each run
# first lints a template with such a mistake and fails if cfn-lint does not see it, so a
# version that checks less cannot pass unnoticed.
#
# Usage: deploy/lambda/lint.sh [TEMPLATE...]   (default deploy/lambda/template.yaml)
# Environment: ORCHGPU_CFN_LINT_VENV (default ~/.cache/orchgpu/cfn-lint-venv)
# Exit status: cfn-lint's (0 when clean; warnings fail too), 1 on a failed install.
set -euo pipefail

prog=deploy/lambda/lint.sh
repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${ORCHGPU_CFN_LINT_VENV:-${HOME:?HOME is not set}/.cache/orchgpu/cfn-lint-venv}
readonly stamp="cfn-lint==1.51.0 aws-sam-translator==1.110.0"
marker=$venv/.orchgpu-installed

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}

if [[ ! -f $marker || $(cat -- "$marker") != "$stamp" ]]; then
    printf '%s: installing %s into %s\n' "$prog" "$stamp" "$venv" >&2
    if [[ -e $venv ]]; then
        # Never rm -rf something that is not a venv (a mistyped ORCHGPU_CFN_LINT_VENV=$HOME).
        [[ -f $venv/pyvenv.cfg ]] || die "$venv is not a venv; refusing to remove it"
        rm -rf -- "$venv"
    fi
    python3 -m venv -- "$venv" || die "could not create a venv (Debian: apt-get install python3-venv)"
    # shellcheck disable=SC2086 # the stamp is the list of requirements
    "$venv/bin/pip" install --quiet --disable-pip-version-check $stamp ||
        die "pip install failed; the venv is rebuilt next time"
    printf '%s\n' "$stamp" >"$marker"
fi
"$venv/bin/cfn-lint" --version >&2
canary=$(mktemp -d)
trap 'rm -rf -- "$canary"' EXIT
cat >"$canary/wrong.yaml" <<'YAML'
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Resources:
  Function:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: bootstrap.zip
      Handler: bootstrap
      Runtime: provided.al2099
YAML
if "$venv/bin/cfn-lint" -- "$canary/wrong.yaml" >/dev/null 2>&1; then
    die "cfn-lint passed a SAM function with Runtime provided.al2099: it does not check SAM resources"
fi
(($#)) || set -- "$repo_root/deploy/lambda/template.yaml"
"$venv/bin/cfn-lint" -- "$@"

#!/usr/bin/env bash
# Packages the rCUDA SSGM client, and what it needs, into a Lambda layer zip for
# orchgpu-lambda. Lambda unpacks a layer under /opt: the client goes to bin/ssgm
# (/opt/bin/ssgm, the template's ORCHGPU_SSGM; /opt/bin is also on the function's PATH),
# shared libraries to lib/ (/opt/lib is on LD_LIBRARY_PATH), anything else where --file
# puts it.
#
# Usage: deploy/lambda/layer.sh --ssgm FILE [--lib FILE]... [--file SRC:DEST]...
#          [--output ZIP] [--max-glibc X.Y]
#        deploy/lambda/layer.sh --mock      (the repository's mock-ssgm, for tests and the
#                                            demo: built for AL2023 by build.sh first)
#   --ssgm FILE       the SSGM client executable (ELF or a script with a #! line)
#   --lib FILE        a shared library it needs that Amazon Linux 2023 lacks (repeatable)
#   --file SRC:DEST   any other file it needs, DEST relative to /opt (repeatable), e.g. a
#                     config file or a JAR: --file ssgm.conf:etc/ssgm.conf
#   --output ZIP      default target/lambda/ssgm-layer.zip (the template's ContentUri)
#   --max-glibc X.Y   newest glibc an ELF file may need (default 2.34, AL2023's)
# Every ELF file put in the layer is checked with check-glibc.sh. The zip is written by
# Python's zipfile with fixed times and modes (755 for bin/, 644 otherwise), so the same
# inputs give the same zip. See deploy/lambda/README.md, "The SSGM layer".
# Exit status: 0 when the zip is written; 1 on a missing input or a failed check.
set -euo pipefail

prog=deploy/lambda/layer.sh
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$here/../.." && pwd)

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}

ssgm='' output=$repo_root/target/lambda/ssgm-layer.zip max_glibc=2.34
entries=() # "SRC<TAB>DEST" pairs
while (($#)); do
    case $1 in
        --mock)
            ssgm=$repo_root/target/lambda/mock-ssgm/bootstrap
            [[ -f $ssgm ]] ||
                die "no $ssgm: build it first with deploy/lambda/build.sh --bin mock-ssgm"
            shift
            ;;
        --ssgm)
            ssgm=${2:?--ssgm takes a file}
            shift 2
            ;;
        --lib)
            lib=${2:?--lib takes a file}
            entries+=("$lib"$'\t'"lib/$(basename -- "$lib")")
            shift 2
            ;;
        --file)
            spec=${2:?--file takes SRC:DEST}
            [[ $spec == *:* ]] || die "--file takes SRC:DEST, not '$spec'"
            dest=${spec##*:}
            # DEST stays inside the layer: relative, no .. component.
            [[ -n $dest && $dest != /* && /$dest/ != */../* ]] ||
                die "--file DEST must be a relative path inside /opt, not '$dest'"
            entries+=("${spec%:*}"$'\t'"$dest")
            shift 2
            ;;
        --output)
            output=${2:?--output takes a path}
            shift 2
            ;;
        --max-glibc)
            max_glibc=${2:?--max-glibc takes a version}
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $ssgm ]] || die "give --ssgm FILE (the real client) or --mock"
[[ -f $ssgm && -x $ssgm ]] || die "the SSGM client $ssgm is not an executable file"
entries=("$ssgm"$'\t'"bin/ssgm" "${entries[@]}")

for entry in "${entries[@]}"; do
    src=${entry%%$'\t'*}
    [[ -f $src ]] || die "no such file: $src"
    # ELF files run on AL2023: their glibc needs must fit it.
    if [[ $(head -c 4 -- "$src" | od -An -c | tr -d ' ') == '177ELF' ]]; then
        "$here/check-glibc.sh" "$src" "$max_glibc" || die "$src needs a newer glibc than AL2023's"
    fi
done

mkdir -p -- "$(dirname -- "$output")"
printf '%s\n' "${entries[@]}" | python3 -c '
import sys, zipfile
output = sys.argv[1]
with zipfile.ZipFile(output + ".tmp", "w", zipfile.ZIP_DEFLATED) as z:
    for line in sys.stdin.read().splitlines():
        src, dest = line.split("\t", 1)
        info = zipfile.ZipInfo(dest, date_time=(2020, 1, 1, 0, 0, 0))
        mode = 0o755 if dest.startswith("bin/") else 0o644
        info.external_attr = (0o100000 | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(src, "rb") as f:
            z.writestr(info, f.read())
' "$output"
mv -f -- "$output.tmp" "$output"
printf '%s: wrote %s:\n' "$prog" "$output" >&2
unzip -Z -l -- "$output" | sed -n '3,$p' | grep -v ' files\?, ' >&2 || true

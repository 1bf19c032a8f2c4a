#!/usr/bin/env bash
# Checks that an ELF binary needs no newer glibc than a given version: reads the
# GLIBC_x.y[.z] version each dynamic symbol needs (objdump -T) and fails naming every
# symbol that needs a newer one. A static binary (no dynamic symbols) passes.
#
# Usage: deploy/lambda/check-glibc.sh BINARY [MAX]   (MAX default 2.34, Amazon Linux 2023's)
# Exit status: 0 when nothing needs more than MAX; 1 otherwise (or on a read error).
set -euo pipefail

prog=deploy/lambda/check-glibc.sh
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
(($# == 1 || $# == 2)) || die "usage: $prog BINARY [MAX]"
binary=$1 max=${2:-2.34}
[[ $max =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || die "MAX must look like 2.34, not '$max'"
[[ -f $binary ]] || die "no such file: $binary"
command -v objdump >/dev/null 2>&1 || die "objdump not found (Debian: apt-get install binutils)"

# "a is newer than b" for dotted versions, by sort -V.
newer() { [[ $1 != "$2" && $(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n 1) == "$1" ]]; }

# objdump -T prints one dynamic symbol a line, e.g.
# 0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
# (older binutils print the version without parentheses).
table=$(objdump -T -- "$binary" 2>&1) || {
    [[ $table == *"not a dynamic object"* || $table == *"no symbols"* ]] && {
        printf '%s: %s: no dynamic symbols (static): ok\n' "$prog" "$binary" >&2
        exit 0
    }
    die "objdump -T failed on $binary: $table"
}
worst=0 too_new=()
while read -r version symbol; do
    newer "$version" "$worst" && worst=$version
    newer "$version" "$max" && too_new+=("$symbol (GLIBC_$version)")
done < <(sed -nE 's/.*[( ]GLIBC_([0-9]+\.[0-9]+(\.[0-9]+)?)\)?[[:space:]]+(.*)$/\1 \3/p' <<<"$table")

if ((${#too_new[@]})); then
    printf '%s: %s needs a newer glibc than %s:\n' "$prog" "$binary" "$max" >&2
    printf '  %s\n' "${too_new[@]}" >&2
    exit 1
fi
if [[ $worst == 0 ]]; then
    printf '%s: %s: needs no versioned glibc symbol (static, or no libc): ok\n' "$prog" "$binary" >&2
else
    printf '%s: %s: newest glibc version needed %s (<= %s): ok\n' "$prog" "$binary" "$worst" "$max" >&2
fi
